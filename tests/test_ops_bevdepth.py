"""BEVDepth's ops: voxel pooling against a loop over points, deformable conv against mmcv's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raydrive.ops.deform_conv import DeformConv2dPack, deform_conv2d, deform_conv2d_oracle
from raydrive.ops.voxel_pooling import voxel_pooling, voxel_pooling_oracle, voxel_pooling_reference

# ---------------------------------------------------------------------------------------------- voxel pooling


def _random_points(g, b=3, lead=(2, 4, 3, 5), c=6, grid=(7, 5, 3), dtype=torch.float64):
    nx, ny, nz = grid
    shape = (b, *lead)
    geom = torch.stack(
        [
            torch.randint(-3, nx + 3, shape, generator=g),
            torch.randint(-3, ny + 3, shape, generator=g),
            torch.randint(-2, nz + 2, shape, generator=g),
        ],
        dim=-1,
    ).int()
    feats = torch.randn(*shape, c, generator=g, dtype=torch.float64).to(dtype)
    return geom, feats


def _kept(geom, grid):
    return ((geom >= 0) & (geom < torch.tensor(grid))).all(-1)


def test_voxel_pooling_matches_oracle_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    grid = (7, 5, 3)  # X != Y != Z, so a swapped axis cannot pass
    geom, feats = _random_points(g, grid=grid)
    feats.requires_grad_(True)
    kept = _kept(geom, grid)
    # the case is non-trivial: points fall off every axis on both sides, kept points use z != 0,
    # and several points share a cell
    for axis, size in enumerate(grid):
        assert (geom[..., axis] < 0).any() and (geom[..., axis] >= size).any()
    assert (kept & (geom[..., 2] > 0)).any() and 0 < kept.sum() < kept.numel()
    cells = geom[kept][:, :2]
    assert torch.unique(cells, dim=0).shape[0] < cells.shape[0]

    out = voxel_pooling_reference(geom, feats, grid)
    ref = voxel_pooling_oracle(geom, feats, grid)
    assert out.shape == (3, 6, 5, 7) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * upstream).sum(), feats)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), feats)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
    # the gather backward: a kept point receives its cell's gradient, a dropped one exactly zero
    assert (grad[~kept] == 0).all()
    b_idx = torch.arange(3)[:, None, None, None, None].expand(kept.shape)[kept]
    torch.testing.assert_close(grad[kept], upstream[b_idx, :, geom[kept][:, 1], geom[kept][:, 0]])
    small = feats.detach()[:1, :1, :2].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: voxel_pooling_reference(geom[:1, :1, :2], f, grid), (small,))


def test_voxel_pooling_layout_is_b_c_y_x():
    geom = torch.tensor([[[4, 1, 0], [0, 2, 0], [4, 1, 0]], [[2, 3, 0], [2, 3, 1], [5, 0, 0]]], dtype=torch.int32)
    feats = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3)
    out = voxel_pooling(geom, feats, torch.tensor([5, 4, 1]))  # upstream passes voxel_num as a tensor
    assert out.shape == (2, 3, 4, 5)
    expected = torch.zeros(2, 3, 4, 5)
    expected[0, :, 1, 4] = feats[0, 0] + feats[0, 2]  # two points in one cell are summed
    expected[0, :, 2, 0] = feats[0, 1]
    expected[1, :, 3, 2] = feats[1, 0]  # (2, 3, 1) has z = 1 >= Z and (5, 0, 0) has x = 5 >= X: dropped
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_voxel_pooling_low_precision_accumulates_in_fp32(dtype, ulp):
    g = torch.Generator().manual_seed(1)
    grid = (4, 3, 1)
    n = 6000
    geom = torch.zeros(1, n, 3, dtype=torch.int32)
    geom[0, : n // 2, 0] = 2  # 3000 points in cell (y=0, x=2), 3000 in (0, 0)
    feats = torch.rand(1, n, 5, generator=g, dtype=torch.float64).mul_(0.5).add_(0.5).to(dtype)
    feats[0, 0] = 1024  # a large value first: a running fp16/bf16 sum would then round away the small addends
    feats.requires_grad_(True)
    out = voxel_pooling_reference(geom, feats, grid)
    expected = voxel_pooling_oracle(geom, feats.detach(), grid)  # float64 sum of the same (rounded) inputs
    assert out.dtype == dtype
    assert expected[0, 0, 0, 2] > 3000  # 1024 + ~3000 * 0.75
    torch.testing.assert_close(out.double(), expected, rtol=ulp, atol=0)
    out.float().sum().backward()
    assert feats.grad.dtype == dtype and (feats.grad == 1).all()


def test_voxel_pooling_rejects_float_coordinates():
    with pytest.raises(TypeError):
        voxel_pooling(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), (2, 2, 1))


# ---------------------------------------------------------------------------------------- deformable conv

CONFIGS = [  # n, c, o, h, w, groups, deform_groups, stride, padding, dilation
    (2, 4, 6, 5, 6, 2, 2, 1, 1, 1),
    (1, 8, 4, 6, 5, 2, 4, 2, 1, 1),  # deform groups finer than conv groups, stride 2
    (1, 8, 4, 6, 6, 4, 2, 1, 2, 2),  # coarser, dilation 2
    (2, 3, 2, 5, 4, 1, 1, 1, 0, 1),
]


def _out_size(size, p, d, s, k=3):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def _sample_y(offset, dg, s, p, d):
    """Row coordinate each 3x3 tap samples at: ho * s - p + i * d + dy, as (N, DG, 9, Ho, Wo)."""
    n, _, ho, wo = offset.shape
    tap = (torch.arange(ho) * s - p)[None, :, None] + (torch.arange(3) * d).repeat_interleave(3)[:, None, None]
    return tap + offset.view(n, dg, 9, 2, ho, wo)[:, :, :, 0]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv_zero_offsets_is_conv2d(cfg):
    n, c, o, h, w, groups, dg, s, p, d = cfg
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64)
    offset = torch.zeros(n, dg * 18, _out_size(h, p, d, s), _out_size(w, p, d, s), dtype=torch.float64)
    out = deform_conv2d(x, offset, weight, bias, s, p, d, groups, dg)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, s, p, d, groups))
    out32 = deform_conv2d(x.float(), offset.float(), weight.float(), None, s, p, d, groups, dg)
    torch.testing.assert_close(out32, F.conv2d(x.float(), weight.float(), None, s, p, d, groups), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv_random_offsets_match_oracle(cfg):
    n, c, o, h, w, groups, dg, s, p, d = cfg
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c // groups, 3, 3, generator=g, dtype=torch.float64)
    ho, wo = _out_size(h, p, d, s), _out_size(w, p, d, s)
    offset = torch.randn(n, dg * 18, ho, wo, generator=g, dtype=torch.float64) * 2.5
    # some samples land outside (-1, H) x (-1, W), some in the partial band near the border
    ys = _sample_y(offset, dg, s, p, d)
    assert (ys <= -1).any() and (ys >= h).any() and ((ys > -1) & (ys < 0)).any()
    out = deform_conv2d(x, offset, weight, None, s, p, d, groups, dg)
    torch.testing.assert_close(out, deform_conv2d_oracle(x, offset, weight, s, p, d, groups, dg))
    out32 = deform_conv2d(x.float(), offset.float(), weight.float(), None, s, p, d, groups, dg)
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-4)


def test_deform_conv_offset_layout_is_dy_dx_per_tap():
    """mmcv: channel 2k is dy and 2k + 1 is dx for tap k = i * kw + j ("[y0, x0, y1, x1, ...]")."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 6, 7, generator=g, dtype=torch.float64)
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 2] = 1  # only tap k = 2 (i = 0, j = 2), which reads x[y - 1, x + 1] at zero offset
    xp = F.pad(x, (2, 2, 2, 2))  # zero border, padded by 2 so shifted reads stay in range

    def run(channel):
        offset = torch.zeros(1, 18, 6, 7, dtype=torch.float64)
        offset[0, channel] = 1
        return deform_conv2d(x, offset, weight, padding=1)

    torch.testing.assert_close(run(4), xp[0, 0, 2:8, 3:10][None, None])  # dy = 1 -> x[y, x + 1]
    torch.testing.assert_close(run(5), xp[0, 0, 1:7, 4:11][None, None])  # dx = 1 -> x[y - 1, x + 2]
    torch.testing.assert_close(run(0), xp[0, 0, 1:7, 3:10][None, None])  # another tap's offset: no effect


def test_deform_conv_border_rules():
    """A 1x1 kernel reads x at (y + dy, x + dx): mmcv gives 0 at y <= -1 or y >= H, and inside that band
    drops only the corners outside the image."""
    x = torch.arange(1, 13, dtype=torch.float64).reshape(1, 1, 3, 4)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)

    def sample(dy, dx):
        offset = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
        offset[0, 0], offset[0, 1] = dy, dx
        return deform_conv2d(x, offset, weight)[0, 0]

    out = sample(-0.5, 0.0)
    torch.testing.assert_close(out[0], 0.5 * x[0, 0, 0])  # y = -0.5: half of row 0, row -1 reads 0
    torch.testing.assert_close(out[1], 0.5 * (x[0, 0, 0] + x[0, 0, 1]))
    assert (sample(-1.0, 0.0)[0] == 0).all()  # y = -1 exactly: outside
    out = sample(0.0, 0.75)
    torch.testing.assert_close(out[:, 3], 0.25 * x[0, 0, :, 3])  # x = W - 0.25: only the left corner
    assert (sample(0.0, 1.0)[:, 3] == 0).all()  # x = W exactly: outside
    torch.testing.assert_close(sample(0.0, 0.999)[:, 3], 0.001 * x[0, 0, :, 3])


def test_deform_conv_gradcheck_with_samples_outside():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    offset = (torch.randn(2, 36, 4, 5, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    fn = lambda a, b, c: deform_conv2d(a, b, c, None, 1, 1, 1, 2, 2)  # groups 2, deform groups 2
    ys = _sample_y(offset.detach(), 2, 1, 1, 1)
    assert (ys <= -1).any() and (ys >= 4).any() and ((ys > -1) & (ys < 0)).any()
    assert torch.autograd.gradcheck(fn, (x, offset, weight), fast_mode=True)
    torch.testing.assert_close(fn(x, offset, weight), deform_conv2d_oracle(x, offset, weight, 1, 1, 1, 2, 2))


def test_deform_conv_im2col_step_chunks_give_the_same_result():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, generator=g)
    offset = torch.randn(3, 18, 5, 5, generator=g)
    whole = deform_conv2d(x, offset, weight, None, 1, 1, 1, 4, 1)
    (gx_whole,) = torch.autograd.grad(whole.square().sum(), x)
    chunked = deform_conv2d(x, offset, weight, None, 1, 1, 1, 4, 1, im2col_step=2)
    (gx_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(gx_chunked, gx_whole)


def test_dcn_pack_state_dict_matches_mmcv_and_starts_as_grouped_conv():
    m = DeformConv2dPack(512, 512, kernel_size=3, padding=1, groups=4, im2col_step=128)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"weight": (512, 128, 3, 3), "conv_offset.weight": (18, 512, 3, 3), "conv_offset.bias": (18,)}
    assert (m.conv_offset.weight == 0).all() and (m.conv_offset.bias == 0).all()
    x = torch.randn(2, 512, 3, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, None, 1, 1, 1, 4), rtol=1e-4, atol=1e-4)
    m(x).sum().backward()
    assert m.weight.grad is not None and m.conv_offset.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        DeformConv2dPack(8, 8, 3, bias=True)


def test_dcn_pack_under_autocast_runs_in_the_offset_dtype():
    """mmcv casts input and weight to the offset's dtype, so under autocast the layer runs in low precision."""
    g = torch.Generator().manual_seed(8)
    m = DeformConv2dPack(8, 8, 3, padding=1, groups=2, deform_groups=2)
    with torch.no_grad():
        m.conv_offset.weight.normal_(0, 0.2, generator=g)
    x = torch.randn(2, 8, 6, 7, generator=g, requires_grad=True)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0
    assert m.conv_offset.weight.grad.abs().sum() > 0
