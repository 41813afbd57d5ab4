"""SparseDrive's k-means anchors (upstream `tools/kmeans/kmeans_{det,map,motion,plan}.py`).

Each recipe reads the train split's info records (timestamp order, as upstream sorts them):

- det (900 x 11): centres of every `gt_boxes` row with BEV distance < 55 m, whatever its class; the
  other slots are [1, 1, 1, 1, 0, 0, 0, 0] (sizes 1, SIN slot 1, COS slot 0, no velocity). This is not
  Sparse4D's anchor file (`anchors.py`: 3-D distance <= 55 m, log mean sizes, COS slot 1).
- map (100 x 20 x 2): the means of every map polyline (all classes), each cluster centre turned into a
  vertical 8 m segment of 20 points (x fixed, y from -4 to 4 around the centre).
- motion (10 x 6 x 12 x 2): per detection class, the cumulative 12-step futures of boxes with a full
  future within 55 m (BEV), rotated into the agent's frame (by minus its lidar yaw).
- plan (3 x 6 x 6 x 2): per driving command (right, left, straight), the cumulative 6-step ego futures
  of frames with a full future.

Upstream runs sklearn's `KMeans` with its defaults and no seed; here it is seeded. Upstream needs the
full nuScenes train split; a small set (the embedded synthetic one) may have fewer distinct points
than clusters, or no sample of a class or command. Then, so that every file keeps upstream's shape:
a class or command with fewer samples than clusters takes the clusters of all classes (commands)
pooled, and a set with fewer distinct points than clusters repeats centres with a little jitter.
Scenes too short for any full future (6 s agent, 3 s ego) make the motion and plan recipes use the
longest futures there are, extended at constant velocity, with a warning (`_steps_to_use`).
"""

from __future__ import annotations

import warnings

import numpy as np

from raydrive.data.constants import CLASSES
from raydrive.data.infos import DataError
from raydrive.data.sparsedrive_fields import (
    AGENT_FUT_STEPS,
    COMMANDS,
    EGO_FUT_STEPS,
    map_annos_from_columns,
    require_sparsedrive_fields,
)

DET_CLUSTERS = 900
MAP_CLUSTERS = 100
MAP_POINTS = 20  # points per map anchor polyline
MAP_ANCHOR_HALF_LENGTH = 4.0  # metres: anchors run from -4 to +4 m in y around their centre
MODES = 6  # motion and plan modes per class / command
MAX_DISTANCE = 55.0  # metres, BEV
DET_OTHER_SLOTS = (1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # size x3, SIN, COS, velocity x3, as upstream


def fit_centres(points: np.ndarray, k: int, seed: int = 0, jitter: float = 0.5) -> np.ndarray:
    """k cluster centres of (N, D) points; with fewer distinct points than k, the missing centres are
    copies of found ones plus Gaussian jitter of `jitter` (the units of the points)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        raise DataError("k-means on no points")
    distinct = min(k, len(np.unique(points, axis=0)))
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about duplicate points on tiny sets
        centres = KMeans(n_clusters=distinct, n_init="auto", random_state=seed).fit(points).cluster_centers_
    if distinct == k:
        return centres
    rng = np.random.default_rng(seed)
    extra = centres[rng.integers(distinct, size=k - distinct)]
    return np.concatenate([centres, extra + rng.normal(0.0, jitter, size=extra.shape)])


def _grouped_centres(groups: list[np.ndarray], k: int, seed: int, what: str) -> np.ndarray:
    """Centres per group (G, k, D); groups with fewer than k samples take the pooled centres."""
    pooled = np.concatenate(groups)
    if len(pooled) == 0:
        raise DataError(f"{what}: the train split has no sample to cluster")
    fallback = None
    out = []
    for group in groups:
        if len(group) >= k:
            out.append(fit_centres(group, k, seed))
            continue
        if fallback is None:
            fallback = fit_centres(pooled, k, seed)
        out.append(fallback)
    return np.stack(out)


def det_anchors(records: list[dict], k: int = DET_CLUSTERS, seed: int = 0) -> np.ndarray:
    """(k, 11) float64: box-centre clusters, then the fixed slots."""
    boxes = np.concatenate([np.asarray(r["gt_boxes"], np.float64).reshape(-1, 7) for r in records])
    centres = boxes[np.linalg.norm(boxes[:, :2], axis=1) < MAX_DISTANCE, :3]
    if len(centres) == 0:
        raise DataError(f"no train boxes within {MAX_DISTANCE:g} m: cannot compute SparseDrive's det anchors")
    clusters = fit_centres(centres, k, seed)
    return np.concatenate([clusters, np.tile(DET_OTHER_SLOTS, (k, 1))], axis=1)


def map_anchors(records: list[dict], k: int = MAP_CLUSTERS, seed: int = 0) -> np.ndarray:
    """(k, 20, 2) float64: vertical 8 m segments through the clusters of polyline means."""
    require_sparsedrive_fields(records, "SparseDrive's map k-means", ("has_map_annos",))
    means = [line.mean(axis=0) for r in records for lines in map_annos_from_columns(r).values() for line in lines]
    if not means:
        raise DataError("the train split has no map polyline: cannot compute SparseDrive's map anchors")
    centres = fit_centres(np.stack(means), k, seed)
    offsets = np.stack(
        [np.zeros(MAP_POINTS), np.linspace(-MAP_ANCHOR_HALF_LENGTH, MAP_ANCHOR_HALF_LENGTH, MAP_POINTS)], axis=-1
    )
    return centres[:, None] + offsets[None]


def to_agent_frame(offsets: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """(N, T, 2) lidar-frame step offsets -> cumulative positions in each agent's frame (rotated by -yaw)."""
    traj = np.cumsum(offsets, axis=1)
    c, s = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    x, y = traj[..., 0], traj[..., 1]
    return np.stack([c * x + s * y, -s * x + c * y], axis=-1)


def extend_steps(offsets: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, T, 2) offsets with the steps past each mask's valid prefix repeating its last valid offset
    (constant velocity)."""
    out = np.array(offsets, dtype=np.float64)
    valid = np.asarray(masks).sum(axis=1).astype(int)
    for i, n in enumerate(valid):
        if 0 < n < out.shape[1]:
            out[i, n:] = out[i, n - 1]
    return out


def _agent_samples(records: list[dict], min_steps: int) -> list[np.ndarray]:
    """Per class, (n, 24) agent-frame futures of boxes within 55 m with >= `min_steps` valid steps."""
    per_class: list[list[np.ndarray]] = [[] for _ in CLASSES]
    for r in records:
        boxes = np.asarray(r["gt_boxes"], np.float64).reshape(-1, 7)
        masks = np.asarray(r["gt_agent_fut_masks"]).reshape(-1, AGENT_FUT_STEPS)
        trajs = np.asarray(r["gt_agent_fut_trajs"], np.float64).reshape(-1, AGENT_FUT_STEPS, 2)
        enough = masks.sum(axis=1) >= min_steps
        near = np.linalg.norm(boxes[:, :2], axis=1) < MAX_DISTANCE
        names = np.asarray(r["gt_names"], dtype=object)
        for c, name in enumerate(CLASSES):
            keep = (names == name) & enough & near
            if keep.any():
                traj = to_agent_frame(extend_steps(trajs[keep], masks[keep]), boxes[keep, 6])
                per_class[c].append(traj.reshape(-1, AGENT_FUT_STEPS * 2))
    return [np.concatenate(g) if g else np.zeros((0, AGENT_FUT_STEPS * 2)) for g in per_class]


def _steps_to_use(counts: list[int], full: int, what: str) -> int:
    """Valid steps a sample needs: `full` as upstream, or, when no sample has that many (scenes too
    short, as in the small synthetic sets), the most any sample has (warned)."""
    most = max(counts, default=0)
    if most == 0:
        raise DataError(f"{what}: no train sample has a future step to cluster")
    if most < full:
        warnings.warn(
            f"{what}: no train sample has a full {full}-step future (scenes too short); clustering the "
            f"{most}-step ones, extended at constant velocity",
            stacklevel=3,
        )
    return min(most, full)


def motion_anchors(records: list[dict], k: int = MODES, seed: int = 0) -> np.ndarray:
    """(10, k, 12, 2) float64: per class, clusters of full agent-frame futures within 55 m."""
    require_sparsedrive_fields(records, "SparseDrive's motion k-means", ("has_futures",))
    counts = [int(n) for r in records for n in np.asarray(r["gt_agent_fut_masks"]).reshape(-1, AGENT_FUT_STEPS).sum(1)]
    steps = _steps_to_use(counts, AGENT_FUT_STEPS, "SparseDrive's motion k-means")
    groups = _agent_samples(records, steps)
    return _grouped_centres(groups, k, seed, "SparseDrive's motion k-means").reshape(len(CLASSES), k, -1, 2)


def plan_anchors(records: list[dict], k: int = MODES, seed: int = 0) -> np.ndarray:
    """(3, k, 6, 2) float64: per command (right, left, straight), clusters of full cumulative ego futures."""
    require_sparsedrive_fields(records, "SparseDrive's plan k-means", ("has_futures",))
    counts = [int(np.asarray(r["gt_ego_fut_masks"]).sum()) for r in records]
    steps = _steps_to_use(counts, EGO_FUT_STEPS, "SparseDrive's plan k-means")
    per_command: list[list[np.ndarray]] = [[] for _ in COMMANDS]
    for r, count in zip(records, counts):
        if count < steps:
            continue
        command = int(np.argmax(np.asarray(r["gt_ego_fut_cmd"]).astype(np.int32)))
        offsets = extend_steps(np.asarray(r["gt_ego_fut_trajs"])[None], np.asarray(r["gt_ego_fut_masks"])[None])[0]
        per_command[command].append(np.cumsum(offsets, axis=0).reshape(-1))
    groups = [np.stack(g) if g else np.zeros((0, EGO_FUT_STEPS * 2)) for g in per_command]
    return _grouped_centres(groups, k, seed, "SparseDrive's plan k-means").reshape(len(COMMANDS), k, -1, 2)
