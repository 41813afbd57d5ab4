"""Sparse4D's k-means anchors (Sparse4D `tools/anchor_generator.py`).

K-means with K=900 on the centres of all train boxes within 55 m; each anchor row is
[x, y, z, log mean l, log mean w, log mean h, sin 0, cos 1, vx 0, vy 0, vz 0] (11 values).

As upstream, "all boxes" means every `gt_boxes` row of the info records, whatever its `gt_names`:
non-detection categories (kept under their raw nuScenes name, e.g. `movable_object.debris`, see
`infos.class_name`) count towards both the clustered centres and the mean size.
"""

from __future__ import annotations

import warnings

import numpy as np

from raydrive.data.infos import DataError


def kmeans_anchors(records: list[dict], num_anchors: int = 900, max_range: float = 55.0, seed: int = 0) -> np.ndarray:
    # Sparse4D tools/anchor_generator.py: concatenate every info's gt_boxes, no class filter.
    boxes = [np.asarray(r["gt_boxes"], dtype=np.float64).reshape(-1, 7) for r in records]
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 7))
    boxes = boxes[np.linalg.norm(boxes[:, :3], axis=1) <= max_range]
    if len(boxes) == 0:
        raise DataError("no train boxes within 55 m: cannot compute k-means anchors (is the train split empty?)")
    centres = boxes[:, :3]
    k = min(num_anchors, len(np.unique(centres, axis=0)))
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(centres)
    clusters = km.cluster_centers_
    if k < num_anchors:
        # A tiny set has fewer distinct centres than anchors: repeat clusters with a little jitter.
        rng = np.random.default_rng(seed)
        extra = clusters[rng.integers(k, size=num_anchors - k)] + rng.normal(0, 0.5, size=(num_anchors - k, 3))
        clusters = np.concatenate([clusters, extra])
    mean_size = np.log(boxes[:, 3:6].mean(0))
    anchors = np.zeros((num_anchors, 11), dtype=np.float32)
    anchors[:, :3] = clusters
    anchors[:, 3:6] = mean_size
    anchors[:, 7] = 1.0  # cos(0)
    return anchors
