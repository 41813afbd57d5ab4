"""SECOND's FPN with mmdet3d's parameter names (`deblocks.i.{0,1}`): every input level is brought to
one stride by a strided conv (stride < 1: kernel = stride = 1/s) or a transposed conv (stride >= 1:
kernel = stride = s), then BN (eps 1e-3, momentum 0.01) and ReLU; the levels are concatenated along
channels (mmdet3d `models/necks/second_fpn.py`). BEVDepth uses it as its image neck and its BEV neck.
"""

from __future__ import annotations

import torch
from torch import nn


class SECONDFPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: list[int], upsample_strides: list[float]):
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(upsample_strides):
            raise ValueError("SECONDFPN: in_channels, out_channels and upsample_strides must have the same length")
        blocks = []
        for cin, cout, s in zip(in_channels, out_channels, upsample_strides):
            if s >= 1:
                k = int(s)
                layer = nn.ConvTranspose2d(cin, cout, k, stride=k, bias=False)
            else:
                k = round(1 / s)
                layer = nn.Conv2d(cin, cout, k, stride=k, bias=False)
            blocks.append(nn.Sequential(layer, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(blocks)
        self.out_channels = sum(out_channels)
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([block(x) for block, x in zip(self.deblocks, feats)], dim=1)
