"""Rigid transforms with nuScenes conventions: quaternions are (w, x, y, z), matrices act on columns.

A transform "a2b" maps points from frame a into frame b: p_b = R @ p_a + t.
"""

from __future__ import annotations

import numpy as np


def quat_to_matrix(q) -> np.ndarray:
    """(w, x, y, z) unit quaternion -> 3x3 rotation matrix."""
    w, x, y, z = (float(v) for v in q)
    n = w * w + x * x + y * y + z * z
    if n == 0.0:
        raise ValueError("zero quaternion")
    s = 2.0 / n
    return np.array(
        [
            [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
            [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
            [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
        ]
    )


def matrix_to_quat(r: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix -> (w, x, y, z) with w >= 0."""
    r = np.asarray(r, dtype=np.float64)
    tr = np.trace(r)
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif r[1, 1] > r[2, 2]:
        s = np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def yaw_to_quat(yaw: float) -> np.ndarray:
    """Rotation about +z by `yaw` radians as (w, x, y, z)."""
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def transform(rotation, translation) -> np.ndarray:
    """4x4 homogeneous transform from a quaternion (or 3x3 matrix) and a translation."""
    rotation = np.asarray(rotation, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = quat_to_matrix(rotation) if rotation.shape == (4,) else rotation
    m[:3, 3] = np.asarray(translation, dtype=np.float64)
    return m


def mean_pose(rotations, translations) -> np.ndarray:
    """4x4 from the element-wise mean of quaternions (normalised, as pyquaternion does when it rotates)
    and of translations: BEVDepth's ego frame is the mean of the six cameras' ego poses."""
    q = np.mean(np.asarray(rotations, dtype=np.float64).reshape(-1, 4), axis=0)
    t = np.mean(np.asarray(translations, dtype=np.float64).reshape(-1, 3), axis=0)
    return transform(q / np.linalg.norm(q), t)


def lidar_to_global(rec) -> np.ndarray:
    """4x4 key-frame lidar -> global of an info record (or any mapping with its four pose fields)."""
    return transform(rec["ego2global_rotation"], rec["ego2global_translation"]) @ transform(
        rec["lidar2ego_rotation"], rec["lidar2ego_translation"]
    )


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to (N, 3) points."""
    return points @ m[:3, :3].T + m[:3, 3]


def box_corners(center, lwh, yaw) -> np.ndarray:
    """(N, 8, 3) corners of boxes given centre (N,3), size l,w,h (N,3) and yaw (N,) about +z.

    Corner order: the 4 bottom corners then the 4 top ones, counter-clockwise from (+l/2, +w/2).
    """
    center = np.atleast_2d(center)
    lwh = np.atleast_2d(lwh)
    yaw = np.atleast_1d(yaw)
    sx = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sy = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * 0.5
    local = np.stack([sx[None] * lwh[:, 0:1], sy[None] * lwh[:, 1:2], sz[None] * lwh[:, 2:3]], axis=-1)
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y, local[..., 2]], axis=-1) + center[:, None, :]


def points_in_boxes(points: np.ndarray, center, lwh, yaw) -> np.ndarray:
    """(M, N) bool: point m lies inside box n (boxes as in `box_corners`)."""
    center = np.atleast_2d(center)
    lwh = np.atleast_2d(lwh)
    yaw = np.atleast_1d(yaw)
    d = points[:, None, :3] - center[None]
    c, s = np.cos(yaw)[None], np.sin(yaw)[None]
    lx = d[..., 0] * c + d[..., 1] * s
    ly = -d[..., 0] * s + d[..., 1] * c
    eps = 1e-4
    return (
        (np.abs(lx) <= lwh[None, :, 0] / 2 + eps)
        & (np.abs(ly) <= lwh[None, :, 1] / 2 + eps)
        & (np.abs(d[..., 2]) <= lwh[None, :, 2] / 2 + eps)
    )
