"""Where a run is (step, epoch, position in the epoch's plan, temporal state) and how it is saved:
checkpoint on rank 0, `ray.train.report` on every rank (a barrier), and the restore that continues
at the same step, data position and per-slot temporal state."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raydrive.engine import checkpoint as ckpt


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    in_epoch: int = 0  # optimizer steps done within the epoch
    resumed_from: int | None = None
    last_losses: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # since the last report: step, loss terms, frames
    # temporal state per micro-batch group of this rank (one group unless accumulating)
    lane_states: list[dict] = field(default_factory=list)


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the parameters (sum of |p| weighted by position), compared across ranks."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        total += float(p.detach().double().abs().sum()) * (1 + (i % 7) / 7)
    return total


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def checkpoint_and_report(w, metrics: dict) -> None:
    """Every rank calls this at the same steps. Ranks are checked for divergence, rank 0 writes the
    checkpoint (model with upstream key names, optimizer, scaler, position, all ranks' RNG and
    temporal state) and hands it to Ray Train with the metrics."""
    import ray.train

    s = w.state
    epoch, in_epoch = s.epoch, s.in_epoch
    if in_epoch >= w.steps_per_epoch:  # the epoch is done: resume at the start of the next one
        epoch, in_epoch = epoch + 1, 0
    mine = {"rng": ckpt.rng_state(), "checksum": param_checksum(w.model), "temporal": [_cpu(t) for t in w.lanes()]}
    gathered = _gather(mine, w.world)
    checksums = [g["checksum"] for g in gathered]
    if any(abs(c - checksums[0]) > 1e-6 * max(1.0, abs(checksums[0])) for c in checksums):
        raise RuntimeError(f"data-parallel ranks diverged at step {s.step}: parameter checksums {checksums}")
    metrics = {"step": s.step, "epoch": epoch, **metrics, "param_checksum": checksums[0], "ranks_checked": w.world}
    if w.rank != 0:
        ray.train.report(metrics)
        return
    train_state = {
        "optimizer": w.optimizer.state_dict(),
        "step": s.step,
        "epoch": epoch,
        "in_epoch": in_epoch,
        "rng": [g["rng"] for g in gathered],
        "temporal": [g["temporal"] for g in gathered],  # [rank][micro-batch group]
    }
    if w.scaler is not None:
        train_state["scaler"] = w.scaler.state_dict()
    if w.ema is not None:
        train_state["ema"] = w.ema.state_dict()
    meta = {"model": w.cfg.model_name, "preset": w.cfg.preset, "step": s.step, "epoch": epoch}
    meta["config"] = w.cfg.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        d = ckpt.save(Path(tmp) / "checkpoint", w.model.state_dict(), train_state, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))


def resume_point(registered, resume_from: str | None):
    """What to continue from: Ray's latest registered checkpoint or `resume_from` (the newest complete
    checkpoint the driver found in the run folder, which Ray may not have registered), whichever holds
    the later step; None to start afresh."""
    if not resume_from or not Path(resume_from).is_dir():
        return registered
    if registered is None:
        return resume_from
    with registered.as_directory() as d:
        ray_step = ckpt.checkpoint_step(Path(d)) or 0
    return resume_from if (ckpt.checkpoint_step(Path(resume_from)) or 0) > ray_step else registered


def restore(w, checkpoint) -> None:
    """Continue from a checkpoint (a Ray Train checkpoint or a folder): weights, optimizer, scaler,
    position, this rank's RNG and temporal state (kept only when the worker count and accumulation match
    the saved run)."""
    if isinstance(checkpoint, (str, Path)):
        model_state, saved, _ = ckpt.load(Path(checkpoint), map_location=w.device)
    else:
        with checkpoint.as_directory() as d:
            model_state, saved, _ = ckpt.load(Path(d), map_location=w.device)
    w.model.load_state_dict(model_state)
    w.optimizer.load_state_dict(saved["optimizer"])
    if w.scaler is not None and "scaler" in saved:
        w.scaler.load_state_dict(saved["scaler"])
    if w.ema is not None and "ema" in saved:
        w.ema.load_state_dict(saved["ema"])
    s = w.state
    s.step, s.epoch, s.in_epoch = int(saved["step"]), int(saved["epoch"]), int(saved["in_epoch"])
    s.resumed_from = s.step
    rng = saved["rng"]
    ckpt.set_rng_state(rng[w.rank] if w.rank < len(rng) else rng[0])
    temporal = saved.get("temporal", [])
    groups = w.batching.accum_steps
    if len(temporal) == w.world and all(len(t) == groups for t in temporal):
        s.lane_states = [
            {k: v.to(w.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in temporal[w.rank]
        ]
        if groups == 1:
            w.model.load_temporal_state(s.lane_states[0])
    elif w.rank == 0:
        w.log("[raydrive] the worker count or accumulation changed since the checkpoint: temporal state starts empty")
    if w.rank == 0:
        w.log(f"[raydrive] resumed from step {s.step} (epoch {s.epoch}, position {s.in_epoch} of {w.steps_per_epoch})")
