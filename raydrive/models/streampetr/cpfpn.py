"""StreamPETR's neck: an FPN without the output convs that nothing downstream uses.

Upstream projects/mmdet3d_plugin/models/necks/cp_fpn.py keeps a 3x3 output conv on the finest level
only; the coarser levels are returned as their lateral (top-down) maps. A parameter that gets no gradient
breaks DDP when the backbone checkpoints (no `find_unused_parameters`), hence the "CP". Parameter names
are mmdet's FPN ones (`lateral_convs.i.conv`, `fpn_convs.0.conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydrive.models.fpn import _Conv


class CPFPN(nn.Module):
    """forward(feats: list of len(in_channels) maps, finest first) -> list of `num_outs` maps with
    `out_channels` channels each: [3x3 conv of (lateral_0 + upsampled coarser), lateral_1 + ..., ...],
    then stride-2 subsamplings of the last map if `num_outs` exceeds the inputs (mmdet's max-pool extras).
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256, num_outs: int = 2):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(_Conv(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([_Conv(out_channels, out_channels, 3)])
        # Upstream's init_cfg: Xavier-uniform Conv2d weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"CPFPN expects {len(self.in_channels)} feature maps, got {len(feats)}")
        lats = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lats) - 1, 0, -1):
            lats[i - 1] = lats[i - 1] + F.interpolate(lats[i], size=lats[i - 1].shape[-2:], mode="nearest")
        outs = [self.fpn_convs[0](lats[0]), *lats[1:]]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
