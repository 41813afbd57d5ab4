"""SparseDrive map targets: polylines resampled to fixed points, their permutations, Hungarian matching.

Behaviour from swc-17/SparseDrive:
- `datasets/pipelines/vectorize.py` (`VectorizeMap` with sample_num=20, normalize=False, permute=True):
  every polyline becomes 20 points evenly spaced along its length, then 2 * (20 - 1) = 38 versions of
  it; a closed one (first point == last) gives every start point in both directions, an open one
  itself and its reversal followed by 36 rows of padding (1e5 m, never the cheapest);
- `models/map/{target.py, match_cost.py, loss.py}` (`SparsePoint3DTarget`, `MapQueriesCost` with
  `FocalLossCost` x1 and `LinesL1Cost` x10 (smooth L1, beta 0.01, permute=True), `SparseLineLoss`):
  points are normalised to the ROI, the line cost of a (query, GT) pair is its cheapest permutation,
  and that permutation is the query's regression target.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from raydrive.data.sparsedrive_fields import ROI_SIZE
from raydrive.models.sparse4d.blocks import averaged

NUM_SAMPLE = 20
PAD_VALUE = 1e5  # open polylines fill their unused permutation rows with this (metres)
CLOSED_ATOL = 1e-3


def num_permutations(num_sample: int = NUM_SAMPLE) -> int:
    return 2 * (num_sample - 1)


def resample_line(points: np.ndarray, num_sample: int = NUM_SAMPLE) -> np.ndarray:
    """(n, 2) polyline -> (num_sample, 2) points at equal arc-length steps from the first point to the
    last (shapely `LineString.interpolate` at `linspace(0, length, num_sample)`)."""
    points = np.asarray(points, dtype=np.float64)[:, :2]
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if len(points) < 2 or arc[-1] <= 0:
        return np.repeat(points[:1], num_sample, axis=0)
    at = np.linspace(0.0, arc[-1], num_sample)
    return np.stack([np.interp(at, arc, points[:, 0]), np.interp(at, arc, points[:, 1])], axis=-1)


def permute_line(line: np.ndarray, pad: float = PAD_VALUE) -> np.ndarray:
    """(P, 2) resampled polyline -> (2 (P - 1), P, 2): the orderings that describe the same element."""
    num_pts = len(line)
    num_perm = num_permutations(num_pts)
    if np.allclose(line[0], line[-1], atol=CLOSED_ATOL):
        ring = line[:-1]  # the repeated end point comes back after rolling
        versions = [np.roll(ring, shift, axis=0) for shift in range(num_pts - 1)]
        versions += [np.roll(ring[::-1], shift, axis=0) for shift in range(num_pts - 1)]
        out = np.stack(versions)
        return np.concatenate([out, out[:, :1]], axis=1)
    out = np.full((num_perm, num_pts, line.shape[-1]), pad, dtype=np.float64)
    out[0], out[1] = line, line[::-1]
    return out


def map_targets(map_annos: dict, num_sample: int = NUM_SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """`map_annos` ({class index: list of (n, 2) lidar-frame polylines}, as in sparsedrive_fields)
    -> labels LongTensor (N,) and lines FloatTensor (N, 2 (num_sample - 1), num_sample, 2) in metres."""
    labels, lines = [], []
    for label in sorted(map_annos):
        for points in map_annos[label]:
            if len(points) == 0:
                continue
            labels.append(int(label))
            lines.append(permute_line(resample_line(points, num_sample)))
    if not lines:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, num_permutations(num_sample), num_sample, 2)
    return torch.tensor(labels, dtype=torch.long), torch.from_numpy(np.stack(lines).astype(np.float32))


def normalize_line(line: torch.Tensor, roi_size: tuple[float, float] = ROI_SIZE) -> torch.Tensor:
    """(..., 2 P) flat xy points in metres -> the ROI mapped onto (0, 1) (upstream's eps included)."""
    roi = line.new_tensor(roi_size)
    pts = line.unflatten(-1, (-1, 2))
    return ((pts + roi / 2) / (roi + 1e-5)).flatten(-2)


def line_distance(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth L1 (plain L1 for beta 0), summed over points and divided by their number."""
    return smooth_l1(pred - target, beta).sum(-1) / (pred.shape[-1] // 2)


def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """mmdet's smooth L1 of a difference (broadcasts, unlike F.smooth_l1_loss); plain L1 for beta 0."""
    d = diff.abs()
    if beta <= 0:
        return d
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def focal_cost(cls_pred: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """mmdet's FocalLossCost: (num_query, num_gt)."""
    p = cls_pred.sigmoid()
    neg = -(1 - p + 1e-12).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + 1e-12).log() * alpha * (1 - p).pow(gamma)
    return pos[:, labels] - neg[:, labels]


class MapTarget:
    """Hungarian assignment of queries to permutation-invariant GT polylines (SparsePoint3DTarget)."""

    def __init__(
        self,
        num_sample: int = NUM_SAMPLE,
        roi_size: tuple[float, float] = ROI_SIZE,
        cls_weight: float = 1.0,
        line_weight: float = 10.0,
        beta: float = 0.01,
    ):
        self.num_sample, self.roi_size = num_sample, roi_size
        self.cls_weight, self.line_weight, self.beta = cls_weight, line_weight, beta

    def cost(self, cls_pred, line_pred, labels, lines) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_query, num_gt) matching cost and the cheapest permutation index of each pair.

        line_pred: (Q, 2 P) metres; lines: (G, num_perm, P, 2) metres."""
        pred = normalize_line(line_pred, self.roi_size)
        gt = normalize_line(lines.flatten(-2), self.roi_size)  # (G, num_perm, 2 P)
        dist = line_distance(pred[:, None, None], gt[None], self.beta)  # (Q, G, num_perm)
        line_cost, perm = dist.min(dim=-1)
        return focal_cost(cls_pred, labels) * self.cls_weight + line_cost * self.line_weight, perm

    @torch.no_grad()
    def sample(self, cls_pred, line_pred, labels_list, lines_list):
        """Per query: class target (num_cls = background), line target (metres, the chosen permutation)
        and weights (1 where matched). cls_pred (bs, Q, C), line_pred (bs, Q, 2 P)."""
        bs, num_query, num_cls = cls_pred.shape
        cls_target = torch.full((bs, num_query), num_cls, dtype=torch.long, device=cls_pred.device)
        line_target = line_pred.new_zeros(line_pred.shape)
        weights = line_pred.new_zeros(line_pred.shape)
        for i in range(bs):
            labels, lines = labels_list[i].to(cls_pred.device), lines_list[i].to(line_pred)
            if len(labels) == 0:
                continue
            cost, perm = self.cost(cls_pred[i], line_pred[i], labels, lines)
            cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=1e8).cpu().numpy()
            q_idx, g_idx = linear_sum_assignment(cost)
            q_idx, g_idx = (torch.as_tensor(x, device=cls_pred.device) for x in (q_idx, g_idx))
            cls_target[i, q_idx] = labels[g_idx]
            line_target[i, q_idx] = lines[g_idx, perm[q_idx, g_idx]].flatten(-2)
            weights[i, q_idx] = 1.0
        return cls_target, line_target, weights


def line_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    avg_factor: float,
    roi_size: tuple[float, float] = ROI_SIZE,
    beta: float = 0.01,
    loss_weight: float = 10.0,
) -> torch.Tensor:
    """SparseLineLoss / LinesL1Loss: weighted smooth L1 on ROI-normalised points, summed, over
    `avg_factor` and the number of points. pred, target, weight: (M, 2 P) metres."""
    if pred.numel() == 0:
        return pred.sum() * 0.0
    d = smooth_l1(normalize_line(pred, roi_size) - normalize_line(target, roi_size), beta)
    return averaged((d * weight).sum(), avg_factor) / (pred.shape[-1] // 2) * loss_weight
