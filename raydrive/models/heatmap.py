"""Gaussian heat-map targets shared by the centre-based heads (BEVDepth's CenterHead, StreamPETR's
2D centerness): CornerNet's kernel, maxed into a map around an integer cell and cut at the borders
(mmdet3d `gaussian_2d` / `draw_heatmap_gaussian`)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=128)
def gaussian_kernel(radius: int) -> np.ndarray:
    """(2r+1)^2 Gaussian with sigma = (2r+1)/6 and a peak of 1, tiny values zeroed. Cached (read-only):
    every box of every training step asks for one of a few radii."""
    d = 2 * radius + 1
    sigma = d / 6
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    g.flags.writeable = False
    return g


def draw_gaussian(heat: torch.Tensor, x: int, y: int, radius: int) -> None:
    """Max the Gaussian into `heat` (H, W) around cell (x, y), clipped at the borders; the kernel is cast
    to fp32 first, as upstream does. A cell outside the map draws nothing."""
    h, w = heat.shape
    if not (0 <= x < w and 0 <= y < h):
        return
    g = torch.tensor(gaussian_kernel(radius), dtype=torch.float32, device=heat.device)
    left, right = min(x, radius), min(w - x, radius + 1)
    top, bottom = min(y, radius), min(h - y, radius + 1)
    patch = heat[y - top : y + bottom, x - left : x + right]
    kernel = g[radius - top : radius + bottom, radius - left : radius + right]
    torch.max(patch, kernel.to(patch.dtype), out=patch)
