"""StreamPETR backbones and CPFPN: upstream key names/shapes, output strides and widths, frozen BN, with_cp."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raydrive.models.streampetr import backbones
from raydrive.models.streampetr.backbones import SMALL_KWARGS, build_backbone
from raydrive.models.streampetr.cpfpn import CPFPN

KEYS = Path(__file__).resolve().parent / "data"  # upstream key lists (copied from shared/specs/keys)
PRESETS = {  # kind -> (key file, neck in_channels, backbone parameters, neck parameters)
    "vov99": ("streampetr_vov99_800.txt", [768, 1024], 69_523_520, 1_049_344),
    "r50": ("streampetr_r50_704.txt", [1024, 2048], 23_508_032, 1_377_024),
}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _upstream_keys(kind: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in (KEYS / PRESETS[kind][0]).read_text().splitlines():
        m = re.match(r"^(\S+) \((.*)\)$", line)
        if m and m.group(1).startswith(prefix):
            out.append((m.group(1)[len(prefix) :], tuple(int(s) for s in m.group(2).split(",") if s.strip())))
    return out


def _bn_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(BUFFERS)}


def _build_meta(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    with torch.device("meta"):
        return build_backbone(kind, with_cp=True), CPFPN(PRESETS[kind][1], 256, 2)


@pytest.mark.parametrize("kind", ["vov99", "r50"])
def test_parameter_counts(kind):
    backbone, neck = _build_meta(kind)
    assert sum(p.numel() for p in backbone.parameters()) == PRESETS[kind][2]
    assert sum(p.numel() for p in neck.parameters()) == PRESETS[kind][3]


@pytest.mark.parametrize("kind", ["vov99", "r50"])
def test_state_dict_matches_upstream(kind):
    backbone, neck = _build_meta(kind)
    _, _, n_backbone, n_neck = PRESETS[kind]
    for module, prefix, n_params in [(backbone, "img_backbone.", n_backbone), (neck, "img_neck.", n_neck)]:
        expected = _upstream_keys(kind, prefix)
        got = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
        assert got == expected
        assert sum(p.numel() for p in module.parameters()) == n_params
        from_file = sum(torch.Size(s).numel() for k, s in expected if not k.endswith(BUFFERS))
        assert from_file == n_params


@pytest.mark.parametrize("kind", ["vov99", "r50"])
def test_full_size_forward_gives_stride_16_and_32(kind):
    torch.manual_seed(0)
    backbone = build_backbone(kind, with_cp=True).eval()
    neck = CPFPN(backbone.out_channels, 256, 2).eval()
    assert backbone.out_channels == PRESETS[kind][1]
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 160))
        outs = neck(feats)
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 160 // s) for c, s in zip(backbone.out_channels, (16, 32))
    ]
    assert [tuple(o.shape) for o in outs] == [(1, 256, 4, 10), (1, 256, 2, 5)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_cpfpn_top_down_and_extra_levels():
    torch.manual_seed(0)
    neck = CPFPN([8, 12], out_channels=4, num_outs=3)
    fine, coarse = torch.randn(2, 8, 6, 10), torch.randn(2, 12, 3, 5)
    outs = neck([fine, coarse])
    assert [tuple(o.shape) for o in outs] == [(2, 4, 6, 10), (2, 4, 3, 5), (2, 4, 2, 3)]
    # The coarse level is its lateral map, unconvolved; the extra level subsamples it.
    assert torch.allclose(outs[1], neck.lateral_convs[1](coarse))
    assert torch.allclose(outs[2], outs[1][..., ::2, ::2])
    # The fine level sees the coarse input through the top-down path.
    assert not torch.allclose(neck([fine, torch.zeros_like(coarse)])[0], outs[0])
    assert all(b.abs().sum() == 0 for b in (neck.lateral_convs[0].conv.bias, neck.fpn_convs[0].conv.bias))


@pytest.mark.parametrize("kind", ["vov99", "r50"])
def test_frozen_bn_keeps_statistics_in_training(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    frozen = build_backbone(kind, with_cp=False, frozen=True, **SMALL_KWARGS[kind]).train()
    before = _bn_stats(frozen)
    sum(f.sum() for f in frozen(x)).backward()
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(frozen).items())
    bn = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # r50 (mmdet norm_cfg requires_grad=False) also fixes the BN affines; vov99 trains them (upstream).
    assert all(p.requires_grad == (kind == "vov99") for m in bn for p in m.parameters())
    assert bn[-1].weight.grad is None if kind == "r50" else bn[-1].weight.grad.abs().sum() > 0

    trained = build_backbone(kind, with_cp=False, frozen=False, **SMALL_KWARGS[kind]).train()
    before = _bn_stats(trained)
    trained(x)
    assert not all(torch.equal(before[k], v) for k, v in _bn_stats(trained).items())


@pytest.mark.parametrize("kind", ["vov99", "r50"])
def test_with_cp_matches_plain_and_checkpoints(kind, monkeypatch):
    torch.manual_seed(0)
    plain = build_backbone(kind, with_cp=False, **SMALL_KWARGS[kind]).train()
    cp_model = build_backbone(kind, with_cp=True, **SMALL_KWARGS[kind]).train()
    cp_model.load_state_dict(plain.state_dict())
    calls = []
    real = backbones.checkpoint
    monkeypatch.setattr(backbones, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 3, 64, 96)
    outs = []
    for model in (plain, cp_model):
        feats = model(x)
        sum((f * torch.linspace(0, 1, f.numel()).view_as(f)).sum() for f in feats).backward()
        outs.append((feats, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert len(calls) == 4  # one per block of the one-block-per-stage small nets
    (f_plain, g_plain), (f_cp, g_cp) = outs
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(f_plain, f_cp))
    assert g_plain.keys() == g_cp.keys() and len(g_plain) > 0
    assert all(torch.allclose(g_plain[n], g_cp[n], rtol=1e-4, atol=1e-6) for n in g_plain)
    with torch.no_grad():
        cp_model(x)
    assert len(calls) == 4  # nothing to recompute without autograd


def test_small_variants_and_bad_arguments():
    x = torch.randn(1, 3, 64, 128)
    for kind, channels in [("vov99", [64, 96]), ("r50", [64, 128])]:
        model = build_backbone(kind, with_cp=False, **SMALL_KWARGS[kind]).eval()
        assert model.out_channels == channels
        assert sum(p.numel() for p in model.parameters()) < 500_000
        with torch.no_grad():
            feats = model(x)
        assert [tuple(f.shape) for f in feats] == [(1, channels[0], 4, 8), (1, channels[1], 2, 4)]
    with pytest.raises(ValueError):
        build_backbone("r101", with_cp=False)
    with pytest.raises(ValueError):
        build_backbone("r50", with_cp=False, stem_channels=(8, 8, 8))
    with pytest.raises(ValueError):
        CPFPN([8, 12], num_outs=1)
