"""Sparse4D's deformable feature aggregation.

Semantics of the fused kernel (Sparse4D `ops/src/deformable_aggregation_cuda.cu`, and
`mx_driving.deformable_aggregation` on Ascend): for every anchor, key point, camera and level, sample
the level's feature map bilinearly at (u W - 0.5, v H - 0.5) with zero padding, but skip the sample
entirely when u or v lies outside (0, 1); multiply each group's C / G channels by that group's
weight; sum over cameras, levels and points.

The reference here does the same with `grid_sample(align_corners=False, padding_mode="zeros")`
(which samples at u W - 0.5) and zeroes the weights of out-of-range points.

Border rule: upstream's Python fallback (`DeformableFeatureAggregation.feature_sampling` in
`projects/mmdet3d_plugin/models/blocks.py`) calls grid_sample without that mask, so a point just
outside the image still picks up half a pixel of the border; the kernel skips it. The upstream v3
config sets `use_deformable_func = True`, i.e. trains and evaluates with the kernel, so raydrive
follows the kernel (as every raydrive op does where a fused kernel and its fallback disagree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mx_driving():
    try:
        import mx_driving  # noqa: F401 (Ascend only)

        return mx_driving
    except ImportError:
        return None


def deformable_aggregation(
    feature_maps: list[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor, use_fused: bool | None = None
) -> torch.Tensor:
    """Aggregate multi-camera, multi-level features at projected key points.

    feature_maps: per level (bs, cams, C, H, W).
    points_2d: (bs, N, P, cams, 2), (u, v) normalised to [0, 1] by the image size.
    weights: (bs, N, P, cams, levels, groups), already soft-maxed.
    Returns (bs, N, C).
    """
    if use_fused is None:
        use_fused = feature_maps[0].device.type == "npu" and _mx_driving() is not None
    if use_fused:
        return _fused_npu(feature_maps, points_2d, weights)
    return deformable_aggregation_reference(feature_maps, points_2d, weights)


def deformable_aggregation_reference(feature_maps, points_2d, weights) -> torch.Tensor:
    bs, n, p, cams, _ = points_2d.shape
    groups = weights.shape[-1]
    c = feature_maps[0].shape[2]
    u, v = points_2d[..., 0], points_2d[..., 1]
    valid = ((u > 0) & (u < 1) & (v > 0) & (v < 1)).to(weights.dtype)  # (bs, N, P, cams)
    grid = (points_2d * 2 - 1).permute(0, 3, 1, 2, 4).flatten(0, 1)  # (bs*cams, N, P, 2)
    out = points_2d.new_zeros(bs, n, groups, c // groups)
    for level, fm in enumerate(feature_maps):
        sampled = F.grid_sample(
            fm.flatten(0, 1), grid.to(fm.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampled = sampled.reshape(bs, cams, groups, c // groups, n, p)
        w = weights[..., level, :] * valid[..., None]  # (bs, N, P, cams, groups)
        out = out + torch.einsum("bcgdnp,bnpcg->bngd", sampled.to(w.dtype), w)
    return out.reshape(bs, n, c)


def deformable_aggregation_loop(feature_maps, points_2d, weights) -> torch.Tensor:
    """Slow, obviously correct version of the kernel's arithmetic (for tests on tiny inputs)."""
    bs, n, p, cams, _ = points_2d.shape
    groups = weights.shape[-1]
    c = feature_maps[0].shape[2]
    gd = c // groups
    out = torch.zeros(bs, n, c, dtype=torch.float64)
    for b in range(bs):
        for a in range(n):
            for k in range(p):
                for cam in range(cams):
                    u, v = float(points_2d[b, a, k, cam, 0]), float(points_2d[b, a, k, cam, 1])
                    if not (0 < u < 1 and 0 < v < 1):
                        continue
                    for level, fm in enumerate(feature_maps):
                        h, w = fm.shape[-2:]
                        x, y = u * w - 0.5, v * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        val = torch.zeros(c, dtype=torch.float64)
                        for yy, xx, wt in (
                            (y0, x0, (x0 + 1 - x) * (y0 + 1 - y)),
                            (y0, x0 + 1, (x - x0) * (y0 + 1 - y)),
                            (y0 + 1, x0, (x0 + 1 - x) * (y - y0)),
                            (y0 + 1, x0 + 1, (x - x0) * (y - y0)),
                        ):
                            if 0 <= yy < h and 0 <= xx < w:
                                val += wt * fm[b, cam, :, yy, xx].double()
                        for g in range(groups):
                            out[b, a, g * gd : (g + 1) * gd] += (
                                float(weights[b, a, k, cam, level, g]) * val[g * gd : (g + 1) * gd]
                            )
    return out


def _fused_npu(feature_maps, points_2d, weights) -> torch.Tensor:
    """mx_driving's kernel takes the flattened multi-camera, multi-scale layout of the CUDA op."""
    import mx_driving

    bs, cams = feature_maps[0].shape[:2]
    c = feature_maps[0].shape[2]
    flat = torch.cat([fm.flatten(3).permute(0, 1, 3, 2) for fm in feature_maps], dim=2)  # (bs, cams, sum HW, C)
    shapes = torch.tensor([list(fm.shape[-2:]) for fm in feature_maps], device=flat.device, dtype=torch.int32)
    sizes = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    spatial_shape = shapes[None].repeat(cams, 1, 1)
    scale_start = (
        start[None].repeat(cams, 1) + torch.arange(cams, device=flat.device, dtype=torch.int32)[:, None] * sizes.sum()
    )
    out = mx_driving.deformable_aggregation(flat.flatten(1, 2), spatial_shape, scale_start, points_2d, weights)
    return out.reshape(bs, -1, c)
