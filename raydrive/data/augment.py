"""Image and BEV augmentation, folded into the projection matrices.

Image augmentation (Sparse4D `get_augmentation` / mmdet3d `ResizeCropFlipImage`): resize, bottom
crop to the final size (PIL pads with zeros), horizontal flip, rotation about the image centre. The
same 3x3 pixel transform `ida` is applied to the images and left-multiplied onto each camera's
lidar2img, so that `projection_mat @ [x, y, z, 1]` lands on the augmented pixels. The draw comes
from the sequence's `aug_seed`, so every frame of a sequence gets the same geometry (Sparse4D's
`keep_consistent_seq_aug`).

BEV augmentation rotates (and optionally scales and flips) boxes and velocities by B; the projection
matrices and lidar2global are right-multiplied by B^-1 so that the scene is unchanged for the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN_RGB = np.array([123.675, 116.28, 103.53], dtype=np.float32)
IMAGENET_STD_RGB = np.array([58.395, 57.12, 57.375], dtype=np.float32)


@dataclass(frozen=True)
class AugConfig:
    final_hw: tuple[int, int] = (256, 704)
    # Resize range relative to the test resize (upstream 0.40-0.47 around the 0.44 of 1600x900 -> 704).
    resize_lim: tuple[float, float] = (0.40 / 0.44, 0.47 / 0.44)
    bot_pct_lim: tuple[float, float] = (0.0, 0.0)
    flip: bool = True
    rot_lim_deg: tuple[float, float] = (-5.4, 5.4)
    bev_rot: tuple[float, float] = (-0.3925, 0.3925)
    bev_scale: tuple[float, float] = (1.0, 1.0)
    bev_flip_prob: float = 0.0
    photometric: bool = True
    train: bool = True

    def evaluation(self) -> AugConfig:
        """The deterministic test-time version of this config."""
        return AugConfig(final_hw=self.final_hw, bot_pct_lim=self.bot_pct_lim, train=False, photometric=False)


@dataclass
class ImageAug:
    resize: tuple[float, float]  # x, y scale
    resize_dims: tuple[int, int]  # new W, H
    crop: tuple[int, int, int, int]
    flip: bool
    rotate_deg: float


def draw_image_aug(cfg: AugConfig, width: int, height: int, rng: np.random.Generator) -> ImageAug:
    fh, fw = cfg.final_hw
    base = max(fh / height, fw / width)
    if cfg.train:
        resize = base * rng.uniform(*cfg.resize_lim)
        new_w, new_h = int(width * resize), int(height * resize)
        crop_h = int((1 - rng.uniform(*cfg.bot_pct_lim)) * new_h) - fh
        crop_w = int(rng.uniform(0, max(0, new_w - fw)))
        flip = bool(cfg.flip and rng.integers(2))
        rotate = float(rng.uniform(*cfg.rot_lim_deg))
    else:
        resize = base
        new_w, new_h = int(width * resize), int(height * resize)
        crop_h = int((1 - np.mean(cfg.bot_pct_lim)) * new_h) - fh
        crop_w = int(max(0, new_w - fw) / 2)
        flip, rotate = False, 0.0
    return ImageAug(
        (new_w / width, new_h / height), (new_w, new_h), (crop_w, crop_h, crop_w + fw, crop_h + fh), flip, rotate
    )


def ida_matrix(aug: ImageAug) -> np.ndarray:
    """3x3 transform from original pixels to augmented pixels."""
    m = np.diag([aug.resize[0], aug.resize[1], 1.0])
    m = np.array([[1, 0, -aug.crop[0]], [0, 1, -aug.crop[1]], [0, 0, 1.0]]) @ m
    fw, fh = aug.crop[2] - aug.crop[0], aug.crop[3] - aug.crop[1]
    if aug.flip:
        m = np.array([[-1, 0, fw], [0, 1, 0], [0, 0, 1.0]]) @ m
    if aug.rotate_deg:
        t = math.radians(aug.rotate_deg)
        c, s = math.cos(t), math.sin(t)
        cx, cy = fw / 2, fh / 2
        rot = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])  # PIL's counter-clockwise rotation in pixel coords
        m = (
            np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1.0]])
            @ rot
            @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]])
            @ m
        )
    return m


def apply_image_aug(img: Image.Image, aug: ImageAug) -> Image.Image:
    img = img.resize(aug.resize_dims, Image.BILINEAR).crop(aug.crop)
    if aug.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.rotate_deg:
        img = img.rotate(aug.rotate_deg, resample=Image.BILINEAR)
    return img


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmdet PhotoMetricDistortion on an RGB uint8 image: brightness +-32, contrast 0.5-1.5 (before or
    after the colour step), saturation 0.5-1.5, hue +-18 deg, channel swap; each with p = 0.5.
    The HSV step runs on uint8 through PIL, so values are clipped there (mmcv keeps floats)."""
    x = img.astype(np.float32)
    if rng.integers(2):
        x += rng.uniform(-32, 32)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        x *= rng.uniform(0.5, 1.5)
    do_sat, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
    sat, hue = rng.uniform(0.5, 1.5), rng.uniform(-18, 18)
    if do_sat or do_hue:
        hsv = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + hue * 255 / 360) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.integers(2):
        x *= rng.uniform(0.5, 1.5)
    if rng.integers(2):
        x = x[..., rng.permutation(3)]
    return np.clip(x, 0, 255)


def normalize(img: np.ndarray) -> np.ndarray:
    """HxWx3 RGB (0-255) -> 3xHxW float32, ImageNet mean/std."""
    return ((img.astype(np.float32) - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB).transpose(2, 0, 1)


def draw_bev_aug(cfg: AugConfig, rng: np.random.Generator) -> np.ndarray:
    """4x4 BEV transform B (rotation about z, scale, flips); identity at test time."""
    b = np.eye(4)
    if not cfg.train:
        return b
    t = rng.uniform(*cfg.bev_rot)
    s = rng.uniform(*cfg.bev_scale)
    c, si = math.cos(t), math.sin(t)
    b[:3, :3] = np.array([[c, -si, 0], [si, c, 0], [0, 0, 1.0]]) * s
    if cfg.bev_flip_prob and rng.uniform() < cfg.bev_flip_prob:
        b = np.diag([1.0, -1.0, 1.0, 1.0]) @ b  # mirror y
    if cfg.bev_flip_prob and rng.uniform() < cfg.bev_flip_prob:
        b = np.diag([-1.0, 1.0, 1.0, 1.0]) @ b  # mirror x
    return b


def apply_bev_aug(boxes: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boxes (N, 9): x, y, z, l, w, h, yaw, vx, vy, transformed by the BEV matrix b."""
    out = boxes.copy()
    lin = b[:3, :3]
    scale = float(np.cbrt(abs(np.linalg.det(lin))))
    out[:, :3] = boxes[:, :3] @ lin.T + b[:3, 3]
    out[:, 3:6] = boxes[:, 3:6] * scale
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1) @ lin[:2, :2].T
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    out[:, 7:9] = boxes[:, 7:9] @ lin[:2, :2].T
    return out
