"""TensorBoard scalars of a run, written by rank 0 into `<storage_path>/<run name>/tensorboard/`
(`tensorboard --logdir <storage_path>` shows every run side by side).

Per optimizer step: `loss/total` and `loss/<term>` (the global mean of each loss term the model
returns), `train/lr`, `train/grad_norm`, `perf/samples_per_s` (global), `perf/step_time_s`,
`perf/data_wait_s`, `perf/data_wait_fraction`. After each evaluation: `val/<metric>` for every
headline metric of the model's evaluator, at step 0 for the before-training evaluation and at the
last step after training. The names come from the loop and the evaluator; nothing here knows a model.

A resumed run opens a new event file in the same folder with `purge_step` = its first new step, so
TensorBoard drops what an interrupted session wrote after the checkpoint it resumed from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

TB_DIR = "tensorboard"


def tensorboard_dir(storage_path: str, run_name: str) -> Path:
    return Path(storage_path) / run_name / TB_DIR


class TensorBoardLog:
    """A `SummaryWriter` on rank 0; on other ranks (or with no folder) every call does nothing."""

    def __init__(self, log_dir: str | Path | None, rank: int = 0, resumed_step: int | None = None):
        self.writer = None
        if rank != 0 or log_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)

    def step(self, step: int, losses: Mapping[str, float], lr: float, grad_norm: float, timing: Mapping) -> None:
        """One optimizer step: `losses` are the per-term global means, without the total (summed here)."""
        w = self.writer
        if w is None:
            return
        w.add_scalar("loss/total", float(sum(losses.values())), step)
        for term, value in losses.items():
            w.add_scalar(f"loss/{term}", float(value), step)
        w.add_scalar("train/lr", float(lr), step)
        w.add_scalar("train/grad_norm", float(grad_norm), step)
        if timing:
            w.add_scalar("perf/samples_per_s", float(timing["samples_per_s_global"]), step)
            w.add_scalar("perf/step_time_s", float(timing["step_time_s"]), step)
            w.add_scalar("perf/data_wait_s", float(timing["data_wait_s"]), step)
            w.add_scalar("perf/data_wait_fraction", float(timing["data_wait_fraction"]), step)

    def metrics(self, step: int, metrics: Mapping[str, float], prefix: str = "val") -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
