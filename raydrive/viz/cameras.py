"""The six camera images of a key frame with 3D boxes projected as wireframes (Pillow only).

Boxes (key-frame ego frame) go to global with the key frame's ego pose, then into each camera with
that camera's own ego pose (its timestamp differs from the key frame's) and its calibration, as the
devkit renders them. Edges are clipped at a near plane in front of the camera, so a box that is
partly behind it still shows its visible part. The grid: FRONT_LEFT, FRONT, FRONT_RIGHT on top,
BACK_LEFT, BACK, BACK_RIGHT below, each image scaled to `cell_width`, with a header line.

Ground truth: thin class-coloured wireframes. Predictions: thick wireframes with a cross on the front face
(thin with the cross: the faint ones under the score threshold, see `bev.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raydrive.data import geometry as geo
from raydrive.data.infos import resolve_path
from raydrive.viz.frames import Boxes, ego_pose
from raydrive.viz.style import class_color, rgb

CAMERA_GRID: tuple[tuple[str, ...], ...] = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)
EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
FRONT_CROSS = ((0, 7), (3, 4))  # diagonals of the front face (corners 0, 3, 4, 7)
NEAR = 0.1  # metres in front of the camera
HEADER = 24  # pixels above the grid for the title


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def camera_from_ego(rec: dict, cam: dict) -> np.ndarray:
    """4x4 key-frame ego -> camera (through global and the camera's ego pose at its own timestamp)."""
    cam_ego = geo.transform(cam["ego2global_rotation"], cam["ego2global_translation"])
    sensor = geo.transform(cam["sensor2ego_rotation"], cam["sensor2ego_translation"])
    return np.linalg.inv(sensor) @ np.linalg.inv(cam_ego) @ ego_pose(rec)


def project(points_cam: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """(N, 3) camera-frame points in front of the camera -> (N, 2) pixels."""
    p = points_cam @ np.asarray(intrinsic, dtype=np.float64).T
    return p[:, :2] / p[:, 2:3]


def wireframe(corners_cam: np.ndarray, intrinsic: np.ndarray, front_cross: bool = False) -> list[np.ndarray]:
    """Pixel segments (2, 2) of one box's edges ((8, 3) corners in the camera frame), each clipped at
    the near plane; edges wholly behind it are dropped."""
    out = []
    for a, b in EDGES + (FRONT_CROSS if front_cross else ()):
        p, q = corners_cam[a], corners_cam[b]
        if p[2] < NEAR and q[2] < NEAR:
            continue
        if p[2] < NEAR or q[2] < NEAR:
            t = (NEAR - p[2]) / (q[2] - p[2])
            cut = p + t * (q - p)
            p, q = (cut, q) if p[2] < NEAR else (p, cut)
        out.append(project(np.stack([p, q]), intrinsic))
    return out


def _clip(seg: np.ndarray, width: float, height: float) -> np.ndarray | None:
    """Liang-Barsky: the part of a pixel segment inside [0, width] x [0, height], or None."""
    (x0, y0), (x1, y1) = seg
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, x0), (dx, width - x0), (-dy, y0), (dy, height - y0)):
        if p == 0:
            if q < 0:
                return None
            continue
        r = q / p
        if p < 0:
            lo = max(lo, r)
        else:
            hi = min(hi, r)
        if lo > hi:
            return None
    return np.array([[x0 + lo * dx, y0 + lo * dy], [x0 + hi * dx, y0 + hi * dy]])


def _load(path: Path, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as im:
            im.draft("RGB", size)  # JPEG: decode at a reduced scale, much faster than full size + resize
            return im.convert("RGB").resize(size, Image.BILINEAR)
    except (OSError, ValueError) as e:
        img = Image.new("RGB", size, (90, 90, 90))
        ImageDraw.Draw(img).text((8, size[1] // 2), f"cannot read {path.name}: {type(e).__name__}", fill="white")
        return img


def render_camera(
    rec: dict, cam_name: str, dataroot: str | Path, gt: Boxes, pred: Boxes, cell_width: int = 480, faint=None
):
    """One camera image at `cell_width` with the boxes drawn on it (PIL RGB); `faint` predictions thin."""
    from PIL import ImageDraw

    cam = rec["cams"][cam_name]
    w, h = int(cam["width"]), int(cam["height"])
    scale = cell_width / w
    size = (cell_width, max(1, round(h * scale)))
    img = _load(resolve_path(dataroot, cam["data_path"]), size)
    draw = ImageDraw.Draw(img)
    m = camera_from_ego(rec, cam)
    k = np.asarray(cam["cam_intrinsic"], dtype=np.float64)
    for boxes, width, cross in ((gt, 1, False), (faint or Boxes.empty(True), 1, True), (pred, 3, True)):
        for corners, label in zip(boxes.corners(), boxes.label):
            c = geo.apply(m, corners)
            if (c[:, 2] < NEAR).all():
                continue
            color = rgb(class_color(int(label)))
            for seg in wireframe(c, k, front_cross=cross):
                seg = _clip(seg * scale, size[0], size[1])
                if seg is not None:
                    draw.line([tuple(seg[0]), tuple(seg[1])], fill=color, width=width)
    label = cam_name.removeprefix("CAM_")
    f = font(13)
    box = draw.textbbox((6, 4), label, font=f)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text((6, 4), label, fill=(255, 255, 255), font=f)
    return img


def render_cameras(
    rec: dict, dataroot: str | Path, gt: Boxes, pred: Boxes, cell_width: int = 480, title: str = "", faint=None
):
    """The 2 x 3 grid (see CAMERA_GRID) under a header line, as a PIL RGB image."""
    from PIL import Image, ImageDraw

    cells = [[render_camera(rec, n, dataroot, gt, pred, cell_width, faint) for n in row] for row in CAMERA_GRID]
    cell_h = max(c.height for row in cells for c in row)
    grid = Image.new("RGB", (cell_width * 3, HEADER + cell_h * 2), (255, 255, 255))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * cell_width, HEADER + r * cell_h))
    text = (title + "    " if title else "") + "thin: ground truth    X on the front face: prediction"
    ImageDraw.Draw(grid).text((6, 4), text, fill=(0, 0, 0), font=font(14))
    return grid


def cell_origin(cam_name: str, cell_width: int, cell_height: int) -> tuple[int, int]:
    """Top-left pixel of a camera's cell in `render_cameras`' grid."""
    for r, row in enumerate(CAMERA_GRID):
        if cam_name in row:
            return row.index(cam_name) * cell_width, HEADER + r * cell_height
    raise KeyError(cam_name)
