"""StreamPETR's frame mapper: planned info rows -> the tensors the model reads (upstream's train and
test pipelines of `projects/configs/StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py`, steps in
`projects/mmdet3d_plugin/datasets/pipelines/transform_3d.py` and `datasets/nuscenes_dataset.py`).

Per frame (a fresh draw for every frame, as upstream: no sequence-consistent augmentation):
- 3D boxes: valid (lidar + radar points > 0), one of the 10 classes, centre strictly inside the BEV
  range (mmdet3d `ObjectRangeFilter`: x, y only; z is not filtered); centres, not bottoms.
- `ResizeCropFlipRotImage`: one resize / bottom crop / flip for all six cameras, folded into
  `intrinsics` and `lidar2img`; the 2D boxes and centres move with it, are clipped to the image,
  boxes under 2 px are dropped, then boxes hidden behind nearer ones (`_filter_invisible`).
- `GlobalRotScaleTransImage`: rotation and scale `bev` of the boxes (velocities included), with
  `lidar2img @ inv(bev)`, `ego_pose @ inv(bev)` and `bev @ ego_pose_inv`, so the scene is unchanged
  for the cameras and in the global frame.
- `NormalizeMultiviewImage`: upstream reads BGR (cv2); VoVNet keeps BGR with BGR means
  (`to_rgb=False`), ResNet-50 gets RGB (`to_rgb=True`). `bgr` picks the former.

2D targets come from the prepared `ann2d_*` columns and are independent of the 3D filters, as
upstream: an object out of the 3D range or without points still has its 2D box. Their labels stay
in the converter order (`raydrive.data.infos.CLASSES_2D`), which the 2D branch is trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raydrive.config import TrainConfig
from raydrive.data import geometry as geo
from raydrive.data.augment import (
    AugConfig,
    ImageAug,
    apply_bev_aug,
    draw_bev_aug,
    draw_image_aug,
    ida_matrix,
    normalize,
)
from raydrive.data.constants import CLASSES, NUM_CAMS
from raydrive.data.frames import frames_to_block, read_camera_image, stack_ragged
from raydrive.data.infos import DataError, resolve_path
from raydrive.data.prepare import load_manifest

COLUMNS = (
    "timestamp", "lidar2ego_translation", "lidar2ego_rotation", "ego2global_translation", "ego2global_rotation",
    "cam_data_path", "cam_width", "cam_height", "cam_intrinsic", "cam_sensor2lidar_rotation",
    "cam_sensor2lidar_translation", "gt_boxes", "gt_names", "gt_velocity", "num_lidar_pts", "num_radar_pts",
    "ann2d_cam", "ann2d_bbox", "ann2d_label", "ann2d_center", "ann2d_depth",
)  # fmt: skip


@dataclass
class StreamPETRMapperConfig:
    """Upstream's `ida_aug_conf` and `GlobalRotScaleTransImage` settings. `resize_lim` is relative to
    the test resize max(H_out / H, W_out / W), so it holds for any input size (upstream gives it for
    1600x900: V2-99 (0.47, 0.625) around 0.5, R50 (0.38, 0.55) around 0.44)."""

    bgr: bool = True  # VoVNet: BGR order, BGR means (upstream to_rgb=False); False: RGB (ResNet-50)
    resize_lim: tuple[float, float] = (0.47 / 0.5, 0.625 / 0.5)  # train
    bot_pct_lim: tuple[float, float] = (0.0, 0.0)  # fraction of rows cut below the crop
    image_flip: bool = True  # horizontal flip with p .5 (train)
    rot_lim_deg: tuple[float, float] = (0.0, 0.0)  # upstream asserts (0, 0): 2D boxes cannot follow a rotation
    bev_rot: tuple[float, float] = (-0.3925, 0.3925)  # radians (train)
    bev_scale: tuple[float, float] = (0.95, 1.05)  # (train)
    bev_range: tuple[float, float, float, float] = (-51.2, -51.2, 51.2, 51.2)  # x_min, y_min, x_max, y_max
    only_valid: bool = True  # drop 3D boxes without lidar or radar points (upstream use_valid_flag)
    min_size_2d: float = 2.0  # px; smaller 2D boxes after the crop are dropped
    filter_invisible: bool = True  # drop 2D boxes that nearer boxes cover entirely

    def __post_init__(self):
        if tuple(self.rot_lim_deg) != (0.0, 0.0):
            raise ValueError(
                f"mapper.rot_lim_deg must be (0, 0), got {self.rot_lim_deg}: the 2D boxes and centres cannot "
                f"follow an image rotation (upstream ResizeCropFlipRotImage asserts the same)"
            )


class StreamPETRMapper:
    """Plain data and one method: it is pickled into every Ray Data task."""

    columns = COLUMNS
    ragged = {
        "gt_boxes": (9,),
        "gt_labels": (),
        "gt_cams2d": (),
        "gt_bboxes2d": (4,),
        "gt_labels2d": (),
        "gt_centers2d": (2,),
        "gt_depths2d": (),
    }
    strings = ()

    def __init__(self, cfg: TrainConfig, train: bool):
        m = cfg.mapper
        self.cfg, self.train = m, train
        prepared = Path(cfg.data.prepared).resolve()
        self.dataroot = str(Path(cfg.data.dataroot or load_manifest(prepared)["dataroot"]).resolve())
        aug = AugConfig(
            final_hw=tuple(cfg.model.image_hw),
            resize_lim=tuple(m.resize_lim),
            bot_pct_lim=tuple(m.bot_pct_lim),
            flip=m.image_flip,
            rot_lim_deg=tuple(m.rot_lim_deg),
            bev_rot=tuple(m.bev_rot),
            bev_scale=tuple(m.bev_scale),
            photometric=False,
        )
        self.aug = aug if train else aug.evaluation()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = [self.frame({k: v[i] for k, v in rows.items()}) for i in range(len(rows["token"]))]
        return frames_to_block(frames, self.ragged)

    def frame(self, row: dict) -> dict[str, np.ndarray]:
        if len(row["cam_data_path"]) != NUM_CAMS:
            raise DataError(
                f"sample {row['token']} has {len(row['cam_data_path'])} cameras; StreamPETR needs {NUM_CAMS}"
            )
        # upstream draws every frame afresh; the seed makes a resumed run draw the same
        rng = np.random.default_rng([int(row["aug_seed"]), int(row["frame"]), int(row["epoch"])])
        fh, fw = self.aug.final_hw
        img_aug = draw_image_aug(self.aug, int(row["cam_width"][0]), int(row["cam_height"][0]), rng)
        bev = draw_bev_aug(self.aug, rng)
        bev_inv = np.linalg.inv(bev)
        ida = np.eye(4)
        ida[:3, :3] = ida_matrix(img_aug)  # acts on (u z, v z, z)
        imgs, lidar2img, intrinsics = [], [], []
        for c in range(NUM_CAMS):
            imgs.append(self.image(row, c, img_aug))
            k4 = np.eye(4)
            k4[:3, :3] = row["cam_intrinsic"][c]
            cam2lidar = geo.transform(row["cam_sensor2lidar_rotation"][c], row["cam_sensor2lidar_translation"][c])
            intrinsics.append(ida @ k4)
            lidar2img.append(ida @ k4 @ np.linalg.inv(cam2lidar) @ bev_inv)
        ego_pose = geo.lidar_to_global(row) @ bev_inv
        boxes, labels = self.targets_3d(row, bev)
        return {
            "img": np.stack(imgs),
            "lidar2img": np.stack(lidar2img).astype(np.float32),
            "intrinsics": np.stack(intrinsics).astype(np.float32),
            "ego_pose": ego_pose,
            "ego_pose_inv": np.linalg.inv(ego_pose),
            "timestamp": np.float64(int(row["timestamp"]) / 1e6),
            "pad_hw": np.array([fh, fw], dtype=np.float32),
            "gt_boxes": boxes,
            "gt_labels": labels,
            **self.targets_2d(row, ida[:3, :3]),
        }

    def image(self, row: dict, c: int, aug: ImageAug) -> np.ndarray:
        """(3, H, W) float32: resized (PIL's default bicubic, as upstream), cropped, flipped, normalised."""
        path = resolve_path(self.dataroot, str(row["cam_data_path"][c]))
        width, height = int(row["cam_width"][c]), int(row["cam_height"][c])
        img = read_camera_image(path, width, height, row["token"], aug.resize_dims)
        img = img.resize(aug.resize_dims, Image.BICUBIC).crop(aug.crop)
        if aug.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = normalize(np.asarray(img))  # RGB order, RGB means
        return np.ascontiguousarray(x[::-1]) if self.cfg.bgr else x  # BGR order, BGR means

    def targets_3d(self, row: dict, bev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 9) boxes x, y, z (centre), l, w, h, yaw, vx, vy in the augmented lidar frame; CLASSES labels."""
        boxes = stack_ragged(row["gt_boxes"], (7,), np.float64)
        vel = np.nan_to_num(stack_ragged(row["gt_velocity"], (2,), np.float64))
        names = np.array([str(x) for x in row["gt_names"]], dtype=object)
        x0, y0, x1, y1 = self.cfg.bev_range
        keep = np.isin(names, CLASSES)
        keep &= (boxes[:, 0] > x0) & (boxes[:, 1] > y0) & (boxes[:, 0] < x1) & (boxes[:, 1] < y1)
        if self.cfg.only_valid:
            points = stack_ragged(row["num_lidar_pts"], (), np.int64) + stack_ragged(row["num_radar_pts"], (), np.int64)
            keep &= points > 0
        out = apply_bev_aug(np.concatenate([boxes, vel], axis=1)[keep], bev).astype(np.float32)
        return out, np.array([CLASSES.index(x) for x in names[keep]], dtype=np.int64)

    def targets_2d(self, row: dict, ida: np.ndarray) -> dict[str, np.ndarray]:
        """The 2D boxes, centres and depths of all cameras, moved into the augmented images (upstream
        `_bboxes_transform` then `_filter_invisible` per camera), flattened with a camera index."""
        fh, fw = self.aug.final_hw
        cams = stack_ragged(row["ann2d_cam"], (), np.int64)
        bboxes = stack_ragged(row["ann2d_bbox"], (4,), np.float64)
        centers = stack_ragged(row["ann2d_center"], (2,), np.float64)
        labels = stack_ragged(row["ann2d_label"], (), np.int64)
        depths = stack_ragged(row["ann2d_depth"], (), np.float64)
        lin, shift = ida[:2, :2], ida[:2, 2]
        corners = np.stack([bboxes[:, :2] @ lin.T + shift, bboxes[:, 2:] @ lin.T + shift], axis=1)
        bboxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)  # a flip swaps x0 and x1
        bboxes = np.clip(bboxes, 0, [fw, fh, fw, fh])
        centers = np.clip(centers @ lin.T + shift, 0, [fw, fh])
        size = self.cfg.min_size_2d
        keep = (bboxes[:, 2] - bboxes[:, 0] >= size) & (bboxes[:, 3] - bboxes[:, 1] >= size)
        order = []
        for c in range(NUM_CAMS):
            idx = np.flatnonzero(keep & (cams == c))
            if len(idx) and self.cfg.filter_invisible:
                idx = idx[visible(bboxes[idx], depths[idx], (fh, fw))]
            order.append(idx)
        idx = np.concatenate(order).astype(np.int64)
        return {
            "gt_cams2d": cams[idx],
            "gt_bboxes2d": bboxes[idx].astype(np.float32),
            "gt_labels2d": labels[idx],
            "gt_centers2d": centers[idx].astype(np.float32),
            "gt_depths2d": depths[idx].astype(np.float32),
        }


def visible(bboxes: np.ndarray, depths: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Indices of one camera's boxes that some pixel shows, farthest first (upstream
    `_filter_invisible`): boxes are painted far to near on an index map over their whole pixels, and a
    box survives if its index is left anywhere. The map starts at 0, the farthest box's index, so that
    box survives whenever some pixel is uncovered; kept as upstream."""
    order = np.argsort(-depths, kind="stable")
    painted = np.zeros(hw, dtype=np.int64)
    for i, (x0, y0, x1, y1) in enumerate(bboxes[order]):
        painted[int(np.ceil(y0)) : int(np.floor(y1)), int(np.ceil(x0)) : int(np.floor(x1))] = i
    return order[np.unique(painted)]
