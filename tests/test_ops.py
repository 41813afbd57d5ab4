"""The deformable aggregation reference against a slow loop with the fused kernel's arithmetic."""

from __future__ import annotations

import torch

from raydrive.ops.deformable_aggregation import deformable_aggregation, deformable_aggregation_loop


def test_reference_matches_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    bs, cams, c, groups, n, p = 2, 3, 8, 2, 5, 4
    maps = [torch.randn(bs, cams, c, h, w, generator=g) for h, w in ((6, 10), (3, 5))]
    points = torch.rand(bs, n, p, cams, 2, generator=g) * 1.4 - 0.2  # some points fall outside (0, 1)
    weights = torch.rand(bs, n, p, cams, len(maps), groups, generator=g)
    ref = deformable_aggregation(maps, points, weights)
    loop = deformable_aggregation_loop(maps, points, weights)
    assert ((points < 0) | (points > 1)).any()
    torch.testing.assert_close(ref.double(), loop, atol=1e-5, rtol=1e-5)


def test_out_of_range_points_contribute_nothing_and_grads_flow():
    maps = [torch.randn(1, 1, 4, 5, 5, requires_grad=True)]
    points = torch.tensor([[[[[1.2, 0.5]], [[0.5, 0.5]]]]])  # (1, 1, 2, 1, 2): one outside, one inside
    weights = torch.ones(1, 1, 2, 1, 1, 2, requires_grad=True)
    out = deformable_aggregation(maps, points, weights)
    only_inside = deformable_aggregation(maps, points[:, :, 1:], weights[:, :, 1:])
    torch.testing.assert_close(out, only_inside)
    out.sum().backward()
    assert maps[0].grad.abs().sum() > 0 and weights.grad[0, 0, 0].abs().sum() == 0
