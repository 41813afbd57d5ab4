"""FPN with mmdet's parameter names (`lateral_convs.i.conv`, `fpn_convs.i.conv`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Conv(nn.Module):
    """mmcv's ConvModule without norm or activation: the names carry a `.conv`."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2)

    def forward(self, x):
        return self.conv(x)


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(_Conv(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(_Conv(out_channels, out_channels, 3) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lats = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lats) - 1, 0, -1):
            lats[i - 1] = lats[i - 1] + F.interpolate(lats[i], size=lats[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, lats)]
