"""Distributed evaluation around a model's evaluator: every rank predicts its share of the split
(whole scenes, in time order, temporal state reset first), the evaluator's states are gathered, and
rank 0 scores them.

Pictures: when the evaluator has the optional `pictures` method (`raydrive.spec.Evaluator`) and the run
folder is known, rank 0 then has it draw into `<run folder>/pictures/<tag>/`: `step_<N>` when the caller
gives the step, else `eval_<k>` numbered in order. The run folder is `run_dir` when given, else the Ray
Train run's own folder when its storage is a local path (none outside Ray Train, e.g. `raydrive eval`).
Drawing never fails an evaluation: an error is one line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from raydrive.data.pipeline import FramePipeline

PICTURES_DIR = "pictures"


def evaluate(
    model,
    evaluator,
    pipeline: FramePipeline,
    rank: int,
    world: int,
    autocast,
    run_dir: str | Path | None = None,
    step: int | None = None,
) -> dict:
    """Returns the evaluator's metrics on rank 0, {} elsewhere (and draws the evaluator's pictures
    there; see the module doc)."""
    was_training = model.training
    model.eval()
    model.reset_state()
    with torch.no_grad():
        for batch in pipeline.eval_batches(rank, world):
            if batch["seq_start"].any():
                model.reset_state(batch["seq_start"])
            with autocast():
                outputs = model.predict(batch)
            evaluator.process(batch, outputs)
    model.reset_state()
    model.train(was_training)
    states = [evaluator.state()]
    if world > 1:
        import torch.distributed as dist

        states = [None] * world
        dist.all_gather_object(states, evaluator.state())
    if rank != 0:
        return {}
    metrics = evaluator.evaluate(states)
    if hasattr(evaluator, "pictures"):
        draw_pictures(evaluator, states, run_dir, step)
    return metrics


def _ray_run_dir() -> Path | None:
    """The Ray Train run folder of this worker when its storage is a local (or mounted) path."""
    try:
        import pyarrow.fs
        import ray.train

        storage = ray.train.get_context().get_storage()
        if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return None
        return Path(storage.experiment_fs_path)
    except Exception:  # not in a Ray Train worker, or an API this Ray lacks
        return None


def pictures_dir(run_dir: Path, step: int | None) -> Path:
    root = run_dir / PICTURES_DIR
    if step is not None:
        return root / f"step_{step}"
    done = [int(p.name[5:]) for p in root.glob("eval_*") if p.name[5:].isdigit()] if root.is_dir() else []
    return root / f"eval_{max(done, default=0) + 1}"


def draw_pictures(evaluator, states: list, run_dir: str | Path | None, step: int | None) -> list[Path]:
    """Rank 0 after `evaluate`: the evaluator's pictures of every rank's state into the run folder."""
    run_dir = Path(run_dir) if run_dir is not None else _ray_run_dir()
    if run_dir is None:
        return []
    out = pictures_dir(run_dir, step)
    try:
        return list(evaluator.pictures(states, out, f"step {step}" if step is not None else out.name))
    except Exception as e:  # a picture must not cost the run its evaluation
        sys.stderr.write(f"[raydrive] could not draw the pictures in {out}: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        return []
