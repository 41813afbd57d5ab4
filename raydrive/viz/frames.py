"""Boxes of one key frame in the frame the pictures are drawn in: the key frame's ego frame (x forward,
y left, z up, origin at the ego's rear axle as nuScenes puts it).

Predictions arrive in the model's box frame (`raydrive.eval.detection.box_frame_to_global`: the
key-frame lidar frame, or the mean of the six cameras' ego poses); they go to global and from there
to the key-frame ego frame. Ground truth comes from the record's global annotations (`ann_translation`,
`ann_size` as w, l, h, `ann_rotation`, `ann_velocity`, `gt_names`), the same ones the devkit scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydrive.data import geometry as geo
from raydrive.data.constants import CLASSES


@dataclass
class Boxes:
    """N boxes in the key-frame ego frame: centre (N, 3), size l, w, h (N, 3), yaw (N,) about +z,
    velocity (N, 2) in m/s, label (N,) indexing CLASSES (-1: not a detection class), score (N,) or None
    (ground truth)."""

    center: np.ndarray
    lwh: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    label: np.ndarray
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.center)

    def take(self, idx) -> Boxes:
        idx = np.asarray(idx, dtype=np.int64)
        score = None if self.score is None else self.score[idx]
        return Boxes(self.center[idx], self.lwh[idx], self.yaw[idx], self.velocity[idx], self.label[idx], score)

    def pick(self, score_thresh: float, limit: int, at_least: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(drawn, faint) indices, best first: the boxes scoring at least `score_thresh` (at most `limit`),
        and when fewer than `at_least` pass, the next best up to `at_least` (a weak model's best guesses)."""
        if self.score is None:
            return np.arange(min(len(self), limit)), np.zeros(0, dtype=np.int64)
        order = np.argsort(-self.score, kind="stable")
        n = min(int((self.score >= score_thresh).sum()), limit)
        return order[:n], order[n : max(n, min(at_least, limit))]

    def corners(self) -> np.ndarray:
        """(N, 8, 3): 4 bottom then 4 top corners, counter-clockwise from the front left (`geo.box_corners`);
        corners 0, 3, 4, 7 are the front face."""
        if not len(self):
            return np.zeros((0, 8, 3))
        return geo.box_corners(self.center, self.lwh, self.yaw)

    @staticmethod
    def empty(with_score: bool = False) -> Boxes:
        z = np.zeros((0, 3))
        return Boxes(
            z, z.copy(), np.zeros(0), np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0) if with_score else None
        )


def ego_pose(rec: dict) -> np.ndarray:
    """4x4 key-frame ego -> global."""
    return geo.transform(rec["ego2global_rotation"], rec["ego2global_translation"])


def transform_boxes(m: np.ndarray, center, lwh, yaw, velocity, label, score=None) -> Boxes:
    """Boxes given in some frame, moved by the 4x4 `m` into another (yaw about the new z; the small tilt
    between frames, e.g. of the mean camera-ego pose, is dropped as the devkit drops it)."""
    center = np.asarray(center, dtype=np.float64).reshape(-1, 3)
    yaw = np.asarray(yaw, dtype=np.float64).reshape(-1)
    vel = np.zeros((len(center), 3))
    vel[:, :2] = np.nan_to_num(np.asarray(velocity, dtype=np.float64).reshape(-1, 2))
    return Boxes(
        center=geo.apply(m, center),
        lwh=np.asarray(lwh, dtype=np.float64).reshape(-1, 3),
        yaw=yaw + np.arctan2(m[1, 0], m[0, 0]),
        velocity=(vel @ m[:3, :3].T)[:, :2],
        label=np.asarray(label, dtype=np.int64).reshape(-1),
        score=None if score is None else np.asarray(score, dtype=np.float64).reshape(-1),
    )


def gt_boxes(rec: dict) -> Boxes:
    """The record's annotations in its key-frame ego frame; labels index CLASSES (-1 for other names)."""
    n = len(rec.get("ann_translation", ()))
    if n == 0:
        return Boxes.empty()
    to_ego = np.linalg.inv(ego_pose(rec))
    rots = [to_ego[:3, :3] @ geo.quat_to_matrix(q) for q in rec["ann_rotation"]]
    yaw = np.array([np.arctan2(r[1, 0], r[0, 0]) for r in rots])
    size = np.asarray(rec["ann_size"], dtype=np.float64).reshape(-1, 3)
    vel = np.nan_to_num(np.asarray(rec["ann_velocity"], dtype=np.float64).reshape(-1, 3))
    index = {c: i for i, c in enumerate(CLASSES)}
    labels = np.array([index.get(str(name), -1) for name in rec["gt_names"]], dtype=np.int64)
    return Boxes(
        center=geo.apply(to_ego, np.asarray(rec["ann_translation"], dtype=np.float64).reshape(-1, 3)),
        lwh=size[:, [1, 0, 2]],  # annotations are w, l, h
        yaw=yaw,
        velocity=(vel @ to_ego[:3, :3].T)[:, :2],
        label=labels,
    )


def box_frame_to_ego(rec: dict, frame: str) -> np.ndarray:
    """4x4 from the model's box frame to the key-frame ego frame."""
    from raydrive.eval.detection import box_frame_to_global

    return np.linalg.inv(ego_pose(rec)) @ box_frame_to_global(rec, frame)


def pred_boxes(pred: dict, box_to_ego: np.ndarray) -> Boxes:
    """A prediction dict's `boxes` (N, 7 or 9: x, y, z, l, w, h, yaw[, vx, vy] in the box frame), `scores`
    and `labels` in the key-frame ego frame."""
    boxes = np.asarray(pred["boxes"], dtype=np.float64)
    if boxes.size == 0:
        return Boxes.empty(with_score=True)
    boxes = boxes.reshape(len(boxes), -1)
    vel = boxes[:, 7:9] if boxes.shape[1] >= 9 else np.zeros((len(boxes), 2))
    scores = np.asarray(pred.get("scores", np.ones(len(boxes))), dtype=np.float64)
    labels = np.asarray(pred.get("labels", np.zeros(len(boxes))), dtype=np.int64)
    return transform_boxes(box_to_ego, boxes[:, :3], boxes[:, 3:6], boxes[:, 6], vel, labels, scores)


def to_numpy(value):
    """Tensors (any device), arrays and nested lists of them -> numpy (lists stay lists)."""
    if isinstance(value, (list, tuple)):
        return [to_numpy(v) for v in value]
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)
