"""BEVDepth's frame mapper: a key frame joined with its previous key frame (`column@-1`) -> images,
camera matrices, BEV augmentation, boxes and depth labels (upstream
`bevdepth/datasets/nusc_det_dataset.py`).

- One image augmentation draw per camera (resize U(0.386, 0.55) for 1600x900 input, bottom crop,
  random crop column, flip, rotation), shared by both frames; the test transform is resize 0.44 and
  the bottom 256 rows.
- `sensor2ego_mats`: each frame's camera -> the current key frame's ego (of that camera's timestamp),
  the only ego-motion alignment.
- Boxes in the ego frame given by the element-wise mean of the six cameras' ego poses (quaternion
  components averaged), x, y, z (centre), l, w, h, yaw, vx, vy; classes of the 10, lidar + radar
  points > 0; then the BEV augmentation (rotation, scale, flips) on boxes and on `bda_mat`.
- Depth labels from the prepared `depth_gt/` moved through the camera's image augmentation, cell by
  truncated pixel, the last point written wins.
- Normalisation: upstream reads RGB with PIL and passes it to `mmcv.imnormalize(to_rgb=True)`, which
  swaps it to BGR; the means stay in RGB order. `swap_rb=True` feeds the network the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydrive.config import TrainConfig
from raydrive.data import geometry as geo
from raydrive.data.augment import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, ImageAug, ida_matrix
from raydrive.data.constants import CLASSES, NUM_CAMS
from raydrive.data.depth_gt import depth_file, read_depth_gt
from raydrive.data.frames import frames_to_block, read_camera_image, stack_ragged
from raydrive.data.infos import DataError, resolve_path
from raydrive.data.prepare import load_manifest

_CAM = ("data_path", "width", "height", "intrinsic", "sensor2ego_translation", "sensor2ego_rotation")
_CAM += ("ego2global_translation", "ego2global_rotation")
FRAME_COLUMNS = tuple(f"cam_{c}" for c in _CAM)
COLUMNS = FRAME_COLUMNS + ("gt_names", "num_lidar_pts", "num_radar_pts", "ann_translation", "ann_size")
COLUMNS += ("ann_rotation", "ann_velocity")
TEST_RESIZE = 704 / 1600  # upstream's resize limits are for 1600x900 images; scaled for other sizes


@dataclass
class BEVDepthMapperConfig:
    resize_lim: tuple[float, float] = (0.386, 0.55)  # for 1600x900 input (train)
    rot_lim_deg: tuple[float, float] = (-5.4, 5.4)  # image rotation (train)
    image_flip: bool = True  # horizontal flip with p .5 (train)
    bda_rot_deg: tuple[float, float] = (-22.5, 22.5)  # BEV augmentation (train)
    bda_scale: tuple[float, float] = (0.95, 1.05)
    bda_flip_x: float = 0.5
    bda_flip_y: float = 0.5
    with_depth: bool = True  # depth labels for the depth loss (train)
    only_valid: bool = True  # drop boxes without lidar or radar points
    swap_rb: bool = True  # upstream's channel order (see the module docstring)


class BEVDepthMapper:
    """Plain data and one method: pickled into every Ray Data task."""

    columns = COLUMNS  # the pipeline joins the previous key frame's as `column@-1`
    ragged = {"gt_boxes": (9,), "gt_labels": ()}
    strings = ()

    def __init__(self, cfg: TrainConfig, train: bool):
        prepared = Path(cfg.data.prepared).resolve()
        self.cfg, self.train = cfg.mapper, train
        self.final_hw = tuple(cfg.model.image_hw)
        self.dataroot = str(Path(cfg.data.dataroot or load_manifest(prepared)["dataroot"]).resolve())
        self.depth_dir = None
        if train and self.cfg.with_depth:
            if not (prepared / "depth_gt").is_dir():
                raise DataError(
                    f"{prepared} has no depth_gt folder; re-run `raydrive prepare` (depth GT is on by default)"
                )
            self.depth_dir = prepared / "depth_gt"

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = [self.frame({k: v[i] for k, v in rows.items()}) for i in range(len(rows["token"]))]
        return frames_to_block(frames, self.ragged)

    def frame(self, row: dict) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(row["aug_seed"]))
        if len(row["cam_data_path"]) != NUM_CAMS:
            raise DataError(f"sample {row['token']} has {len(row['cam_data_path'])} cameras; BEVDepth needs {NUM_CAMS}")
        augs = [self.draw_ida(int(row["cam_width"][c]), int(row["cam_height"][c]), rng) for c in range(NUM_CAMS)]
        frames = [self._frame_tensors(row, "", augs), self._frame_tensors(row, "@-1", augs)]
        bda = self.draw_bda(rng)
        boxes, labels = self.targets(row)
        out = {
            "img": np.stack([f[0] for f in frames]),
            "sensor2ego_mats": np.stack([f[1] for f in frames]).astype(np.float32),
            "intrin_mats": np.stack([f[2] for f in frames]).astype(np.float32),
            "ida_mats": np.stack([f[3] for f in frames]).astype(np.float32),
            "bda_mat": bda.matrix().astype(np.float32),
            "gt_boxes": bev_transform(boxes, bda).astype(np.float32),
            "gt_labels": labels,
        }
        if self.depth_dir is not None:
            out["depth_labels"] = np.stack([self.depth_map(row, c, augs[c]) for c in range(NUM_CAMS)])
        return out

    # ---- augmentation draws --------------------------------------------------------------------

    def draw_ida(self, width: int, height: int, rng: np.random.Generator) -> ImageAug:
        """Upstream `sample_ida_augmentation`, with a scalar resize (its ida matrix uses the scalar,
        the image the truncated size)."""
        fh, fw = self.final_hw
        base = max(fh / height, fw / width)
        if self.train:
            lo, hi = self.cfg.resize_lim
            resize = rng.uniform(lo, hi) * base / TEST_RESIZE
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = new_h - fh
            crop_w = int(rng.uniform(0, max(0, new_w - fw)))
            flip = bool(self.cfg.image_flip and rng.choice([0, 1]))
            rotate = float(rng.uniform(*self.cfg.rot_lim_deg))
        else:
            resize = base
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h, crop_w = new_h - fh, int(max(0, new_w - fw) / 2)
            flip, rotate = False, 0.0
        return ImageAug((resize, resize), (new_w, new_h), (crop_w, crop_h, crop_w + fw, crop_h + fh), flip, rotate)

    def draw_bda(self, rng: np.random.Generator) -> BEVAug:
        """Upstream `sample_bda_augmentation`; the identity at test time."""
        if not self.train:
            return BEVAug()
        angle = math.radians(rng.uniform(*self.cfg.bda_rot_deg))
        scale = rng.uniform(*self.cfg.bda_scale)
        fx, fy = rng.uniform() < self.cfg.bda_flip_x, rng.uniform() < self.cfg.bda_flip_y
        return BEVAug(angle, float(scale), bool(fx), bool(fy))

    # ---- per frame -----------------------------------------------------------------------------

    def _frame_tensors(self, row: dict, sfx: str, augs: list[ImageAug]):
        """Images and matrices of the frame with column suffix `sfx` (`""` current, `"@-1"` previous)."""
        imgs, s2e, intrin, ida = [], [], [], []
        for c in range(NUM_CAMS):
            imgs.append(self.image(row, sfx, c, augs[c]))
            sensor2ego = _pose(row, f"cam_sensor2ego{{}}{sfx}", c)
            ego2global = _pose(row, f"cam_ego2global{{}}{sfx}", c)
            key_ego2global = _pose(row, "cam_ego2global{}", c)
            s2e.append(np.linalg.inv(key_ego2global) @ ego2global @ sensor2ego)
            k4 = np.eye(4)
            k4[:3, :3] = np.asarray(row[f"cam_intrinsic{sfx}"][c]).reshape(3, 3)
            intrin.append(k4)
            m = np.eye(4)
            m3 = ida_matrix(augs[c])
            m[:2, :2], m[:2, 3] = m3[:2, :2], m3[:2, 2]
            ida.append(m)
        return np.stack(imgs), np.stack(s2e), np.stack(intrin), np.stack(ida)

    def image(self, row: dict, sfx: str, c: int, aug: ImageAug) -> np.ndarray:
        from PIL import Image

        path = resolve_path(self.dataroot, str(row[f"cam_data_path{sfx}"][c]))
        width, height = int(row[f"cam_width{sfx}"][c]), int(row[f"cam_height{sfx}"][c])
        img = read_camera_image(path, width, height, row["token"], aug.resize_dims)
        img = img.resize(aug.resize_dims, Image.BICUBIC).crop(aug.crop)  # upstream: PIL's default resize
        if aug.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = img.rotate(aug.rotate_deg)  # upstream: PIL's default (nearest) resampling
        x = np.asarray(img, dtype=np.float32)
        if self.cfg.swap_rb:
            x = x[..., ::-1]
        return ((x - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB).transpose(2, 0, 1).copy()

    def depth_map(self, row: dict, c: int, aug: ImageAug) -> np.ndarray:
        """(H, W) float32 depth labels of the key frame's camera `c` (upstream `depth_transform`)."""
        path = depth_file(self.depth_dir, str(row["cam_data_path"][c]))
        if not path.is_file():
            raise DataError(
                f"missing depth file {path} for {row['cam_data_path'][c]} (sample {row['token']}); "
                f"re-run `raydrive prepare` to write depth_gt/, or train with mapper.with_depth=false"
            )
        return depth_transform(read_depth_gt(path), aug, self.final_hw)

    def targets(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 9) in the mean camera-ego frame, labels as CLASSES indices."""
        names = np.array([str(x) for x in row["gt_names"]], dtype=object)
        keep = np.isin(names, CLASSES)
        if self.cfg.only_valid:
            keep &= (
                stack_ragged(row["num_lidar_pts"], (), np.int64) + stack_ragged(row["num_radar_pts"], (), np.int64) > 0
            )
        idx = np.flatnonzero(keep)
        boxes = np.zeros((len(idx), 9))
        if len(idx):
            inv = np.linalg.inv(mean_ego_pose(row))
            centers = stack_ragged(row["ann_translation"], (3,), np.float64)[idx]
            boxes[:, :3] = centers @ inv[:3, :3].T + inv[:3, 3]
            boxes[:, 3:6] = stack_ragged(row["ann_size"], (3,), np.float64)[idx][:, [1, 0, 2]]
            for j, q in enumerate(stack_ragged(row["ann_rotation"], (4,), np.float64)[idx]):
                boxes[j, 6] = _yaw(inv[:3, :3] @ geo.quat_to_matrix(q))
            vel = np.nan_to_num(stack_ragged(row["ann_velocity"], (3,), np.float64)[idx])
            boxes[:, 7:9] = (vel @ inv[:3, :3].T)[:, :2]
        labels = np.array([CLASSES.index(n) for n in names[idx]], dtype=np.int64)
        return boxes, labels


def mean_ego_pose(row: dict) -> np.ndarray:
    """4x4 ego -> global of the frame BEVDepth's boxes live in (see `geometry.mean_pose`)."""
    return geo.mean_pose(list(row["cam_ego2global_rotation"]), list(row["cam_ego2global_translation"]))


@dataclass(frozen=True)
class BEVAug:
    angle: float = 0.0  # radians, counter-clockwise about z
    scale: float = 1.0
    flip_x: bool = False  # x -> -x
    flip_y: bool = False  # y -> -y

    def matrix(self) -> np.ndarray:
        """4x4 `bda_mat`: flip @ scale @ rot, as upstream `bev_transform` builds it."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        flip = np.diag([-1.0 if self.flip_x else 1.0, -1.0 if self.flip_y else 1.0, 1.0])
        m = np.eye(4)
        m[:3, :3] = flip @ (self.scale * rot)
        return m


def bev_transform(boxes: np.ndarray, aug: BEVAug) -> np.ndarray:
    """Upstream `bev_transform` on (N, 9) boxes: centres by the 3x3 matrix, sizes by the scale, yaw +
    angle, then pi - yaw for an x flip and -yaw for a y flip, velocities by the 2x2 part (scale
    included, as upstream)."""
    out = boxes.copy()
    if not len(boxes):
        return out
    m = aug.matrix()[:3, :3]
    out[:, :3] = boxes[:, :3] @ m.T
    out[:, 3:6] = boxes[:, 3:6] * aug.scale
    out[:, 6] = boxes[:, 6] + aug.angle
    if aug.flip_x:
        out[:, 6] = math.pi - out[:, 6]
    if aug.flip_y:
        out[:, 6] = -out[:, 6]
    out[:, 7:9] = boxes[:, 7:9] @ m[:2, :2].T
    return out


def depth_transform(uvd: np.ndarray, aug: ImageAug, final_hw: tuple[int, int]) -> np.ndarray:
    """Upstream `depth_transform`: scale, crop, flip (x -> W - x), rotate about the centre, truncate to
    int16 pixels; points outside are dropped and the last write wins."""
    h, w = final_hw
    pts = uvd.astype(np.float64).copy()
    pts[:, :2] *= aug.resize[0]
    pts[:, 0] -= aug.crop[0]
    pts[:, 1] -= aug.crop[1]
    if aug.flip:
        pts[:, 0] = w - pts[:, 0]
    pts[:, 0] -= w / 2.0
    pts[:, 1] -= h / 2.0
    t = math.radians(aug.rotate_deg)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    pts[:, :2] = pts[:, :2] @ rot.T
    pts[:, 0] += w / 2.0
    pts[:, 1] += h / 2.0
    uv = pts[:, :2].astype(np.int16)
    out = np.zeros((h, w), dtype=np.float32)
    ok = (uv[:, 1] < h) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 0] >= 0)
    out[uv[ok, 1], uv[ok, 0]] = pts[ok, 2]
    return out


def _pose(row: dict, pattern: str, c: int) -> np.ndarray:
    return geo.transform(row[pattern.format("_rotation")][c], row[pattern.format("_translation")][c])


def _yaw(r: np.ndarray) -> float:
    """pyquaternion's yaw of a rotation matrix (atan2 of the rotated x axis for a z rotation)."""
    return float(np.arctan2(r[1, 0], r[0, 0]))
