"""From prepared parquet to training batches inside Ray Train workers, through Ray Data.

Design
------
1. Every worker reads the split's info table (small: a few KB per frame) with pyarrow and computes the
   epoch's lane plan (`lanes.py`). The plan is a pure function of (seed, epoch, world size, batch
   size), so all workers agree without talking, and a resumed run slices it at (epoch, step).
2. The worker takes its own rows in plan order (step-major, slot-minor), cuts them into arrow
   blocks of a few steps each and hands them to `ray.data.from_arrow`. Per-frame work is a
   `map_batches` task per block (at most `max_tasks` in flight per worker, so that decoding does not
   starve training on small machines; several epochs share one dataset, because Ray Data's executor
   runs inside the training process and costs it time per block and per dataset): JPEG decode,
   resize/crop/flip/rotate folded into the projection matrices, photometric distortion,
   normalisation, BEV augmentation of boxes, depth points moved into the augmented image.
   These tasks are ordinary Ray tasks: on a cluster they run on any node with CPUs (the
   image paths must be visible there, as with any shared nuScenes tree).
3. `preserve_order` keeps the planned order through the parallel tasks, and `collate` checks it
   anyway (step and slot columns) and raises instead of silently feeding a temporal model frames
   out of order. Ragged fields (boxes, labels, ids, depth points) are collated into lists.

`streaming_split` is not used: it gives no ordering guarantee, which temporal models need.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raydrive.data import geometry as geo
from raydrive.data.augment import (
    AugConfig,
    apply_bev_aug,
    apply_image_aug,
    draw_bev_aug,
    draw_image_aug,
    ida_matrix,
    normalize,
    photometric,
)
from raydrive.data.constants import CLASSES, NUM_CAMS
from raydrive.data.depth_gt import depth_file, read_depth_gt
from raydrive.data.infos import DataError, resolve_path
from raydrive.data.lanes import LaneConfig, Plan, plan_epoch, scene_chunks
from raydrive.data.parquet import read_split
from raydrive.data.prepare import load_manifest

# Columns the frame loader needs; the rest of the record stays in parquet.
LOADER_COLUMNS = (
    "token",
    "scene_token",
    "timestamp",
    "lidar2ego_translation",
    "lidar2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "cam_data_path",
    "cam_width",
    "cam_height",
    "cam_intrinsic",
    "cam_sensor2lidar_rotation",
    "cam_sensor2lidar_translation",
    "gt_boxes",
    "gt_names",
    "gt_velocity",
    "num_lidar_pts",
    "num_radar_pts",
    "instance_inds",
)


@dataclass
class PipelineConfig:
    prepared: str
    split: str = "train"
    batch_size: int = 1  # per worker
    lanes: LaneConfig = field(default_factory=LaneConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    dataroot: str | None = None  # default: the one recorded in the manifest
    with_depth: bool = True
    max_range: float = 55.0  # BEV distance filter on boxes (Sparse4D keeps <= 55 m)
    only_valid: bool = True  # drop boxes without lidar or radar points
    prefetch_batches: int = 2
    cpus_per_task: float = 1.0
    max_tasks: int = 2  # decode tasks in flight per worker: enough to stay ahead, few enough not to starve training
    steps_per_block: int = 4  # steps decoded per Ray Data task: fewer blocks, less executor overhead in the trainer


@dataclass(frozen=True)
class LoaderConfig:
    """What a Ray Data task needs to turn info rows into tensors (plain data: it is pickled to tasks)."""

    dataroot: str
    depth_dir: str | None
    aug: AugConfig
    max_range: float
    only_valid: bool


class FramePipeline:
    """One split of a prepared folder, served as planned, augmented batches."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        prepared = Path(cfg.prepared).resolve()
        self.manifest = load_manifest(prepared)
        if cfg.split not in self.manifest["splits"]:
            raise DataError(
                f"prepared folder {prepared} has no split {cfg.split!r} (it has {sorted(self.manifest['splits'])})"
            )
        self.table = read_split(prepared / "infos" / cfg.split, columns=list(LOADER_COLUMNS))
        if self.table.num_rows == 0:
            raise DataError(f"split {cfg.split!r} in {prepared} is empty; re-run `raydrive prepare`")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        timestamps = self.table.column("timestamp").to_numpy()
        self.chunks = scene_chunks(self.table.column("scene_token").to_pylist(), timestamps, cfg.lanes.seq_split_num)
        depth_dir = prepared / "depth_gt"
        self.loader_cfg = LoaderConfig(
            dataroot=str(Path(cfg.dataroot or self.manifest["dataroot"]).resolve()),
            depth_dir=str(depth_dir) if cfg.with_depth and depth_dir.is_dir() else None,
            aug=cfg.aug,
            max_range=cfg.max_range,
            only_valid=cfg.only_valid,
        )
        if cfg.with_depth and self.loader_cfg.depth_dir is None:
            raise DataError(f"{prepared} has no depth_gt folder; re-run `raydrive prepare` with depth GT on")

    def __len__(self) -> int:
        return self.table.num_rows

    def steps_per_epoch(self, world_size: int) -> int:
        return max(1, len(self) // (world_size * self.cfg.batch_size))

    def plan(self, epoch: int, world_size: int) -> Plan:
        return plan_epoch(self.chunks, world_size, self.cfg.batch_size, epoch, self.cfg.lanes)

    def rows(self, epoch: int, rank: int, world_size: int, start_step: int = 0) -> pa.Table:
        """This worker's info rows in consumption order, with the plan's columns appended."""
        return self._with_plan(self.plan(epoch, world_size).rows(rank, start_step), epoch)

    def eval_rows(self, rank: int, world_size: int) -> pa.Table:
        """Every frame exactly once for evaluation: scene k goes to rank k % world_size, frames in time
        order, one slot, a sequence start on each scene's first frame."""
        frames = [
            c
            for k, c in enumerate(
                scene_chunks(self.table.column("scene_token").to_pylist(), self.table.column("timestamp").to_numpy(), 1)
            )
            if k % world_size == rank
        ]
        idx = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([np.arange(len(c)) == 0 for c in frames]) if frames else np.zeros(0, dtype=bool)
        plan_rows = {
            "frame": idx,
            "seq_start": starts,
            "seq_id": np.cumsum(starts),
            "aug_seed": np.zeros(len(idx), np.int64),
            "step": np.arange(len(idx)),
            "slot": np.zeros(len(idx), np.int64),
        }
        return self._with_plan(plan_rows, epoch=0)

    def _with_plan(self, plan_rows: dict[str, np.ndarray], epoch: int) -> pa.Table:
        rows = self.table.take(pa.array(plan_rows["frame"], type=pa.int64()))
        for name, values in plan_rows.items():
            rows = rows.append_column(name, pa.array(np.asarray(values)))
        return rows.append_column("epoch", pa.array(np.full(len(plan_rows["frame"]), epoch, dtype=np.int64)))

    def _dataset(self, rows: pa.Table, block_rows: int):
        """One Ray Data block (one map task) per `block_rows` rows, in order."""
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        blocks = [rows.slice(i, block_rows) for i in range(0, rows.num_rows, block_rows)]
        ds = ray.data.from_arrow(blocks) if blocks else ray.data.from_arrow(rows)
        return ds.map_batches(
            load_frames,
            batch_size=None,
            batch_format="numpy",
            fn_kwargs={"cfg": self.loader_cfg},
            num_cpus=self.cfg.cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=self.cfg.max_tasks),
        )

    def batches(self, epoch: int, rank: int, world_size: int, start_step: int = 0) -> Iterator[dict]:
        """Collated torch batches for one worker and epoch, in step order."""
        rows = self.rows(epoch, rank, world_size, start_step)
        yield from self._iterate(self._dataset(rows, self.block_rows), self.cfg.batch_size, rows)

    @property
    def block_rows(self) -> int:
        return self.cfg.batch_size * self.cfg.steps_per_block

    def stream(self, rank: int, world_size: int, epoch: int, start_step: int, num_batches: int) -> Iterator[dict]:
        """`num_batches` batches from (epoch, step) on, crossing epoch boundaries inside one Ray Dataset
        (a new dataset per epoch costs seconds of start-up). Each epoch still follows its own plan;
        batches carry `epoch` and `step` (the step within the epoch)."""
        tables, count = [], 0
        while count < num_batches:
            rows = self.rows(epoch, rank, world_size, start_step)
            take = min(rows.num_rows, (num_batches - count) * self.cfg.batch_size)
            tables.append(rows.slice(0, take))
            count += take // self.cfg.batch_size
            epoch, start_step = epoch + 1, 0
        rows = pa.concat_tables(tables)
        yield from self._iterate(self._dataset(rows, self.block_rows), self.cfg.batch_size, rows)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[dict]:
        """Batches of one frame for evaluation (see `eval_rows`)."""
        rows = self.eval_rows(rank, world_size)
        if rows.num_rows:
            yield from self._iterate(self._dataset(rows, 1), 1, rows)

    def _iterate(self, ds, batch_size: int, rows: pa.Table) -> Iterator[dict]:
        expected = rows.column("step").to_numpy()[::batch_size]
        for i, batch in enumerate(
            ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=self.cfg.prefetch_batches)
        ):
            yield collate(batch, expected_step=int(expected[i]))


def arrow_to_numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """An arrow table as the numpy batch Ray Data would hand to `load_frames` (for non-Ray loaders)."""
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


def _stack_ragged(values, inner: tuple[int, ...], dtype) -> np.ndarray:
    arr = np.array([np.asarray(v, dtype=dtype) for v in values], dtype=dtype) if len(values) else np.zeros(0, dtype)
    return arr.reshape(-1, *inner) if inner else arr.reshape(-1)


def load_frames(batch: dict[str, np.ndarray], cfg: LoaderConfig) -> dict[str, np.ndarray]:
    """Ray Data task body: decode, augment and tensorise a block of planned info rows."""
    from PIL import Image

    n = len(batch["token"])
    fh, fw = cfg.aug.final_hw
    out: dict[str, list] = {
        k: []
        for k in (
            "img",
            "projection_mat",
            "image_wh",
            "focal",
            "T_global",
            "T_global_inv",
            "timestamp",
            "gt_boxes",
            "gt_labels",
            "instance_ids",
            "depth",
        )
    }
    for i in range(n):
        seed = int(batch["aug_seed"][i])
        rng_geo = np.random.default_rng(seed)
        rng_photo = np.random.default_rng([seed, int(batch["frame"][i]), int(batch["epoch"][i])])
        widths, heights = batch["cam_width"][i], batch["cam_height"][i]
        img_aug = draw_image_aug(cfg.aug, int(widths[0]), int(heights[0]), rng_geo)
        bev = draw_bev_aug(cfg.aug, rng_geo)
        bev_inv = np.linalg.inv(bev)
        ida = np.eye(4)
        ida[:3, :3] = ida_matrix(img_aug)  # acts on (u z, v z, z): the pixel shift multiplies z
        imgs, projs, focals, depth_rows = [], [], [], []
        for c in range(NUM_CAMS):
            path = resolve_path(cfg.dataroot, str(batch["cam_data_path"][i][c]))
            try:
                with Image.open(path) as im:
                    if im.size != (int(widths[c]), int(heights[c])):
                        raise DataError(
                            f"image {path} is {im.size[0]}x{im.size[1]}, its info record says "
                            f"{int(widths[c])}x{int(heights[c])}; re-run `raydrive prepare`"
                        )
                    # let libjpeg decode at a reduced DCT scale that is still >= the resize target: several
                    # times cheaper at 256x704 from 1600x900; the resize below targets absolute dimensions,
                    # so the augmentation matrix (in original pixels) is unchanged
                    im.draft("RGB", img_aug.resize_dims)
                    pixels = np.asarray(apply_image_aug(im.convert("RGB"), img_aug))
            except FileNotFoundError:
                raise DataError(
                    f"missing image {path} (sample {batch['token'][i]}); "
                    f"check --dataroot or the mount of the nuScenes tree on this node"
                ) from None
            except OSError as e:
                raise DataError(f"cannot decode image {path} (sample {batch['token'][i]}): {e}") from None
            if cfg.aug.train and cfg.aug.photometric:
                pixels = photometric(pixels, rng_photo)
            imgs.append(normalize(pixels))
            k4 = np.eye(4)
            k4[:3, :3] = batch["cam_intrinsic"][i][c]
            s2l = geo.transform(batch["cam_sensor2lidar_rotation"][i][c], batch["cam_sensor2lidar_translation"][i][c])
            projs.append(ida @ k4 @ np.linalg.inv(s2l) @ bev_inv)
            focals.append(img_aug.resize[0] * batch["cam_intrinsic"][i][c][0, 0])
            if cfg.depth_dir is not None:
                uvd = read_depth_gt(depth_file(Path(cfg.depth_dir), str(batch["cam_data_path"][i][c])))
                uv = uvd[:, :2] @ ida[:2, :2].T + ida[:2, 2]
                keep = (uv[:, 0] >= 0) & (uv[:, 0] < fw) & (uv[:, 1] >= 0) & (uv[:, 1] < fh)
                depth_rows.append(np.concatenate([np.full((keep.sum(), 1), c), uv[keep], uvd[keep, 2:3]], 1))
        l2g = geo.lidar_to_global(
            {
                k: batch[k][i]
                for k in (
                    "ego2global_rotation",
                    "ego2global_translation",
                    "lidar2ego_rotation",
                    "lidar2ego_translation",
                )
            }
        )
        boxes = _stack_ragged(batch["gt_boxes"][i], (7,), np.float64)
        vel = np.nan_to_num(_stack_ragged(batch["gt_velocity"][i], (2,), np.float64))
        names = np.array([str(x) for x in batch["gt_names"][i]], dtype=object)
        keep = np.isin(names, CLASSES) & (np.linalg.norm(boxes[:, :2], axis=1) <= cfg.max_range)
        if cfg.only_valid:
            pts = _stack_ragged(batch["num_lidar_pts"][i], (), np.int64) + _stack_ragged(
                batch["num_radar_pts"][i], (), np.int64
            )
            keep &= pts > 0
        boxes9 = apply_bev_aug(np.concatenate([boxes, vel], axis=1)[keep], bev)
        out["img"].append(np.stack(imgs))
        out["projection_mat"].append(np.stack(projs).astype(np.float32))
        out["image_wh"].append(np.tile(np.array([fw, fh], dtype=np.float32), (NUM_CAMS, 1)))
        out["focal"].append(np.array(focals, dtype=np.float32))
        out["T_global"].append(l2g @ bev_inv)
        out["T_global_inv"].append(np.linalg.inv(l2g @ bev_inv))
        out["timestamp"].append(int(batch["timestamp"][i]) / 1e6)
        out["gt_boxes"].append(boxes9.astype(np.float32))
        out["gt_labels"].append(np.array([CLASSES.index(x) for x in names[keep]], dtype=np.int64))
        out["instance_ids"].append(_stack_ragged(batch["instance_inds"][i], (), np.int64)[keep])
        out["depth"].append(
            np.concatenate(depth_rows).astype(np.float32) if depth_rows else np.zeros((0, 4), np.float32)
        )
    result = {
        k: np.stack(v) if k not in ("gt_boxes", "gt_labels", "instance_ids", "depth") else _ragged(v)
        for k, v in out.items()
    }
    for k in ("token", "scene_token", "seq_start", "seq_id", "step", "slot", "frame", "epoch"):
        result[k] = np.asarray(batch[k])
    return result


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    obj = np.empty(len(arrays), dtype=object)
    obj[:] = arrays
    return obj


RAGGED_KEYS = ("gt_boxes", "gt_labels", "instance_ids", "depth")
STRING_KEYS = ("token", "scene_token")


def collate(batch: dict[str, np.ndarray], expected_step: int | None = None) -> dict:
    """numpy batch from Ray Data -> torch tensors (lists for ragged fields, strings stay strings).

    Checks that the batch is exactly one planned step in slot order; a temporal model fed frames out
    of order would silently learn garbage, so this raises instead.
    """
    import torch

    steps, slots = np.asarray(batch["step"]), np.asarray(batch["slot"])
    if (
        len(set(steps.tolist())) != 1
        or slots.tolist() != list(range(len(slots)))
        or (expected_step is not None and int(steps[0]) != expected_step)
    ):
        raise RuntimeError(
            f"Ray Data delivered frames out of plan order (steps {steps.tolist()}, slots {slots.tolist()}, "
            f"expected step {expected_step}); is DataContext.execution_options.preserve_order on?"
        )
    out: dict = {}
    for k, v in batch.items():
        if k in RAGGED_KEYS:
            out[k] = [torch.from_numpy(np.require(np.asarray(x), requirements=("C", "W"))) for x in v]
        elif k in STRING_KEYS:
            out[k] = [str(x) for x in v]
        else:
            out[k] = torch.from_numpy(np.require(v, requirements=("C", "W")))
    for k, shape in (("gt_boxes", (-1, 9)), ("depth", (-1, 4))):
        out[k] = [x.reshape(shape) for x in out[k]]
    return out


__all__ = ["FramePipeline", "PipelineConfig", "LaneConfig", "AugConfig", "collate", "load_frames"]
