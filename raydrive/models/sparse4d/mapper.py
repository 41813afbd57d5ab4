"""Sparse4D's frame mapper: planned info rows -> the tensors the model reads (upstream's pipeline
up to `NuScenesSparse4DAdaptor`, `projects/configs/sparse4dv3_temporal_r50_1x8_bs6_256x704.py`).

Per frame: one image augmentation draw for all six cameras, seeded by the sequence (so every frame of
a sequence gets the same geometry: `keep_consistent_seq_aug`), folded into `projection_mat`;
photometric distortion; ImageNet normalisation in RGB; BEV rotation of boxes and velocities with
lidar2global right-multiplied by its inverse; boxes in the key-frame lidar frame, the 10 classes,
within 55 m, with lidar or radar points; lidar depth points moved into the augmented image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydrive.config import TrainConfig
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
from raydrive.data.frames import frames_to_block, read_camera_image, stack_ragged
from raydrive.data.infos import DataError, resolve_path
from raydrive.data.prepare import load_manifest

COLUMNS = (
    "timestamp", "lidar2ego_translation", "lidar2ego_rotation", "ego2global_translation", "ego2global_rotation",
    "cam_data_path", "cam_width", "cam_height", "cam_intrinsic", "cam_sensor2lidar_rotation",
    "cam_sensor2lidar_translation", "gt_boxes", "gt_names", "gt_velocity", "num_lidar_pts", "num_radar_pts",
    "instance_inds",
)  # fmt: skip


@dataclass
class Sparse4DMapperConfig:
    photometric: bool = True  # brightness, contrast, saturation, hue, channel swap (train only)
    image_flip: bool = True  # horizontal image flip with p .5 (train only)
    rot_lim_deg: tuple[float, float] = (-5.4, 5.4)  # image rotation (train only)
    bev_rot: tuple[float, float] = (-0.3925, 0.3925)  # BEV rotation of the scene (train only)
    with_depth: bool = True  # lidar depth points for the auxiliary dense depth loss (train only)
    max_range: float = 55.0  # BEV distance filter on boxes
    only_valid: bool = True  # drop boxes without points (see valid_points)
    # "lidar_or_radar": the converter's valid_flag (Sparse4D's use_valid_flag=True); "lidar": lidar points
    # only (SparseDrive's dataset with use_valid_flag=False)
    valid_points: str = "lidar_or_radar"


class Sparse4DMapper:
    """Plain data and one method: it is pickled into every Ray Data task."""

    columns = COLUMNS
    ragged = {"gt_boxes": (9,), "gt_labels": (), "instance_ids": (), "depth": (4,)}
    strings = ()

    def __init__(self, cfg: TrainConfig, train: bool):
        m = cfg.mapper
        prepared = Path(cfg.data.prepared).resolve()
        self.dataroot = str(Path(cfg.data.dataroot or load_manifest(prepared)["dataroot"]).resolve())
        aug = AugConfig(
            final_hw=tuple(cfg.model.image_hw),
            photometric=m.photometric,
            bev_rot=m.bev_rot,
            rot_lim_deg=m.rot_lim_deg,
            flip=m.image_flip,
        )
        self.aug = aug if train else aug.evaluation()
        self.max_range, self.only_valid = m.max_range, m.only_valid
        if m.valid_points not in ("lidar_or_radar", "lidar"):
            raise ValueError(f"mapper.valid_points={m.valid_points!r}: expected 'lidar_or_radar' or 'lidar'")
        self.radar_counts = m.valid_points == "lidar_or_radar"
        self.depth_dir = None
        if m.with_depth and train:
            if not (prepared / "depth_gt").is_dir():
                raise DataError(f"{prepared} has no depth_gt folder; re-run `raydrive prepare` with depth GT on")
            self.depth_dir = str(prepared / "depth_gt")

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = [self.frame({k: v[i] for k, v in rows.items()}) for i in range(len(rows["token"]))]
        return frames_to_block(frames, self.ragged)

    def frame(self, row: dict) -> dict[str, np.ndarray]:
        seed = int(row["aug_seed"])
        rng_geo = np.random.default_rng(seed)
        rng_photo = np.random.default_rng([seed, int(row["frame"]), int(row["epoch"])])
        fh, fw = self.aug.final_hw
        img_aug = draw_image_aug(self.aug, int(row["cam_width"][0]), int(row["cam_height"][0]), rng_geo)
        bev = draw_bev_aug(self.aug, rng_geo)
        bev_inv = np.linalg.inv(bev)
        ida = np.eye(4)
        ida[:3, :3] = ida_matrix(img_aug)  # acts on (u z, v z, z): the pixel shift multiplies z
        imgs, projs, focals, depth_rows = [], [], [], []
        for c in range(NUM_CAMS):
            pixels = self._image(row, c, img_aug)
            if self.aug.train and self.aug.photometric:
                pixels = photometric(pixels, rng_photo)
            imgs.append(normalize(pixels))
            k4 = np.eye(4)
            k4[:3, :3] = row["cam_intrinsic"][c]
            s2l = geo.transform(row["cam_sensor2lidar_rotation"][c], row["cam_sensor2lidar_translation"][c])
            projs.append(ida @ k4 @ np.linalg.inv(s2l) @ bev_inv)
            focals.append(img_aug.resize[0] * row["cam_intrinsic"][c][0, 0])
            if self.depth_dir is not None:
                uvd = read_depth_gt(depth_file(Path(self.depth_dir), str(row["cam_data_path"][c])))
                uv = uvd[:, :2] @ ida[:2, :2].T + ida[:2, 2]
                keep = (uv[:, 0] >= 0) & (uv[:, 0] < fw) & (uv[:, 1] >= 0) & (uv[:, 1] < fh)
                depth_rows.append(np.concatenate([np.full((keep.sum(), 1), c), uv[keep], uvd[keep, 2:3]], 1))
        l2g = geo.lidar_to_global(row) @ bev_inv
        boxes, labels, ids = self._targets(row, bev)
        return {
            "img": np.stack(imgs),
            "projection_mat": np.stack(projs).astype(np.float32),
            "image_wh": np.tile(np.array([fw, fh], dtype=np.float32), (NUM_CAMS, 1)),
            "focal": np.array(focals, dtype=np.float32),
            "T_global": l2g,
            "T_global_inv": np.linalg.inv(l2g),
            "timestamp": np.float64(int(row["timestamp"]) / 1e6),
            "gt_boxes": boxes,
            "gt_labels": labels,
            "instance_ids": ids,
            "depth": np.concatenate(depth_rows).astype(np.float32) if depth_rows else np.zeros((0, 4), np.float32),
        }

    def _image(self, row: dict, c: int, img_aug) -> np.ndarray:
        path = resolve_path(self.dataroot, str(row["cam_data_path"][c]))
        width, height = int(row["cam_width"][c]), int(row["cam_height"][c])
        img = read_camera_image(path, width, height, row["token"], img_aug.resize_dims)
        return np.asarray(apply_image_aug(img, img_aug))

    def _keep(self, row: dict) -> np.ndarray:
        """Which of the record's objects are targets: the 10 classes, within range, with points."""
        boxes = stack_ragged(row["gt_boxes"], (7,), np.float64)
        names = np.array([str(x) for x in row["gt_names"]], dtype=object)
        keep = np.isin(names, CLASSES) & (np.linalg.norm(boxes[:, :2], axis=1) <= self.max_range)
        if self.only_valid:
            points = stack_ragged(row["num_lidar_pts"], (), np.int64)
            if self.radar_counts:
                points = points + stack_ragged(row["num_radar_pts"], (), np.int64)
            keep &= points > 0
        return keep

    def _targets(self, row: dict, bev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 9), labels and instance ids of the kept objects (`_keep`)."""
        keep = self._keep(row)
        boxes = stack_ragged(row["gt_boxes"], (7,), np.float64)
        vel = np.nan_to_num(stack_ragged(row["gt_velocity"], (2,), np.float64))
        names = np.array([str(x) for x in row["gt_names"]], dtype=object)
        boxes9 = apply_bev_aug(np.concatenate([boxes, vel], axis=1)[keep], bev).astype(np.float32)
        labels = np.array([CLASSES.index(x) for x in names[keep]], dtype=np.int64)
        return boxes9, labels, stack_ragged(row["instance_inds"], (), np.int64)[keep]
