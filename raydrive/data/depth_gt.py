"""Depth ground truth per camera image, in BEVDepth's format.

For each key frame and camera, the key-frame LIDAR_TOP points go lidar -> ego(t_lidar) -> global ->
ego(t_cam) -> camera -> pixels; points with depth > 0 and 1 < u < W-1, 1 < v < H-1 are kept and
written as float32 (u, v, depth) rows to `depth_gt/<image file name>.bin` (BEVDepth
`scripts/gen_depth_gt.py`, restored by the DrivingSDK patch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from raydrive.data import geometry as geo
from raydrive.data.constants import CAMERAS
from raydrive.data.infos import DataError, resolve_path


def load_points(path: Path) -> np.ndarray:
    """nuScenes `.pcd.bin`: float32 rows of (x, y, z, intensity, ring)."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 5:
        raise DataError(
            f"lidar file {path} has {raw.size} floats, not a multiple of 5: it is truncated or not a nuScenes .pcd.bin"
        )
    return raw.reshape(-1, 5)


def lidar_to_camera(rec: dict, cam: str) -> np.ndarray:
    """4x4 transform from the key-frame lidar to camera `cam`, through both ego poses."""
    c = rec["cams"][cam]
    lidar2global = geo.lidar_to_global(rec)
    cam2global = geo.transform(c["ego2global_rotation"], c["ego2global_translation"]) @ geo.transform(
        c["sensor2ego_rotation"], c["sensor2ego_translation"]
    )
    return np.linalg.inv(cam2global) @ lidar2global


def project_depth(points: np.ndarray, rec: dict, cam: str) -> np.ndarray:
    """(M, 3) float32 (u, v, depth) of the lidar points that land inside camera `cam`'s image."""
    c = rec["cams"][cam]
    pts_cam = geo.apply(lidar_to_camera(rec, cam), points[:, :3].astype(np.float64))
    depth = pts_cam[:, 2]
    uv = pts_cam @ np.asarray(c["cam_intrinsic"]).T
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = uv[:, 0] / depth, uv[:, 1] / depth
    w, h = int(c["width"]), int(c["height"])
    keep = (depth > 0) & (u > 1) & (u < w - 1) & (v > 1) & (v < h - 1)
    return np.stack([u[keep], v[keep], depth[keep]], axis=1).astype(np.float32)


def depth_file(out_dir: Path, image_path: str) -> Path:
    return out_dir / f"{Path(image_path).name}.bin"


def write_depth_gt(records: list[dict], dataroot: Path, out_dir: Path, show_progress: bool = True) -> int:
    """Write the depth files of every record; returns how many files were written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for rec in tqdm(records, desc="prepare: depth gt", unit="frame", disable=not show_progress):
        points = load_points(resolve_path(dataroot, rec["lidar_path"]))
        for cam in CAMERAS:
            uvd = project_depth(points, rec, cam)
            target = depth_file(out_dir, rec["cams"][cam]["data_path"])
            tmp = target.with_suffix(".tmp")
            uvd.reshape(-1).tofile(tmp)
            tmp.replace(target)
            n += 1
    return n


def read_depth_gt(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 3:
        raise DataError(f"depth file {path} is truncated ({raw.size} floats); re-run `raydrive prepare`")
    return raw.reshape(-1, 3)
