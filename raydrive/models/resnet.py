"""ResNet with torchvision's parameter names, so `resnet50-19c8e357.pth` loads (minus `fc.*`).

Returns the outputs of the stages in `out_indices` (C2..C5 for 0..3), like mmdet's ResNet with
`style="pytorch"` (stride on the 3x3 conv). `with_cp` checkpoints each block's activations
(Sparse4D trains with it), `frozen_stages` freezes the stem and the first stages (parameters and BN
statistics, as mmdet's `_freeze_stages`), `norm_eval` keeps all BN statistics fixed in training.
`in_channels`, `strides` and `stem_pool` build BEVDepth's BEV trunk (160 channels in, strides
1/2/2, no max-pool).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as cp
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.residual(x) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.residual(x) + identity)


SPECS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    def __init__(
        self,
        depth: int = 50,
        base_channels: int = 64,
        blocks: tuple[int, ...] | None = None,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        in_channels: int = 3,
        strides: tuple[int, ...] = (1, 2, 2, 2),
        stem_pool: bool = True,
    ):
        super().__init__()
        if depth not in SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(SPECS)}, got {depth}")
        block, layers = SPECS[depth]
        layers = blocks or layers
        self.out_indices, self.frozen_stages, self.norm_eval, self.with_cp = (
            out_indices,
            frozen_stages,
            norm_eval,
            with_cp,
        )
        self.conv1 = nn.Conv2d(in_channels, base_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        inplanes = base_channels
        self.out_channels = []
        for i, n in enumerate(layers):
            planes = base_channels * 2**i
            stride = strides[i]
            down = None
            if stride != 1 or inplanes != planes * block.expansion:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            mods = [block(inplanes, planes, stride, down)]
            inplanes = planes * block.expansion
            mods += [block(inplanes, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
            self.out_channels.append(inplanes)
        self._freeze()

    def _freeze(self):
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(len(self.out_channels)):
            for blk in getattr(self, f"layer{i + 1}"):
                x = cp.checkpoint(blk, x, use_reentrant=False) if self.with_cp and x.requires_grad else blk(x)
            if i in self.out_indices:
                outs.append(x)
        return outs
