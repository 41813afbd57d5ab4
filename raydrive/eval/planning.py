"""Open-loop planning metrics: L2 error and collision rate, as SparseDrive reports them.

Follows upstream's `datasets/evaluation/planning/planning_eval.py`. Everything is in the key-frame
lidar frame (x to the ego's right, y forward), 6 steps of 0.5 s.

- plans: one (6, 2) **cumulative** ego trajectory per frame (positions, not offsets; the planner's
  decoded `plan`).
- gt: one dict per frame (`planning_gt(record)` builds it from a prepared record):
  `gt_ego_fut_trajs` (6, 2) per-step offsets of the future lidar origins, `gt_ego_fut_masks` (6,),
  `gt_boxes` (N, 7+) as x, y, z, l, w, h, yaw, `gt_agent_fut_trajs` (N, 12, 2) per-step offsets of the
  boxes' centres at 2 Hz and `gt_agent_fut_masks` (N, 12).

L2 at step t is the distance between the plan and the summed GT offsets, averaged over frames; a
frame whose six GT steps are not all valid is skipped. Collision at step t: the ego box (4.084 m
long, 1.85 m wide, its centre 0.5 m ahead of the trajectory point, heading along the trajectory)
overlaps a GT agent box at t while the GT ego trajectory's own box does not (collisions the data
already has do not count). Each reported value at 1/2/3 s is the running mean of the per-step values
up to that step (upstream's table), and `*_avg` is the mean of those three.

One difference from upstream: upstream takes the agents at step t from the next key frames' boxes
moved into this frame. Here each box now present moves along its own future offsets (masked steps
drop it) and keeps its current heading, so agents that enter the scene later are absent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely

EGO_LENGTH = 4.084  # metres, upstream's PlanningMetric.H
EGO_WIDTH = 1.85  # upstream's PlanningMetric.W
EGO_CENTRE_AHEAD = 0.5  # metres the ego box sits ahead of the trajectory point (from UniAD)
NUM_STEPS = 6  # 3 s at 2 Hz
REPORT_STEPS = {"1s": 1, "2s": 3, "3s": 5}  # indices into the running means


def trajectory_yaw(traj: np.ndarray) -> np.ndarray:
    """(T,) heading at each point of a cumulative (T, 2) trajectory starting after the origin.

    Central differences (the origin before the first point), a backward difference at the end; a
    trajectory whose first and last points are under 0.5 m apart faces straight ahead (+y, pi / 2).
    Upstream's `get_yaw`.
    """
    if np.linalg.norm(traj[-1] - traj[0]) < 0.5:
        return np.full(len(traj), np.pi / 2)
    pts = np.concatenate([np.zeros((1, 2)), traj], axis=0)
    yaw = np.empty(len(traj))
    yaw[:-1] = np.arctan2(pts[2:, 1] - pts[:-2, 1], pts[2:, 0] - pts[:-2, 0])
    yaw[-1] = np.arctan2(pts[-1, 1] - pts[-2, 1], pts[-1, 0] - pts[-2, 0])
    return yaw


def box_corners(centres: np.ndarray, length: np.ndarray, width: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(N, 4, 2) BEV corners of boxes whose `length` runs along `yaw`."""
    half = np.stack([length, width], axis=-1)[:, None, :] / 2 * np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]])
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = half[..., 0] * c - half[..., 1] * s
    y = half[..., 0] * s + half[..., 1] * c
    return np.stack([x, y], axis=-1) + centres[:, None, :2]


def agent_boxes_at(gt: dict, steps: int = NUM_STEPS) -> list[np.ndarray]:
    """Per future step, the (M, 5) BEV boxes x, y, l, w, yaw of the agents present at that step."""
    boxes = np.asarray(gt["gt_boxes"], dtype=np.float64)
    if boxes.size == 0:
        return [np.zeros((0, 5)) for _ in range(steps)]
    offsets = np.asarray(gt["gt_agent_fut_trajs"], dtype=np.float64)
    masks = np.asarray(gt["gt_agent_fut_masks"]).astype(bool)
    positions = boxes[:, None, :2] + np.cumsum(offsets, axis=1)
    out = []
    for t in range(steps):
        present = masks[:, t]
        out.append(np.concatenate([positions[present, t], boxes[present][:, [3, 4, 6]]], axis=1))
    return out


def collisions(traj: np.ndarray, agents: list[np.ndarray]) -> np.ndarray:
    """(T,) whether the ego box at each point of `traj` overlaps (or touches) an agent box then."""
    yaw = trajectory_yaw(traj)
    centres = traj + EGO_CENTRE_AHEAD * np.stack([np.cos(yaw), np.sin(yaw)], axis=1)
    ego = shapely.polygons(box_corners(centres, np.full(len(traj), EGO_LENGTH), np.full(len(traj), EGO_WIDTH), yaw))
    hit = np.zeros(len(traj), dtype=bool)
    for t, boxes in enumerate(agents):
        if len(boxes):
            others = shapely.polygons(box_corners(boxes[:, :2], boxes[:, 2], boxes[:, 3], boxes[:, 4]))
            hit[t] = bool(shapely.intersects(ego[t], others).any())
    return hit


def _running_report(per_step: np.ndarray, name: str) -> dict:
    """`{name}_1s/2s/3s` running means up to each step and `{name}_avg` their mean."""
    running = np.cumsum(per_step) / np.arange(1, len(per_step) + 1)
    out = {f"{name}_{key}": float(running[i]) for key, i in REPORT_STEPS.items()}
    out[f"{name}_avg"] = float(np.mean([out[f"{name}_{key}"] for key in REPORT_STEPS]))
    return out


def planning_metrics(plans: Sequence[np.ndarray], gt: Sequence[dict]) -> dict:
    """L2 (metres) and collision rate (a fraction, not %) at 1/2/3 s over aligned frame lists.

    Also `gt_collision_*` (how often the GT trajectory itself overlaps an agent box, upstream's
    `obj_col`) and `num_samples` (frames with a full GT future). NaN when no frame counts.
    """
    if len(plans) != len(gt):
        raise ValueError(f"{len(plans)} plans but {len(gt)} ground-truth frames")
    l2_sum = np.zeros(NUM_STEPS)
    col_sum = np.zeros(NUM_STEPS)
    gt_col_sum = np.zeros(NUM_STEPS)
    count = 0
    for plan, frame in zip(plans, gt):
        if not np.asarray(frame["gt_ego_fut_masks"])[:NUM_STEPS].astype(bool).all():
            continue  # upstream skips frames without a full GT future
        gt_traj = np.cumsum(np.asarray(frame["gt_ego_fut_trajs"], dtype=np.float64)[:NUM_STEPS], axis=0)
        plan = np.asarray(plan, dtype=np.float64)[:NUM_STEPS, :2]
        if plan.shape != (NUM_STEPS, 2):
            raise ValueError(f"a plan must be ({NUM_STEPS}, 2) cumulative positions, got {plan.shape}")
        l2_sum += np.linalg.norm(plan - gt_traj, axis=1)
        agents = agent_boxes_at(frame)
        gt_hit = collisions(gt_traj, agents)
        col_sum += collisions(plan, agents) & ~gt_hit
        gt_col_sum += gt_hit
        count += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        metrics = {
            **_running_report(l2_sum / count, "L2"),
            **_running_report(col_sum / count, "collision"),
            **_running_report(gt_col_sum / count, "gt_collision"),
        }
    metrics["num_samples"] = count
    return metrics


def planning_gt(record: dict) -> dict:
    """A prepared record's planning ground truth: the fields `planning_metrics` reads.

    Agent boxes are those with at least one lidar point, as upstream's evaluation dataset keeps them
    (`use_valid_flag` False), of every category.
    """
    keep = np.asarray(record["num_lidar_pts"]) > 0
    return {
        "gt_ego_fut_trajs": np.asarray(record["gt_ego_fut_trajs"]),
        "gt_ego_fut_masks": np.asarray(record["gt_ego_fut_masks"]),
        "gt_boxes": np.asarray(record["gt_boxes"])[keep],
        "gt_agent_fut_trajs": np.asarray(record["gt_agent_fut_trajs"])[keep],
        "gt_agent_fut_masks": np.asarray(record["gt_agent_fut_masks"])[keep],
    }
