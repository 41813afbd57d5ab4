"""Sparse4D v3: the full preset is the upstream model key for key; the small one trains and decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raydrive.models.sparse4d.model import Sparse4D, Sparse4DConfig
from raydrive.models.sparse4d.presets import small

# upstream Sparse4D v3 r50 state-dict keys and shapes (copied from shared/specs/keys/)
KEYS = Path(__file__).resolve().parent / "data" / "sparse4d_v3_r50.txt"


def upstream_keys() -> dict[str, tuple]:
    out = {}
    for line in KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            out[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return out


def test_full_preset_counts_upstream_parameters_and_loads_upstream_state_dict_strictly(tmp_path):
    model = Sparse4D(Sparse4DConfig())
    assert sum(p.numel() for p in model.parameters()) == 48_156_232
    keys = upstream_keys()
    assert len(keys) == 819
    g = torch.Generator().manual_seed(0)
    upstream = {
        k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
        for k, s in keys.items()
    }
    result = model.load_state_dict(upstream, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model.head.layers[38].cls_layers[6].bias, upstream["head.layers.38.cls_layers.6.bias"])
    # the same through --load-from's loader, from an mmcv-style checkpoint file
    from raydrive.engine.checkpoint import load_weights

    torch.save({"meta": {"epoch": 100}, "state_dict": upstream}, tmp_path / "sparse4dv3_r50.pth")
    fresh = Sparse4D(Sparse4DConfig())
    fresh.load_state_dict(load_weights(tmp_path / "sparse4dv3_r50.pth"), strict=True)
    torch.testing.assert_close(fresh.img_backbone.conv1.weight, upstream["img_backbone.conv1.weight"])


def _batch(cfg: Sparse4DConfig, t: float, seq_start: bool, bs: int = 1) -> dict:
    h, w = cfg.image_hw
    proj = torch.eye(4).repeat(bs, 6, 1, 1)
    proj[..., 0, 0] = proj[..., 1, 1] = 100.0
    proj[..., 0, 2], proj[..., 1, 2] = w / 2, h / 2
    return {
        "img": torch.randn(bs, 6, 3, h, w),
        "projection_mat": proj,
        "image_wh": torch.tensor([w, h]).repeat(bs, 6, 1).float(),
        "focal": torch.full((bs, 6), 100.0),
        "T_global": torch.eye(4, dtype=torch.float64).repeat(bs, 1, 1),
        "T_global_inv": torch.eye(4, dtype=torch.float64).repeat(bs, 1, 1),
        "timestamp": torch.full((bs,), t, dtype=torch.float64),
        "seq_start": torch.full((bs,), seq_start),
        "gt_boxes": [torch.tensor([[10.0, 1.0, 0.0, 4.0, 2.0, 1.5, 0.3, 1.0, 0.0]])] * bs,
        "gt_labels": [torch.tensor([0])] * bs,
        "depth": [torch.tensor([[0, 10.0, 10.0, 12.0]])] * bs,
    }


def test_small_preset_trains_caches_and_resets_slots_through_reset_state():
    torch.manual_seed(0)
    cfg = small().model
    model = Sparse4D(cfg, np.random.default_rng(0).normal(size=(900, 11)).astype(np.float32))
    model.reset_state(torch.tensor([True]))  # before anything is cached: a no-op
    losses = model(_batch(cfg, 0.0, True))
    assert (
        all(torch.isfinite(v) for v in losses.values()) and "loss_dense_depth" in losses and "loss_cls_dn_0" in losses
    )
    sum(losses.values()).backward()
    assert model.head.instance_bank.anchor.grad.abs().sum() > 0
    bank = model.head.instance_bank
    assert bank.cached_anchor.shape == (1, cfg.num_temp_instances, 11)
    assert bank.instance_id is None  # no tracking ids in training
    model(_batch(cfg, 0.5, False))
    assert bank.mask.tolist() == [True]  # same sequence: temporal instances used
    model(_batch(cfg, 1.0, True))
    assert bank.mask.tolist() == [True]  # the batch's seq_start is not read: the engine calls reset_state
    model.reset_state(torch.tensor([True]))
    model(_batch(cfg, 1.5, False))
    assert bank.mask.tolist() == [False]  # the slot starts a new sequence: cache ignored
    with pytest.raises(RuntimeError, match="predict"):
        model.eval()(_batch(cfg, 2.0, False))
    out = model.predict(_batch(cfg, 2.0, False))
    assert out[0].keys() == {"boxes", "scores", "labels", "instance_ids", "cls_scores", "query_index"}
    assert out[0]["boxes"].shape == (cfg.decode_top_k, 9) and (out[0]["scores"][:-1] >= out[0]["scores"][1:]).all()
    assert out[0]["labels"].dtype == out[0]["instance_ids"].dtype == torch.int64
    with pytest.raises(RuntimeError, match="eval"):
        model.train().predict(_batch(cfg, 2.5, False))


def test_head_runs_in_fp32_under_an_ambient_autocast():
    torch.manual_seed(0)
    cfg = small().model
    model = Sparse4D(cfg, np.random.default_rng(0).normal(size=(900, 11)).astype(np.float32))
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes.setdefault(name, output[0].dtype)  # returns None: the output stays

        return hook

    model.img_neck.register_forward_hook(record("neck"))
    model.head.layers[-1].register_forward_hook(record("head"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_batch(cfg, 0.0, True))
    assert dtypes == {"neck": torch.bfloat16, "head": torch.float32}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_temporal_states_swap_between_micro_batches_in_training():
    """The engine holds one temporal state per micro-batch lane and swaps them: a held state is not changed
    by later forwards, and loading it again reproduces the losses exactly."""
    cfg = small().model
    model = Sparse4D(cfg, np.random.default_rng(0).normal(size=(900, 11)).astype(np.float32))
    model(_batch(cfg, 0.0, True))
    held = model.temporal_state()
    frozen = {k: v.clone() for k, v in held.items()}
    batch = _batch(cfg, 0.5, False)
    torch.manual_seed(1)
    first = model(batch)
    model(_batch(cfg, 1.0, False))
    for key, value in frozen.items():
        torch.testing.assert_close(held[key], value, rtol=0, atol=0)
    model.load_temporal_state(held)
    torch.manual_seed(1)
    again = model(batch)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_a_slot_that_starts_a_sequence_drops_its_carried_confidence():
    """Upstream instance_bank.py `update`: a slot whose cache is dropped carries no confidence into the
    next `cache()` (which keeps max(decayed carried, current) for the leading queries); the other slot
    keeps its own."""
    from raydrive.models.sparse4d.head import InstanceBank

    torch.manual_seed(0)
    bank = InstanceBank(num_anchor=8, embed_dims=4, anchor=None, num_temp_instances=4)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    metas = {"timestamp": torch.zeros(2, dtype=torch.float64), "T_global": eye, "T_global_inv": eye}
    feature, anchor, *_ = bank.get(2, metas)
    bank.cache(feature + 1, anchor, torch.randn(2, 8, 3), metas)
    carried = bank.confidence.clone()
    bank.reset(torch.tensor([False, True]))
    metas = {**metas, "timestamp": torch.full((2,), 0.5, dtype=torch.float64)}
    feature, anchor, *_ = bank.get(2, metas)
    bank.update(feature, anchor, torch.randn(2, 8, 3))
    assert bank.mask.tolist() == [True, False]
    torch.testing.assert_close(bank.confidence[0], carried[0])
    assert torch.all(bank.confidence[1] == 0)
