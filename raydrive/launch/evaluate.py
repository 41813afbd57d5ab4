"""`raydrive eval MODEL --checkpoint DIR`: score a checkpoint on the val split in this process, with
the model's own evaluator (Ray Data decodes on a local or joined Ray)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from raydrive.config import ConfigError, TrainConfig


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    from raydrive.engine import checkpoint as ckpt

    path = Path(path)
    if path.is_dir() and not (path / ckpt.META_FILE).is_file():
        found = sorted(p for p in path.glob("checkpoint_*") if (p / ckpt.META_FILE).is_file())
        path = found[-1] if found else path
    if not (path / ckpt.META_FILE).is_file():
        raise ConfigError(
            f"{path} is not a raydrive checkpoint (no {ckpt.META_FILE}); pass a checkpoint_* folder "
            f"or the run folder <storage-path>/<name>"
        )
    return path


def local_device() -> torch.device:
    """The accelerator this process can drive (outside Ray Train workers)."""
    from raydrive import accel

    kind = accel.local_kind()
    if kind == "npu":
        import torch_npu  # noqa: F401 (registers the npu device)

        torch.npu.set_device(0)
        return torch.device("npu:0")
    return torch.device("cuda:0" if kind == "cuda" else "cpu")


def evaluate_checkpoint(
    model: str | None, checkpoint: str, prepared: str | None = None, dataroot: str | None = None
) -> tuple[dict, object]:
    """(metrics, evaluator) of a raydrive checkpoint on the val split."""
    from raydrive.engine.evaluate import evaluate
    from raydrive.engine.loop import build_pipeline, load_model
    from raydrive.launch.cluster import connect_ray
    from raydrive.trainers import get_spec

    path = find_checkpoint(checkpoint)
    meta = json.loads((path / "meta.json").read_text())
    if model is not None and model != meta["model"]:
        raise ConfigError(
            f"{path} is a {meta['model']} checkpoint, not {model}: run `raydrive eval {meta['model']} ...`"
        )
    spec = get_spec(meta["model"])
    cfg = TrainConfig.from_dict(meta["config"], spec.config_cls, spec.mapper_cls)
    cfg.run = dataclasses.replace(cfg.run, load_from=str(path))
    if prepared or dataroot:
        cfg.data = dataclasses.replace(
            cfg.data, prepared=prepared or cfg.data.prepared, dataroot=dataroot or cfg.data.dataroot
        )
    connect_ray()
    net = load_model(spec, cfg, local_device())
    evaluator = spec.build_evaluator(cfg)
    pipeline = build_pipeline(spec, cfg, "val", False, 1)
    return evaluate(net, evaluator, pipeline, 0, 1, contextlib.nullcontext), evaluator
