"""Vectorised-map average precision with Chamfer matching, as SparseDrive scores its map head.

Inputs (both in the key-frame lidar frame, metres):

- predictions: one dict per frame with `vectors` (K, P, 2) polylines, `scores` (K,) and `labels` (K,)
  indexing `MAP_CLASSES` (0 ped_crossing, 1 divider, 2 boundary). Lines with fewer than two points
  are dropped, as upstream's `format_map_results` does.
- ground_truths: one `map_annos` dict per frame, `{label: [(n, 2) polyline, ...]}`, the format of
  `raydrive/data/sparsedrive_fields.py` (`map_annos_from_columns` rebuilds it from a record).

The recipe follows upstream's `datasets/evaluation/map/{vector_eval.py, AP.py, distance.py}` and the
`VectorizeMap(simplify=True)` step of its eval pipeline: ground-truth lines are simplified with a
0.2 m tolerance; every line is resampled to 200 points evenly spaced along its length; the distance
between two lines is their symmetric Chamfer distance (the mean of the two directed mean nearest-point
distances). Per frame and class, predictions are visited by descending score; each one is a true
positive when its nearest ground-truth line is within the threshold and not already taken, else a
false positive (it does not fall back to its second-nearest line). AP is the area under the
all-frames precision-recall curve with precision made monotone (VOC "area" mode). A class's AP is
the mean over the thresholds; `map_mAP` is the mean over classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from shapely.geometry import LineString

from raydrive.data.sparsedrive_fields import MAP_CLASSES

THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 1.5)  # metres of Chamfer distance
NUM_SAMPLE_POINTS = 200  # upstream's INTERP_NUM
GT_SIMPLIFY_TOLERANCE = 0.2  # metres; upstream's eval-time VectorizeMap(simplify=True)


def resample(line: np.ndarray, num_points: int = NUM_SAMPLE_POINTS) -> np.ndarray:
    """(num_points, 2) points evenly spaced by arc length from the first to the last vertex."""
    line = np.asarray(line, dtype=np.float64)[:, :2]
    seg = np.linalg.norm(np.diff(line, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.linspace(0.0, along[-1], num_points)
    if along[-1] == 0.0:  # a degenerate line: all samples on its single point
        return np.repeat(line[:1], num_points, axis=0)
    keep = np.concatenate([[True], seg > 0])  # np.interp needs strictly increasing arc lengths
    return np.stack([np.interp(targets, along[keep], line[keep, k]) for k in range(2)], axis=1)


def simplify(line: np.ndarray, tolerance: float = GT_SIMPLIFY_TOLERANCE) -> np.ndarray:
    """Douglas-Peucker simplification of a ground-truth line, as upstream's eval pipeline applies."""
    return np.asarray(LineString(np.asarray(line, dtype=np.float64)[:, :2]).simplify(tolerance).coords)


def chamfer_matrix(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """(M, N) symmetric Chamfer distances between resampled lines (M, P, 2) and (N, P, 2)."""
    out = np.zeros((len(preds), len(gts)))
    for j, gt in enumerate(gts):  # one ground-truth line at a time keeps memory at M * P * P
        d = np.linalg.norm(preds[:, :, None, :] - gt[None, None, :, :], axis=-1)  # (M, P, P)
        out[:, j] = (d.min(axis=2).mean(axis=1) + d.min(axis=1).mean(axis=1)) / 2
    return out


def match_frame(
    pred_lines: np.ndarray, scores: np.ndarray, gt_lines: np.ndarray, thresholds: Sequence[float]
) -> list[np.ndarray]:
    """Per threshold, a (M,) true-positive flag for one frame's predictions of one class."""
    if len(pred_lines) == 0 or len(gt_lines) == 0:
        return [np.zeros(len(pred_lines), dtype=bool) for _ in thresholds]
    dist = chamfer_matrix(pred_lines, gt_lines)
    nearest, nearest_dist = dist.argmin(axis=1), dist.min(axis=1)
    order = np.argsort(-scores, kind="stable")
    flags = []
    for thr in thresholds:
        tp = np.zeros(len(pred_lines), dtype=bool)
        taken = np.zeros(len(gt_lines), dtype=bool)
        for i in order:
            if nearest_dist[i] <= thr and not taken[nearest[i]]:
                taken[nearest[i]] = tp[i] = True
        flags.append(tp)
    return flags


def average_precision(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """Area under the precision-recall curve of all frames' detections (upstream's "area" mode)."""
    order = np.argsort(-scores, kind="stable")
    tp_cum = np.cumsum(tp[order])
    fp_cum = np.cumsum(~tp[order])
    eps = np.finfo(np.float32).eps
    recall = tp_cum / max(num_gt, eps)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at recall >= r
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _frame_lines(pred: dict, label: int) -> tuple[np.ndarray, np.ndarray]:
    """One frame's resampled predicted lines of one class and their scores."""
    labels = np.asarray(pred.get("labels", []), dtype=np.int64).reshape(-1)
    scores = np.asarray(pred.get("scores", []), dtype=np.float64).reshape(-1)
    vectors = pred.get("vectors", [])
    lines, kept = [], []
    for i in np.nonzero(labels == label)[0]:
        line = np.asarray(vectors[i], dtype=np.float64)
        if len(line) >= 2:
            lines.append(resample(line))
            kept.append(scores[i])
    if not lines:
        return np.zeros((0, NUM_SAMPLE_POINTS, 2)), np.zeros(0)
    return np.stack(lines), np.asarray(kept)


def _gt_lines(annos: dict, label: int) -> np.ndarray:
    lines = [resample(simplify(line)) for line in annos.get(label, []) if len(line) >= 2]
    return np.stack(lines) if lines else np.zeros((0, NUM_SAMPLE_POINTS, 2))


def map_ap(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    thresholds: Sequence[float] = THRESHOLDS,
    classes: Sequence[str] = MAP_CLASSES,
) -> dict:
    """Chamfer AP per class and threshold over aligned frame lists; see the module docstring.

    Returns `{class}_AP@{thr}` and `{class}_AP` (mean over thresholds) per class, `map_mAP` (mean of
    the class APs, upstream's `mAP_normal`), and per class `{class}_num_gts` / `{class}_num_preds`.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} prediction frames but {len(ground_truths)} ground-truth frames")
    metrics: dict = {}
    class_aps = []
    for label, name in enumerate(classes):
        flags: list[list[np.ndarray]] = [[] for _ in thresholds]
        all_scores, num_gt = [], 0
        for pred, annos in zip(predictions, ground_truths):
            lines, scores = _frame_lines(pred, label)
            gts = _gt_lines(annos, label)
            num_gt += len(gts)
            all_scores.append(scores)
            for k, tp in enumerate(match_frame(lines, scores, gts, thresholds)):
                flags[k].append(tp)
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
        aps = []
        for thr, tp in zip(thresholds, flags):
            ap = average_precision(np.concatenate(tp) if tp else np.zeros(0, dtype=bool), scores, num_gt)
            metrics[f"{name}_AP@{thr}"] = ap
            aps.append(ap)
        metrics[f"{name}_AP"] = float(np.mean(aps))
        metrics[f"{name}_num_gts"] = num_gt
        metrics[f"{name}_num_preds"] = len(scores)
        class_aps.append(metrics[f"{name}_AP"])
    metrics["map_mAP"] = float(np.mean(class_aps))
    return metrics
