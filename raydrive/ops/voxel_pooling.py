"""BEVDepth's voxel pooling: sum frustum-point features into BEV cells.

Semantics of the CUDA op (BEVDepth `bevdepth/ops/voxel_pooling_train/src/voxel_pooling_train_forward_cuda.cu`
and its autograd wrapper `voxel_pooling_train.py`): `geom_xyz` holds each point's cell index (x, y, z),
already truncated toward zero by the caller (`((geom - (coord - size / 2)) / size).int()` in
`bevdepth/layers/backbones/base_lss_fpn.py`); a point is kept when 0 <= x < X, 0 <= y < Y and 0 <= z < Z
(z only filters: the map has one z slice per (y, x)), and kept points are summed into cell (b, y, x).
The output is (B, C, Y, X), a permuted view of a (B, Y, X, C) buffer as upstream returns it. The backward
is a gather: every kept point receives the gradient of its cell, dropped points receive zero.

Precision: upstream accumulates fp16 inputs with fp16 atomics; raydrive accumulates in fp32 (fp64 for
fp64 inputs) and casts the map back to the input dtype, so a cell that sums thousands of points does not
lose the small ones.

Dispatch: on Ascend, `mx_driving.npu_voxel_pooling_train(geom_xyz (B, N, 3) int32, features (B, N, C)
float32, voxel_num [X, Y, Z]) -> (B, C, Y, X)` (Ascend/DrivingSDK `mx_driving/ops/voxel_pooling_train.py`;
its kernel registers float32 only, `mx_driving/common/ops/kernels/op_host/voxel_pooling_train.cpp`, so other
dtypes go through fp32). Everywhere else, CUDA included, the reference below: one `index_add_` over all
points (dropped points land in spare rows, so no compaction pass) and a single `index_select` backward.
`benchmarks/voxel_pooling.py` measures it against the alternatives (plain autograd over the kept points,
a sort + `segment_reduce` variant) on whatever device is present.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Dropped points are summed into spare rows below the map instead of being compacted away first; spreading
# them over several rows keeps CUDA atomics from piling onto one address.
_SPARE_ROWS = 256


def _mx_driving():
    try:
        import mx_driving  # noqa: F401 (Ascend only)

        return mx_driving
    except ImportError:
        return None


def _voxel_num(voxel_num) -> tuple[int, int, int]:
    if isinstance(voxel_num, torch.Tensor):
        voxel_num = voxel_num.tolist()
    x, y, z = (int(v) for v in voxel_num)
    return x, y, z


def voxel_pooling(
    geom_xyz: torch.Tensor,
    features: torch.Tensor,
    voxel_num: Sequence[int] | torch.Tensor,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """Sum point features into a BEV grid.

    geom_xyz: (B, ..., 3) integer cell indices (x, y, z) per point.
    features: (B, ..., C), the same leading shape (BEVDepth: (B, N, D, H, W, C)).
    voxel_num: (X, Y, Z) cells per axis.
    Returns (B, C, Y, X) in the dtype of `features`.
    """
    if use_fused is None:
        use_fused = features.device.type == "npu" and _mx_driving() is not None
    if use_fused:
        return _fused_npu(geom_xyz, features, voxel_num)
    return voxel_pooling_reference(geom_xyz, features, voxel_num)


def voxel_pooling_reference(
    geom_xyz: torch.Tensor, features: torch.Tensor, voxel_num: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    if geom_xyz.shape[:-1] != features.shape[:-1] or geom_xyz.shape[-1] != 3:
        raise ValueError(f"geom_xyz {tuple(geom_xyz.shape)} must be features {tuple(features.shape)}[:-1] + (3,)")
    if geom_xyz.is_floating_point():
        raise TypeError("geom_xyz must hold integer cell indices (truncate with .int() first, as upstream does)")
    return _VoxelPooling.apply(geom_xyz, features, _voxel_num(voxel_num))


def _cell_rows(geom_xyz: torch.Tensor, voxel_num: tuple[int, int, int]) -> torch.Tensor:
    """Row of every point in the (B * Y * X + spare, C) accumulation buffer: b * Y * X + y * X + x when kept,
    a spare row past the map otherwise."""
    nx, ny, nz = voxel_num
    b = geom_xyz.shape[0]
    g = geom_xyz.reshape(b, -1, 3)
    x, y, z = g[..., 0].long(), g[..., 1].long(), g[..., 2].long()
    kept = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    batch = torch.arange(b, device=g.device)[:, None]
    rows = (batch * ny + y) * nx + x
    spare = b * ny * nx + torch.arange(g.shape[1], device=g.device) % _SPARE_ROWS
    return torch.where(kept, rows, spare).reshape(-1)


class _VoxelPooling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, geom_xyz, features, voxel_num):
        nx, ny, _ = voxel_num
        b, c = features.shape[0], features.shape[-1]
        rows = _cell_rows(geom_xyz, voxel_num)
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        src = features.reshape(-1, c).to(acc)  # a view for fp32 / fp64 contiguous input
        out = features.new_zeros(b * ny * nx + _SPARE_ROWS, c, dtype=acc).index_add_(0, rows, src)
        ctx.save_for_backward(rows)
        ctx.shape, ctx.dtype = features.shape, features.dtype
        out = out[: b * ny * nx].view(b, ny, nx, c).permute(0, 3, 1, 2)
        return out.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (rows,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        b, c, ny, nx = grad_out.shape
        grad_rows = grad_out.new_zeros(b * ny * nx + _SPARE_ROWS, c)  # spare rows stay zero
        grad_rows[: b * ny * nx].view(b, ny, nx, c).copy_(grad_out.permute(0, 2, 3, 1))
        grad = grad_rows.index_select(0, rows).reshape(ctx.shape).to(ctx.dtype)
        return None, grad, None


def voxel_pooling_oracle(
    geom_xyz: torch.Tensor, features: torch.Tensor, voxel_num: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Slow, obviously correct loop over points in float64 (for tests on tiny inputs)."""
    nx, ny, nz = _voxel_num(voxel_num)
    b, c = features.shape[0], features.shape[-1]
    geom = geom_xyz.reshape(b, -1, 3).tolist()
    feat = features.reshape(b, -1, c).double()
    out = [[[None] * nx for _ in range(ny)] for _ in range(b)]
    for i in range(b):
        for j, (x, y, z) in enumerate(geom[i]):
            if 0 <= x < nx and 0 <= y < ny and 0 <= z < nz:
                out[i][y][x] = feat[i, j] if out[i][y][x] is None else out[i][y][x] + feat[i, j]
    zero = torch.zeros(c, dtype=torch.float64)
    rows = [torch.stack([v if v is not None else zero for row in out[i] for v in row]) for i in range(b)]
    return torch.stack(rows).reshape(b, ny, nx, c).permute(0, 3, 1, 2)


def _fused_npu(geom_xyz, features, voxel_num) -> torch.Tensor:
    from mx_driving import npu_voxel_pooling_train

    b, c = features.shape[0], features.shape[-1]
    geom = geom_xyz.reshape(b, -1, 3).to(torch.int32).contiguous()
    feat = features.reshape(b, -1, c).float().contiguous()
    out = npu_voxel_pooling_train(geom, feat, list(_voxel_num(voxel_num)))
    return out.to(features.dtype)
