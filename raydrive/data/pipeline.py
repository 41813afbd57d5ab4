"""From prepared parquet to training batches inside Ray Train workers, through Ray Data.

Design
------
1. Every worker reads the split's info table (small: a few KB per frame) with pyarrow, only the
   columns its model's frame mapper asks for, and computes the epoch's sampling plan (`lanes.py`).
   The plan is a pure function of (seed, epoch, global batch), so all workers agree without talking,
   and a resumed run slices it at (epoch, step).
2. The worker takes its own rows in plan order (step-major, then micro-batch, then slot), joins the
   frames at the model's key-frame offsets (`column@-1`, ...), cuts them into arrow blocks of a few
   steps each and hands them to `ray.data.from_arrow`. Per-frame work is a `map_batches` task per
   block running the model's mapper (decode, augment, tensorise): at most `max_tasks` in flight per
   worker, so that decoding does not starve training on small machines; several epochs share one
   dataset, because Ray Data's executor runs inside the training process and costs it time per block
   and per dataset (its scheduling loop is held to one step per 25 ms: `executor_throttle.py`, measured
   there). These tasks are ordinary Ray tasks: on a cluster they run on any node with CPUs
   (the image paths must be visible there, as with any shared nuScenes tree).
3. `preserve_order` keeps the planned order through the parallel tasks, and `collate` checks it
   anyway (step, micro-batch and slot columns) and raises instead of silently feeding a temporal
   model frames out of order. The mapper's ragged fields are collated into lists of tensors.

`streaming_split` is not used: it gives no ordering guarantee, which temporal models need.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raydrive.config import Batching
from raydrive.data.infos import DataError
from raydrive.data.lanes import LaneConfig, Plan, eval_plan, offset_frames, plan_epoch, scene_chunks
from raydrive.data.parquet import read_split
from raydrive.data.prepare import load_manifest
from raydrive.spec import FrameMapper

# I/O failures that may pass (network mounts); any other mapper error repeats on every retry
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN, errno.EINTR}
# what every batch carries besides the mapper's output: identity and the plan
IDENTITY = ("token", "scene_token")
PLAN_KEYS = ("frame", "epoch", "step", "micro", "slot", "seq_start", "seq_id", "aug_seed")


@dataclass
class PipelineConfig:
    prepared: str
    split: str = "train"
    batching: Batching = field(default_factory=lambda: Batching(1, 1, 1, 1))
    lanes: LaneConfig = field(default_factory=LaneConfig)
    offsets: tuple[int, ...] = (0,)  # key frames joined to each planned frame (KeyFrames sampling)
    prefetch_batches: int = 2
    cpus_per_task: float = 1.0
    max_tasks: int = 2  # decode tasks in flight per worker: enough to stay ahead, few enough not to starve training
    steps_per_block: int = 4  # steps decoded per Ray Data task: fewer blocks, less executor overhead in the trainer


class FramePipeline:
    """One split of a prepared folder, served as planned micro-batches through a model's mapper."""

    def __init__(self, cfg: PipelineConfig, mapper: FrameMapper):
        self.cfg, self.mapper = cfg, mapper
        prepared = Path(cfg.prepared).resolve()
        self.manifest = load_manifest(prepared)
        if cfg.split not in self.manifest["splits"]:
            raise DataError(
                f"prepared folder {prepared} has no split {cfg.split!r} (it has {sorted(self.manifest['splits'])})"
            )
        columns = list(dict.fromkeys([*IDENTITY, "timestamp", *mapper.columns]))
        self.table = read_split(prepared / "infos" / cfg.split, columns=columns)
        if self.table.num_rows == 0:
            raise DataError(f"split {cfg.split!r} in {prepared} is empty; re-run `raydrive prepare`")
        self.scenes = self.table.column("scene_token").to_pylist()
        self.timestamps = self.table.column("timestamp").to_numpy()
        self.chunks = scene_chunks(self.scenes, self.timestamps, cfg.lanes.seq_split_num)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def batch_size(self) -> int:
        return self.cfg.batching.batch_size

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: every global batch slot gets one frame per step."""
        return max(1, len(self) // self.cfg.batching.global_batch)

    def plan(self, epoch: int) -> Plan:
        return plan_epoch(self.chunks, self.cfg.batching, epoch, self.cfg.lanes)

    def rows(self, epoch: int, rank: int, start_step: int = 0) -> pa.Table:
        """This worker's info rows in consumption order, with the plan's columns appended."""
        return self._with_plan(self.plan(epoch).rows(rank, start_step), epoch)

    def eval_rows(self, rank: int, world_size: int) -> pa.Table:
        """Every frame exactly once for evaluation (see `lanes.eval_plan`)."""
        return self._with_plan(eval_plan(scene_chunks(self.scenes, self.timestamps, 1), rank, world_size), epoch=0)

    def _with_plan(self, plan_rows: dict[str, np.ndarray], epoch: int) -> pa.Table:
        frames = np.asarray(plan_rows["frame"], dtype=np.int64)
        rows = self.table.take(pa.array(frames, type=pa.int64()))
        for offset in self.cfg.offsets:
            if offset != 0:
                other = self.table.take(pa.array(offset_frames(self.scenes, self.timestamps, offset)[frames]))
                for name in self.table.column_names:
                    rows = rows.append_column(f"{name}@{offset}", other.column(name))
        for name, values in plan_rows.items():
            rows = rows.append_column(name, pa.array(np.asarray(values)))
        return rows.append_column("epoch", pa.array(np.full(len(frames), epoch, dtype=np.int64)))

    def _dataset(self, rows: pa.Table, block_rows: int):
        """One Ray Data block (one map task) per `block_rows` rows, in order."""
        import ray.data

        from raydrive.data import executor_throttle

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        executor_throttle.install(ctx)  # the executor thread shares the trainer's CPU
        blocks = [rows.slice(i, block_rows) for i in range(0, rows.num_rows, block_rows)]
        ds = ray.data.from_arrow(blocks) if blocks else ray.data.from_arrow(rows)
        return ds.map_batches(
            map_block,
            batch_size=None,
            batch_format="numpy",
            fn_kwargs={"mapper": self.mapper},
            num_cpus=self.cfg.cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=self.cfg.max_tasks),
        )

    def stream(self, rank: int, epoch: int, start_step: int, num_steps: int) -> Iterator[dict]:
        """The micro-batches of `num_steps` optimizer steps from (epoch, step) on, crossing epoch
        boundaries inside one Ray Dataset (a new dataset per epoch costs seconds of start-up). Each
        epoch still follows its own plan; batches carry `epoch`, `step` (within the epoch), `micro`."""
        per_step = self.cfg.batching.slots_per_worker
        if num_steps <= 0:
            return
        tables, count = [], 0
        while count < num_steps:
            rows = self.rows(epoch, rank, start_step)
            take = min(rows.num_rows, (num_steps - count) * per_step)
            tables.append(rows.slice(0, take))
            count += take // per_step
            epoch, start_step = epoch + 1, 0
        rows = pa.concat_tables(tables)
        block = per_step * self.cfg.steps_per_block
        yield from self._iterate(self._dataset(rows, block), self.batch_size, rows)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[dict]:
        """Batches of one frame for evaluation (see `eval_rows`)."""
        rows = self.eval_rows(rank, world_size)
        if rows.num_rows:
            yield from self._iterate(self._dataset(rows, 1), 1, rows)

    def _iterate(self, ds, batch_size: int, rows: pa.Table) -> Iterator[dict]:
        steps = rows.column("step").to_numpy()[::batch_size]
        micros = rows.column("micro").to_numpy()[::batch_size]
        batches = ds.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=self.cfg.prefetch_batches
        )
        for i, batch in enumerate(batches):
            yield collate(batch, self.mapper, expected=(int(steps[i]), int(micros[i])))


def map_block(rows: dict[str, np.ndarray], mapper: FrameMapper) -> dict[str, np.ndarray]:
    """Ray Data task body: the model's mapper, plus the identity and plan columns every batch carries.
    A mapper error that is not already a DataError becomes one naming the samples of the block (only
    its text crosses back to the worker); transient I/O errors (a flaky network mount) stay as they
    are, since a retry may cure them."""
    try:
        out = mapper(rows)
    except DataError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            raise
        tokens = [str(t) for t in rows.get("token", [])]
        shown = ", ".join(tokens[:4]) + (f" (+{len(tokens) - 4} more)" if len(tokens) > 4 else "")
        raise DataError(
            f"the {type(mapper).__name__} frame mapper failed on sample(s) {shown}: {type(e).__name__}: {e}; "
            f"check these frames' files and info records"
        ) from e
    for key in (*IDENTITY, *PLAN_KEYS):
        out[key] = np.asarray(rows[key])
    return out


def arrow_to_numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """An arrow table as the numpy batch Ray Data would hand to a mapper (for non-Ray loaders)."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if isinstance(col.type, pa.FixedShapeTensorType):
            out[name] = col.to_numpy_ndarray()
        elif pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            obj = np.empty(len(col), dtype=object)
            obj[:] = [
                np.array(v, dtype=object if pa.types.is_string(col.type.value_type) else None) for v in col.to_pylist()
            ]
            out[name] = obj
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def collate(batch: dict[str, np.ndarray], mapper: FrameMapper, expected: tuple[int, int] | None = None) -> dict:
    """numpy batch from Ray Data -> torch tensors (lists for the mapper's ragged fields, strings stay
    strings).

    Checks that the batch is exactly one planned micro-batch in slot order; a temporal model fed
    frames out of order would silently learn garbage, so this raises instead.
    """
    import torch

    steps, micros, slots = (np.asarray(batch[k]) for k in ("step", "micro", "slot"))
    n = len(slots)
    first = int(micros[0]) * n if n else 0
    in_order = len(set(steps.tolist())) == 1 and len(set(micros.tolist())) == 1
    in_order = in_order and slots.tolist() == list(range(first, first + n))
    if not in_order or (expected is not None and (int(steps[0]), int(micros[0])) != expected):
        raise RuntimeError(
            f"Ray Data delivered frames out of plan order (steps {steps.tolist()}, micro-batches {micros.tolist()}, "
            f"slots {slots.tolist()}, expected (step, micro) {expected}); is DataContext.execution_options."
            f"preserve_order on?"
        )
    strings = (*IDENTITY, *mapper.strings)
    out: dict = {}
    for k, v in batch.items():
        if k in mapper.ragged:
            shape = (-1, *mapper.ragged[k])
            out[k] = [torch.from_numpy(np.require(np.asarray(x), requirements=("C", "W"))).reshape(shape) for x in v]
        elif k in strings:
            out[k] = [str(x) for x in v]
        else:
            out[k] = torch.from_numpy(np.require(v, requirements=("C", "W")))
    return out
