"""The shared per-worker loop: every model's train loop function is this loop bound to its TrainSpec.

Per step: planned batch from Ray Data -> model losses (autocast on backbone/neck as the model says)
-> NaN/inf check on all ranks -> backward with the loss scale -> gradient clip -> AdamW step with
per-group lr multipliers and the schedule. Every `checkpoint_every` steps (and at the end) rank 0
writes a checkpoint and every rank calls `ray.train.report` (a barrier). A re-run with the same
name and storage path finds the checkpoint through `ray.train.get_checkpoint()` and continues at the
same step, epoch and position in the epoch's lane plan.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from raydrive.config import DataSection, OptimSection, RunSection, TrainConfig
from raydrive.engine import checkpoint as ckpt
from raydrive.engine.metrics import LiveMetrics
from raydrive.engine.schedule import lr_factor
from raydrive.engine.timer import StepTimer


class NonFiniteLoss(RuntimeError):
    pass


def log(message: str) -> None:
    """One line to the worker's stdout (Ray forwards it to the driver). Not print(): Ray Train V2
    patches print into its logger as well, which would show every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def config_from_dict(d: dict) -> TrainConfig:
    from raydrive.trainers import get_spec

    spec = get_spec(d["model_name"])
    fix = lambda cls, v: cls(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})  # noqa: E731
    return TrainConfig(
        d["model_name"],
        d["preset"],
        fix(RunSection, d["run"]),
        fix(DataSection, d["data"]),
        fix(OptimSection, d["optim"]),
        fix(spec.config_cls, d["model"]),
    )


def build_pipeline(cfg: TrainConfig, spec, split: str, train: bool):
    from raydrive.data.augment import AugConfig
    from raydrive.data.lanes import LaneConfig
    from raydrive.data.pipeline import FramePipeline, PipelineConfig

    d = cfg.data
    aug = AugConfig(
        final_hw=spec.image_hw(cfg.model),
        photometric=d.photometric,
        bev_rot=d.bev_rot,
        rot_lim_deg=d.rot_lim_deg,
        flip=d.flip,
    )
    if not train:
        aug = aug.evaluation()
    lanes = LaneConfig(
        temporal=spec.temporal,
        seq_split_num=d.seq_split_num,
        skip_prob=d.skip_prob,
        flip_prob=d.flip_prob,
        seed=cfg.run.seed,
    )
    return FramePipeline(
        PipelineConfig(
            prepared=d.prepared,
            split=split,
            batch_size=cfg.run.batch_size if train else 1,
            lanes=lanes,
            aug=aug,
            dataroot=d.dataroot,
            with_depth=d.with_depth and train,
            cpus_per_task=d.cpus_per_task,
            prefetch_batches=d.prefetch_batches,
            max_tasks=d.max_tasks,
        )
    )


def build_model(cfg: TrainConfig, spec, device) -> torch.nn.Module:
    anchors = None
    if spec.needs_anchors:
        path = Path(cfg.data.prepared) / "anchors" / "nuscenes_kmeans900.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: re-run `raydrive prepare` (anchors are on by default)")
        anchors = np.load(path)
    model = spec.build(cfg.model, anchors)
    if cfg.run.load_from:
        state = ckpt.load_weights(cfg.run.load_from)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"--load-from {cfg.run.load_from} does not fit {cfg.model_name} ({cfg.preset}): "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); "
                f"upstream checkpoints fit the full preset"
            )
    return model.to(device)


def param_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """One group per lr multiplier (first matching name prefix wins, e.g. img_backbone x0.5)."""
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        mult = next((m for prefix, m in optim.lr_mults.items() if name.startswith(prefix)), 1.0)
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr": optim.lr * m, "lr_mult": m} for m, ps in groups.items()]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker for every registered model."""
    import ray.train
    import torch.distributed as dist

    from raydrive.accel import PRECISIONS, worker_device
    from raydrive.trainers import get_spec

    cfg = config_from_dict(config["config"])
    spec = get_spec(cfg.model_name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config["accelerator"])
    seed_everything(cfg.run.seed + rank)
    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))

    pipeline = build_pipeline(cfg, spec, "train", train=True)
    model = build_model(cfg, spec, device)
    amp_dtype = PRECISIONS[config["precision"]]
    model.amp_dtype = amp_dtype
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, broadcast_buffers=False, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scaler = None
    if amp_dtype == torch.float16:
        dynamic = cfg.optim.loss_scale == "dynamic"
        scaler = torch.amp.GradScaler(
            device.type,
            init_scale=32.0 if dynamic else float(cfg.optim.loss_scale),
            growth_interval=2000 if dynamic else 10**9,
        )

    steps_per_epoch = pipeline.steps_per_epoch(world)
    total = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch
    if cfg.run.benchmark:
        total = cfg.run.benchmark_steps
    step, epoch, in_epoch, resumed_from = 0, 0, 0, None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            model_state, state, meta = ckpt.load(Path(d), map_location=device)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, epoch, in_epoch = int(state["step"]), int(state["epoch"]), int(state["in_epoch"])
        resumed_from = step
        ckpt.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        temporal = state.get("temporal", [])
        if hasattr(model, "load_temporal_state") and rank < len(temporal) and len(temporal) == world:
            model.load_temporal_state(temporal[rank])
        if rank == 0:
            log(f"[raydrive] resumed from step {step} (epoch {epoch}, position {in_epoch} of {steps_per_epoch})")

    before: dict = {}
    if cfg.run.evaluate_before and restored is None and not cfg.run.benchmark:
        scored = evaluate_on_workers(model, cfg, spec, rank, world, dist)
        before = {"mAP_before": scored.get("mAP"), "NDS_before": scored.get("NDS")} if rank == 0 else {}
        if rank == 0:
            log(f"[raydrive] before training: val mAP {scored['mAP']:.4f} NDS {scored['NDS']:.4f}")
    timer = StepTimer(cfg.run.batch_size, world)
    run_name = ctx.get_experiment_name()
    live = LiveMetrics(run_name, rank)
    last_losses: dict[str, float] = {}
    history: list[dict] = []  # since the last report: step, loss, frames of this rank's batch
    stop = min(total, cfg.run.stop_at_step) if cfg.run.stop_at_step else total
    ddp.train()
    for batch in pipeline.stream(rank, world, epoch, in_epoch, stop - step):
        epoch, in_epoch = int(batch["epoch"][0]), int(batch["step"][0])
        timer.data_ready()
        factor = lr_factor(step, total, cfg.optim)
        for g in optimizer.param_groups:
            g["lr"] = cfg.optim.lr * g["lr_mult"] * factor
        losses = spec.losses(ddp, batch)
        loss = sum(losses.values())
        _check_finite(loss, losses, step, world, dist)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step on inf gradients
            scaler.update(None if cfg.optim.loss_scale == "dynamic" else float(cfg.optim.loss_scale))
        else:
            optimizer.step()
        step += 1
        in_epoch += 1
        timer.step_done()
        last_losses = {k: float(v.detach()) for k, v in losses.items()}
        history.append(
            {"step": step, "loss": float(loss.detach()), "losses": dict(last_losses), "tokens": list(batch["token"])}
        )
        live.publish(step, last_losses, cfg.optim.lr * factor, timer.last(), device)
        if rank == 0 and (step % cfg.run.log_every == 0 or step == total):
            t = timer.last()
            log(
                f"[raydrive] {run_name} step {step}/{total} epoch {epoch} loss {float(loss.detach()):.3f} "
                f"lr {cfg.optim.lr * factor:.2e} grad {float(grad_norm):.2f} step {t['step_time_s']:.2f}s "
                f"data {t['data_wait_fraction']:.0%} {t['samples_per_s_global']:.2f} samples/s"
            )
        if not cfg.run.benchmark and (step % cfg.run.checkpoint_every == 0 or step == stop) and step < total:
            _report(
                model,
                optimizer,
                scaler,
                step,
                epoch,
                in_epoch,
                steps_per_epoch,
                last_losses,
                timer,
                rank,
                world,
                cfg,
                dist,
                {"history": history, "resumed_from": resumed_from},
            )
            history = []
    if step < total:  # paused with run.stop_at_step: the checkpoint above is where a re-run continues
        if rank == 0:
            log(f"[raydrive] paused at step {step} of {total}; run again with the same --name to continue")
        return

    summary = timer.summary(cfg.run.benchmark_warmup) if timer.step_times else {}
    if cfg.run.benchmark:
        if rank == 0:  # Ray keeps only checkpointed reports in the run's result: hand the table over by file
            out = Path(cfg.run.storage_path) / cfg.run.name / "benchmark.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": step, "world_size": world, **summary}, indent=2))
        ray.train.report({"step": step, **summary})
        return
    extra = {**summary, "history": history, "resumed_from": resumed_from, **before}
    if cfg.run.evaluate:
        extra.update(evaluate_on_workers(model, cfg, spec, rank, world, dist))
    # the final checkpoint comes after evaluation, so the run's result carries the metrics
    _report(
        model,
        optimizer,
        scaler,
        step,
        epoch,
        in_epoch,
        steps_per_epoch,
        last_losses,
        timer,
        rank,
        world,
        cfg,
        dist,
        extra,
    )


def _check_finite(loss, losses, step, world, dist) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if world > 1:
        dist.all_reduce(bad)  # every rank stops together
    if bad.item() > 0:
        terms = [k for k, v in losses.items() if not torch.isfinite(v)]
        raise NonFiniteLoss(
            f"loss is NaN/inf at step {step} (terms: {terms or 'on another rank'}); nothing was written for this "
            f"step and the last checkpoint is intact. Lower optim.lr, raise optim.warmup_iters, or check the data"
        )


def _report(
    model,
    optimizer,
    scaler,
    step,
    epoch,
    in_epoch,
    steps_per_epoch,
    last_losses,
    timer,
    rank,
    world,
    cfg,
    dist,
    extra: dict | None = None,
):
    """Checkpoint (rank 0 writes it) and report; every rank calls this at the same steps (a barrier)."""
    import ray.train

    if in_epoch >= steps_per_epoch:  # the epoch is done: resume at the start of the next one
        epoch, in_epoch = epoch + 1, 0

    mine = {
        "rng": ckpt.rng_state(),
        "checksum": param_checksum(model),
        "temporal": model.temporal_state() if hasattr(model, "temporal_state") else {},
    }
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    checksums = [g["checksum"] for g in gathered]
    if any(abs(c - checksums[0]) > 1e-6 * max(1.0, abs(checksums[0])) for c in checksums):
        raise RuntimeError(f"data-parallel ranks diverged at step {step}: parameter checksums {checksums}")
    rng = [g["rng"] for g in gathered]
    metrics = {
        "step": step,
        "epoch": epoch,
        "loss": sum(last_losses.values()),
        **last_losses,
        "param_checksum": checksums[0],
        "ranks_checked": len(checksums),
        **(timer.last() if timer.step_times else {}),
        **(extra or {}),
    }
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            state = {
                "optimizer": optimizer.state_dict(),
                "step": step,
                "epoch": epoch,
                "in_epoch": in_epoch,
                "rng": rng,
                "temporal": [g["temporal"] for g in gathered],
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            d = ckpt.save(
                Path(tmp) / "checkpoint",
                model.state_dict(),
                state,
                {"model": cfg.model_name, "preset": cfg.preset, "step": step, "epoch": epoch, "config": cfg.to_dict()},
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
    else:
        ray.train.report(metrics)


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the parameters (sum of |p| weighted by position), compared across ranks."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        total += float(p.detach().double().abs().sum()) * (1 + (i % 7) / 7)
    return total


def predict(model, pipeline, rank: int, world: int, decode) -> dict[str, dict]:
    """Decode this rank's share of the split, scene by scene in time order."""
    model.eval()
    inner = getattr(model, "module", model)
    if hasattr(inner, "head"):
        inner.head.instance_bank.reset()
    preds = {}
    with torch.no_grad():
        for batch in pipeline.eval_batches(rank, world):
            for token, r in zip(batch["token"], decode(model, batch)):
                preds[token] = {k: v.numpy() for k, v in r.items()}
    model.train()
    return preds


def evaluate_on_workers(model, cfg: TrainConfig, spec, rank: int, world: int, dist) -> dict:
    """Every rank decodes its share of the val split; rank 0 scores all of it with the devkit."""
    from raydrive.data.parquet import read_split, table_to_records
    from raydrive.data.prepare import load_manifest
    from raydrive.eval.detection import evaluate

    pipeline = build_pipeline(cfg, spec, "val", train=False)
    preds = predict(model, pipeline, rank, world, spec.decode)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, preds)
        preds = {k: v for part in gathered for k, v in part.items()}
    if rank != 0:
        return {}
    manifest = load_manifest(cfg.data.prepared)
    records = table_to_records(read_split(Path(cfg.data.prepared) / "infos" / "val"))
    out_dir = Path(tempfile.mkdtemp(prefix="raydrive-eval-"))
    metrics = evaluate(
        preds, records, cfg.data.dataroot or manifest["dataroot"], manifest["version"], "val", output_dir=str(out_dir)
    )
    return {"mAP": metrics["mAP"], "NDS": metrics["NDS"], "eval_metrics": metrics}
