"""StreamPETR's image backbones: VoVNet-99 eSE and a frozen-BN ResNet, both giving C4/C5 (strides 16, 32).

`VoVNetCP` follows upstream projects/mmdet3d_plugin/models/backbones/vovnetcp.py (itself from DETR3D and
Youngwan Lee's VoVNet) with the module names of its checkpoints (`stem.stem_1/conv`,
`stage4.OSA4_2.layers.0.OSA4_2_0/norm`, `...ese.fc`), so `fcos3d_vovnet_imgbackbone-remapped.pth` loads
as is. `FrozenBNResNet` is raydrive's torchvision-layout ResNet configured as the r50 config's mmdet
ResNet (`norm_cfg.requires_grad=False`, `norm_eval=True`, `out_indices=(2, 3)`, `with_cp`).
`build_backbone` picks one of them for a preset.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raydrive.models.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class VoVSpec:
    """Widths and depths of a VoVNet (upstream's `_STAGE_SPECS` entries, eSE everywhere, no depthwise)."""

    stem_channels: tuple[int, int, int] = (64, 64, 128)
    conv_channels: tuple[int, int, int, int] = (128, 160, 192, 224)  # per 3x3 conv inside an OSA block
    stage_out_channels: tuple[int, int, int, int] = (256, 512, 768, 1024)  # after each block's 1x1 concat conv
    layers_per_block: int = 5
    blocks_per_stage: tuple[int, int, int, int] = (1, 3, 9, 3)


V99_ESE = VoVSpec()  # upstream "V-99-eSE"

# Stride of each nameable output of VoVNetCP.
_VOV_STRIDES = {"stem": 4, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}

# `small` kwargs for `build_backbone` that the CPU preset can use: about 0.1M (vov99) or 0.3M (r50) parameters
# that still gives stride 16 and 32 maps. Their names no longer match upstream checkpoints.
SMALL_KWARGS: dict[str, dict] = {
    "r50": {"depth": 18, "base_channels": 16, "blocks": (1, 1, 1, 1)},  # out_channels [64, 128]
    "vov99": {
        "stem_channels": (16, 16, 32),
        "conv_channels": (16, 16, 24, 32),
        "stage_out_channels": (32, 48, 64, 96),  # out_channels [64, 96]
        "layers_per_block": 2,
        "blocks_per_stage": (1, 1, 1, 1),
    },
}


def _conv_norm_relu(cin: int, cout: int, name: str, kernel: int = 3, stride: int = 1) -> list[tuple[str, nn.Module]]:
    """Conv (no bias) + BN + ReLU named `<name>/conv`, `<name>/norm`, `<name>/relu` as upstream's conv3x3/conv1x1."""
    return [
        (f"{name}/conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)),
        (f"{name}/norm", nn.BatchNorm2d(cout)),
        (f"{name}/relu", nn.ReLU(inplace=True)),
    ]


class EffectiveSE(nn.Module):
    """eSE: one 1x1 conv on the globally pooled map, hard-sigmoid gate (relu6(x + 3) / 6) on every channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class OSABlock(nn.Module):
    """One-shot aggregation: a chain of 3x3 convs whose outputs (and the input) are concatenated once,
    squeezed by a 1x1 conv and gated by eSE; blocks after a stage's first add their input back.

    `with_cp` recomputes the block in backward instead of storing its activations (upstream checkpoints
    every OSA block while training; the concatenation is what makes VoVNet memory hungry).
    """

    def __init__(self, cin: int, conv_ch: int, out_ch: int, num_layers: int, name: str, identity: bool, with_cp: bool):
        super().__init__()
        self.identity = identity
        self.with_cp = with_cp
        self.layers = nn.ModuleList()
        layer_in = cin
        for i in range(num_layers):
            self.layers.append(nn.Sequential(OrderedDict(_conv_norm_relu(layer_in, conv_ch, f"{name}_{i}"))))
            layer_in = conv_ch
        concat_in = cin + num_layers * conv_ch
        self.concat = nn.Sequential(OrderedDict(_conv_norm_relu(concat_in, out_ch, f"{name}_concat", kernel=1)))
        self.ese = EffectiveSE(out_ch)

    def _aggregate(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats[-1]))
        out = self.ese(self.concat(torch.cat(feats, dim=1)))
        return out + x if self.identity else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(self._aggregate, x, use_reentrant=False)
        return self._aggregate(x)


def _osa_stage(spec: VoVSpec, index: int, cin: int, with_cp: bool) -> nn.Sequential:
    """Stage `index + 2` (upstream names stage2..stage5): a 3x3/2 max-pool (not in stage2), then its blocks."""
    stage_num = index + 2
    conv_ch, out_ch = spec.conv_channels[index], spec.stage_out_channels[index]
    modules: list[tuple[str, nn.Module]] = []
    if stage_num != 2:
        modules.append(("Pooling", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)))
    for b in range(spec.blocks_per_stage[index]):
        name = f"OSA{stage_num}_{b + 1}"
        block_in = cin if b == 0 else out_ch
        modules.append((name, OSABlock(block_in, conv_ch, out_ch, spec.layers_per_block, name, b > 0, with_cp)))
    return nn.Sequential(OrderedDict(modules))


class VoVNetCP(nn.Module):
    """VoVNet with eSE and per-block gradient checkpointing (upstream `VoVNetCP`).

    forward(x (B, 3, H, W)) -> list of the `out_features` maps in network order; with the default
    ("stage4", "stage5") that is [(B, 768, H/16, W/16), (B, 1024, H/32, W/32)] (ceil-mode pooling, so exact
    for H, W divisible by 32). `frozen_stages` k >= 0 freezes the stem and stages 2..k+1 (parameters and
    BN statistics); `norm_eval` keeps every BN in eval mode while training (statistics fixed, affine
    parameters still trained, as upstream).
    """

    def __init__(
        self,
        spec: VoVSpec = V99_ESE,
        in_channels: int = 3,
        out_features: tuple[str, ...] = ("stage4", "stage5"),
        frozen_stages: int = -1,
        norm_eval: bool = True,
        with_cp: bool = True,
    ):
        super().__init__()
        unknown = set(out_features) - set(_VOV_STRIDES)
        if unknown:
            raise ValueError(f"unknown VoVNet out_features {sorted(unknown)}; choose from {list(_VOV_STRIDES)}")
        self.out_features = tuple(out_features)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        s0, s1, s2 = spec.stem_channels
        stem = _conv_norm_relu(in_channels, s0, "stem_1", stride=2)
        stem += _conv_norm_relu(s0, s1, "stem_2")
        stem += _conv_norm_relu(s1, s2, "stem_3", stride=2)
        self.stem = nn.Sequential(OrderedDict(stem))
        self.stage_names = [f"stage{i + 2}" for i in range(4)]
        stage_in = [s2, *spec.stage_out_channels[:-1]]
        for i, name in enumerate(self.stage_names):
            self.add_module(name, _osa_stage(spec, i, stage_in[i], with_cp))
        channels = {"stem": s2, **dict(zip(self.stage_names, spec.stage_out_channels))}
        self.out_channels = [channels[n] for n in self.out_features]
        self.strides = [_VOV_STRIDES[n] for n in self.out_features]
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [getattr(self, f"stage{i + 1}") for i in range(1, self.frozen_stages + 1)]

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> VoVNetCP:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        x = self.stem(x)
        if "stem" in self.out_features:
            outs.append(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outs.append(x)
        return outs


class FrozenBNResNet(ResNet):
    """raydrive's ResNet that returns only the stages in `out_indices` (C4, C5 by default).

    `frozen_bn` is mmdet's `norm_cfg=dict(requires_grad=False)` plus `norm_eval=True`: BN affine parameters
    are not trained and BN statistics stay fixed, so the BN layers act as constant per-channel affines.
    `out_channels` lists the returned stages' widths ([1024, 2048] for ResNet-50); `stage_channels` all four.
    """

    def __init__(
        self,
        depth: int = 50,
        out_indices: tuple[int, ...] = (2, 3),
        frozen_bn: bool = True,
        with_cp: bool = True,
        frozen_stages: int = -1,
        base_channels: int = 64,
        blocks: tuple[int, ...] | None = None,
    ):
        super().__init__(
            depth=depth,
            base_channels=base_channels,
            blocks=blocks,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=frozen_bn,
            with_cp=with_cp,
        )
        self.stage_channels = list(self.out_channels)
        self.out_channels = [self.stage_channels[i] for i in out_indices]
        self.strides = [4 * 2**i for i in out_indices]
        if frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # The parent's forward counts stages with `out_channels`, which here holds only the returned ones.
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(len(self.stage_channels)):
            for block in getattr(self, f"layer{i + 1}"):
                use_cp = self.with_cp and x.requires_grad
                x = checkpoint(block, x, use_reentrant=False) if use_cp else block(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def build_backbone(kind: Literal["vov99", "r50"], with_cp: bool, frozen: bool = True, **small) -> nn.Module:
    """The image backbone of a StreamPETR preset; forward(x) -> [stride-16 map, stride-32 map].

    kind "vov99": upstream VoVNetCP V-99-eSE (stage4/stage5, out_channels [768, 1024]); `frozen` sets
    `norm_eval` (fixed BN statistics, trained BN affines), as the vov config.
    kind "r50": ResNet-50 C4/C5 (out_channels [1024, 2048]); `frozen` fixes BN statistics AND BN affines,
    as the r50 config. `frozen=False` trains every BN normally (for small nets trained from scratch).
    `with_cp` checkpoints each OSA block / residual block while training (same outputs and gradients).

    `small` shrinks the network for CPU runs (names then differ from upstream checkpoints); see
    `SMALL_KWARGS` for tested values:
      vov99: any `VoVSpec` field (stem_channels, conv_channels, stage_out_channels, layers_per_block,
        blocks_per_stage); out_channels are stage_out_channels[2:].
      r50: depth (18, 34, 50 or 101), base_channels (64), blocks (blocks per stage, e.g. (1, 1, 1, 1));
        out_channels are the widths of stages 3 and 4.
    """
    if kind == "vov99":
        spec = dataclasses.replace(V99_ESE, **small)
        return VoVNetCP(spec, norm_eval=frozen, with_cp=with_cp)
    if kind == "r50":
        allowed = {"depth", "base_channels", "blocks"}
        if set(small) - allowed:
            raise ValueError(f"r50 backbone takes small kwargs {sorted(allowed)}, got {sorted(small)}")
        return FrozenBNResNet(frozen_bn=frozen, with_cp=with_cp, **small)
    raise ValueError(f"unknown backbone kind {kind!r}; expected 'vov99' or 'r50'")
