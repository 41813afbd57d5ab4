"""The shared per-worker loop: every model's train loop function is this loop bound to its ModelSpec.

Per optimizer step: `accum_steps` planned micro-batches from Ray Data -> for each, the model's
temporal state for that group of batch slots, `reset_state` where the plan starts a sequence, the
loss terms under autocast, a NaN/inf check and the global mean of every term across ranks, backward
of loss / accum_steps (DDP syncs gradients on the last micro-batch only) -> unscale, clip, AdamW
step with per-group lr multipliers and the schedule. Every `checkpoint_every` steps (and at the end)
rank 0 writes a checkpoint and every rank calls `ray.train.report` (a barrier). A re-run with the
same name and storage path finds the checkpoint through `ray.train.get_checkpoint()` and continues
at the same step, epoch, position in the epoch's plan and temporal state.
Rank 0 also writes TensorBoard scalars (loss terms, lr, grad norm, timing, headline metrics after
each evaluation) into the run folder's tensorboard/ (`tensorboard.py`), flushed at every checkpoint.

The engine knows no model, dataset field or metric: those come from the spec (`raydrive/spec.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from raydrive.config import ConfigError, TrainConfig, batching
from raydrive.data.assets import asset_paths
from raydrive.data.lanes import LaneConfig
from raydrive.data.pipeline import FramePipeline, PipelineConfig
from raydrive.engine import checkpoint as ckpt
from raydrive.engine.ema import ModelEMA
from raydrive.engine.evaluate import evaluate
from raydrive.engine.metrics import LiveMetrics
from raydrive.engine.optim import build_optimizer, build_scaler, clip_and_step, set_lr
from raydrive.engine.progress import Progress
from raydrive.engine.state import TrainState, checkpoint_and_report, restore, resume_point
from raydrive.engine.tensorboard import TensorBoardLog, tensorboard_dir
from raydrive.engine.timer import StepTimer
from raydrive.errors import DeterministicError, worker_failure
from raydrive.spec import KeyFrames, Lanes, ModelSpec


class NonFiniteLoss(DeterministicError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_pipeline(spec: ModelSpec, cfg: TrainConfig, split: str, train: bool, world: int) -> FramePipeline:
    d = cfg.data
    lanes = LaneConfig(
        temporal=isinstance(spec.sampling, Lanes),
        seq_split_num=d.seq_split_num,
        skip_prob=d.skip_prob,
        reverse_prob=d.reverse_prob,
        seed=cfg.run.seed,
    )
    pcfg = PipelineConfig(
        prepared=d.prepared,
        split=split,
        lanes=lanes,
        offsets=spec.sampling.offsets if isinstance(spec.sampling, KeyFrames) else (0,),
        cpus_per_task=d.cpus_per_task,
        prefetch_batches=d.prefetch_batches,
        max_tasks=d.max_tasks,
    )
    if train:
        pcfg.batching = batching(cfg.run, world)
    return FramePipeline(pcfg, spec.build_mapper(cfg, train))


def load_model(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's model on its device: the spec builds it from its prepared assets, then `run.load_from`'s
    weights (if any) are loaded."""
    model = spec.build_model(cfg.model, asset_paths(cfg.data.prepared, spec.assets))
    if cfg.run.load_from:
        state = ckpt.load_weights(cfg.run.load_from, cfg.run.trust_checkpoint)
        result = model.load_state_dict(state, strict=False)
        fresh = tuple(getattr(model, "fresh_on_load", ()))  # e.g. SparseDrive stage 2's planner
        missing = [k for k in result.missing_keys if not (fresh and k.startswith(fresh))]
        if missing or result.unexpected_keys:
            raise ConfigError(
                f"--load-from {cfg.run.load_from} does not fit {cfg.model_name} ({cfg.preset}): "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); "
                f"upstream checkpoints fit the full preset"
            )
    return model.to(device)


class Worker:
    """One rank's training: the model, its optimizer and the run's state."""

    progress = Progress()  # rank 0's channel to the driver's console; _train sets the run's

    def log(self, message: str) -> None:
        """A line for the person at the console (rank 0's board) and the log."""
        self.progress.message(message)

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, rank: int, world: int, device, amp_dtype):
        self.spec, self.cfg, self.rank, self.world, self.device = spec, cfg, rank, world, device
        self.amp_dtype = amp_dtype
        self.batching = batching(cfg.run, world)
        self.pipeline = build_pipeline(spec, cfg, "train", True, world)
        self.model = load_model(spec, cfg, device)
        self.ddp = self.model
        if world > 1:
            ids = [device] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = build_scaler(amp_dtype, device, cfg.optim)
        self.steps_per_epoch = self.pipeline.steps_per_epoch()
        r = cfg.run
        self.total = r.benchmark_steps if r.benchmark else (r.max_steps or r.epochs * self.steps_per_epoch)
        # upstream starts the EMA's update counter at the schedule's length (bevdepth/callbacks/ema.py)
        self.ema = ModelEMA(self.model, cfg.optim.ema_decay, start_updates=self.total) if cfg.optim.ema_decay else None
        self.state = TrainState()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def lanes(self) -> list[dict]:
        """This rank's temporal state per micro-batch group (what a checkpoint keeps)."""
        if self.batching.accum_steps == 1:
            return [self.model.temporal_state()]
        return self.state.lane_states or [{} for _ in range(self.batching.accum_steps)]

    def train_step(self, micro_batches: list[dict]) -> tuple[dict[str, float], float]:
        """One optimizer step over this rank's micro-batches; returns the global mean loss terms and
        the gradient norm."""
        accum = len(micro_batches)
        states = self.lanes() if accum > 1 else None
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for a, batch in enumerate(micro_batches):
            if states is not None:
                self.model.load_temporal_state(states[a])
            if batch["seq_start"].any():
                self.model.reset_state(batch["seq_start"])
            sync = a == accum - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    losses = self.ddp(batch)
                loss = sum(losses.values())
                terms = self._global_terms(losses, loss)
                scaled = loss / accum if accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if states is not None:
                states[a] = self.model.temporal_state()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        if states is not None:
            self.state.lane_states = states
        grad_norm = clip_and_step(self.model, self.optimizer, self.scaler, self.cfg.optim)
        if self.ema is not None:
            self.ema.update(self.model)
        return totals, grad_norm

    def _global_terms(self, losses: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, float]:
        """The mean of every loss term over ranks (one all-reduce); stops every rank together on NaN/inf."""
        names = [*losses, "loss"]
        values = torch.stack([v.detach().float() for v in losses.values()] + [loss.detach().float()])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values)
            values = values / self.world
        if not torch.isfinite(values).all():
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLoss(
                f"loss is NaN/inf at step {self.state.step + 1} (terms: {bad or 'on another rank'}); nothing was "
                f"written for this step and the last checkpoint is intact. Lower optim.lr, raise optim.warmup_iters, "
                f"or check the data"
            )
        return dict(zip(names, values.tolist()))

    def evaluate(self) -> dict:
        self.progress.update(force=True, phase="evaluating on the val split")
        evaluator = self.spec.build_evaluator(self.cfg)
        pipeline = build_pipeline(self.spec, self.cfg, "val", False, self.world)
        storage = self.cfg.run.storage_path
        run_dir = Path(storage) / self.cfg.run.name if storage and "://" not in storage and self.cfg.run.name else None
        with self.ema.swapped_into(self.model) if self.ema is not None else contextlib.nullcontext():
            return evaluate(
                self.model, evaluator, pipeline, self.rank, self.world, self.autocast, run_dir, self.state.step
            )


def _micro_batches(stream, accum: int, timer: StepTimer):
    """Group the pipeline's micro-batches by optimizer step, timing the waits."""
    it = iter(stream)
    while True:
        group = []
        for _ in range(accum):
            t = time.perf_counter()
            batch = next(it, None)
            timer.data_wait(time.perf_counter() - t)
            if batch is None:
                return
            group.append(batch)
        yield group


def train_loop(spec: ModelSpec, config: dict) -> None:
    """Ray Train's train_loop_per_worker for every registered model (bound through `ModelSpec.train_loop`).
    A failure that a retry would repeat leaves as a one-line FatalRunError, which Ray Train does not
    retry; its traceback goes to the run folder's log (`raydrive/errors.py`)."""
    import ray.train

    cfg = TrainConfig.from_dict(config["config"], spec.config_cls, spec.mapper_cls)
    ctx = ray.train.get_context()
    # a layout hint from DDP's reducer when a CPU convolution returns a channels-last weight gradient
    # (1x1 strided convs): nothing a user can act on, and the gradient is correct
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        _train(spec, cfg, config, ctx)
    except Exception as e:
        storage = cfg.run.storage_path
        run_dir = Path(storage) / (cfg.run.name or ctx.get_experiment_name()) if storage else None
        failure = worker_failure(e, run_dir, ctx.get_world_rank())
        if failure is e:
            raise
        raise failure from None


def _train(spec: ModelSpec, cfg: TrainConfig, config: dict, ctx) -> None:
    import ray.train

    from raydrive.accel import PRECISIONS, worker_device

    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config["accelerator"])
    seed_everything(cfg.run.seed + rank)
    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    w = Worker(spec, cfg, rank, world, device, PRECISIONS[config["precision"]])
    w.progress = Progress(config.get("progress"), rank)
    restored = resume_point(ray.train.get_checkpoint(), config.get("resume_from"))
    if restored is not None:
        restore(w, restored)
    w.tb = TensorBoardLog(_tensorboard_dir(cfg, ctx.get_experiment_name()), rank, w.state.resumed_from)
    try:
        before = {}
        if cfg.run.evaluate and cfg.run.evaluate_before and restored is None and not cfg.run.benchmark:
            before = _headline(w, w.evaluate(), "before training", suffix="_before")
        run_steps(w, ctx.get_experiment_name())
        if w.state.step < w.total:  # paused with run.stop_at_step: the last checkpoint is where a re-run continues
            if rank == 0:
                w.log(
                    f"[raydrive] paused at step {w.state.step} of {w.total}; run again with the same --name to continue"
                )
            return
        finish(w, before)
    finally:
        w.tb.close()


def _tensorboard_dir(cfg: TrainConfig, run_name: str) -> Path | None:
    """The run folder's tensorboard/ (the driver resolved the storage path); None on object storage, which
    SummaryWriter cannot write."""
    storage = cfg.run.storage_path
    if not storage or "://" in storage:
        return None
    return tensorboard_dir(storage, cfg.run.name or run_name)


def run_steps(w: Worker, run_name: str) -> None:
    cfg, s = w.cfg, w.state
    stop = min(w.total, cfg.run.stop_at_step) if cfg.run.stop_at_step else w.total
    w.timer = timer = StepTimer(w.batching.slots_per_worker, w.world)
    live = LiveMetrics(run_name, w.rank)
    w.ddp.train()
    stream = w.pipeline.stream(w.rank, s.epoch, s.in_epoch, stop - s.step)
    for batches in _micro_batches(stream, w.batching.accum_steps, timer):
        s.epoch, s.in_epoch = int(batches[0]["epoch"][0]), int(batches[0]["step"][0])
        lr = set_lr(w.optimizer, s.step, w.total, cfg.optim)
        terms, grad_norm = w.train_step(batches)
        s.step, s.in_epoch = s.step + 1, s.in_epoch + 1
        timer.step_done()
        loss = terms.pop("loss")
        s.last_losses = terms
        tokens = [t for b in batches for t in b["token"]]
        s.history.append({"step": s.step, "loss": loss, "losses": dict(terms), "tokens": tokens, "lr": lr})
        live.publish(s.step, terms, lr, timer.last(), w.device)
        w.tb.step(s.step, terms, lr, grad_norm, timer.last())
        t = timer.last()
        w.progress.update(
            force=s.step == stop,
            step=s.step,
            total=w.total,
            epoch=s.epoch,
            loss=loss,
            samples_per_s=t["samples_per_s_global"],
            data_wait=t["data_wait_fraction"],
            phase="training",
        )
        if w.rank == 0 and (s.step % cfg.run.log_every == 0 or s.step == w.total):
            w.progress.log(
                f"[raydrive] {run_name} step {s.step}/{w.total} epoch {s.epoch} loss {loss:.3f} lr {lr:.2e} "
                f"grad {grad_norm:.2f} step {t['step_time_s']:.2f}s data {t['data_wait_fraction']:.0%} "
                f"{t['samples_per_s_global']:.2f} samples/s"
            )
        if not cfg.run.benchmark and (s.step % cfg.run.checkpoint_every == 0 or s.step == stop) and s.step < w.total:
            _report(w, {})


def _report(w: Worker, extra: dict) -> None:
    s = w.state
    timing = w.timer.last() if w.timer.step_times else {}
    losses = {"loss": sum(s.last_losses.values()), **s.last_losses} if s.last_losses else {}
    metrics = {**losses, **timing, "history": s.history, "resumed_from": s.resumed_from, "total_steps": w.total}
    metrics.update(extra)
    checkpoint_and_report(w, metrics)
    s.history = []
    w.tb.flush()


def _headline(w: Worker, metrics: dict, when: str, suffix: str = "") -> dict:
    """The evaluator's headline metrics (rank 0 logs them and writes them to TensorBoard at the current
    step, 0 before training); `suffix` names them in the report. The console gets the figures before
    training at once; those after training come with the driver's final table."""
    if w.rank != 0:
        return {}
    headline = w.spec.build_evaluator(w.cfg).headline
    line = f"[raydrive] {when}: val " + "  ".join(f"{k} {float(metrics[k]):.4f}" for k in headline)
    (w.log if suffix else w.progress.log)(line)
    values = {k: float(metrics[k]) for k in headline}
    w.tb.metrics(w.state.step, values)
    w.tb.flush()
    return {f"{k}{suffix}": v for k, v in values.items()}


def finish(w: Worker, before: dict) -> None:
    """Benchmark table, or evaluation and the final checkpoint (after evaluation, so that the run's
    result carries the metrics)."""
    import ray.train

    cfg = w.cfg
    summary = w.timer.summary(cfg.run.benchmark_warmup) if w.timer.step_times else {}
    if cfg.run.benchmark:
        if w.rank == 0:  # Ray keeps only checkpointed reports in the run's result: hand the table over by file
            out = Path(cfg.run.storage_path) / cfg.run.name / "benchmark.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": w.state.step, "world_size": w.world, **summary}, indent=2))
        ray.train.report({"step": w.state.step, **summary})
        return
    extra = {**summary, **before, "finished": True}
    if cfg.run.evaluate:
        metrics = w.evaluate()
        extra.update(_headline(w, metrics, "after training"))
        if w.rank == 0:
            extra["eval_metrics"] = metrics
    _report(w, extra)
