"""StreamPETR: both upstream presets are the upstream model key for key; the small one trains on mapped
frames, decodes in the evaluator's convention, and keeps its memory per slot through the engine's calls."""

from __future__ import annotations

import pytest
import torch
from conftest import upstream_keys

from raydrive.config import Batching
from raydrive.data.pipeline import FramePipeline, PipelineConfig, arrow_to_numpy_batch, collate, map_block
from raydrive.engine.checkpoint import load_weights
from raydrive.trainers import get_spec

UPSTREAM = {"full": ("streampetr_vov99_800.txt", 899, 82_947_153), "r50": ("streampetr_r50_704.txt", 591, 37_259_345)}


@pytest.mark.parametrize("preset", ["full", "r50"])
def test_upstream_presets_are_upstream_key_for_key_and_load_strictly(preset, tmp_path):
    name, num_keys, num_params = UPSTREAM[preset]
    spec = get_spec("streampetr")
    with torch.device("meta"):
        model = spec.build_model(spec.config(preset).model, {})
    keys = upstream_keys(name)
    sd = model.state_dict()
    assert len(keys) == num_keys and list(sd) == list(keys), "same keys in upstream's order"
    assert {k: tuple(v.shape) for k, v in sd.items()} == keys
    # cls/reg branches: one module each, listed once per decoder layer (as upstream), counted once
    assert sum(p.numel() for p in model.parameters()) == num_params
    head = model.pts_bbox_head
    assert head.cls_branches[0] is head.cls_branches[5] and head.reg_branches[0] is head.reg_branches[5]

    # an mmcv-style upstream checkpoint loads strictly through --load-from's loader
    g = torch.Generator().manual_seed(0)
    upstream = {
        k: torch.randint(0, 5, s, generator=g) if k.endswith("tracked") else torch.randn(s) for k, s in keys.items()
    }
    torch.save({"meta": {"iter": 42192}, "state_dict": upstream}, tmp_path / "upstream.pth")
    with torch.device("meta"):
        fresh = spec.build_model(spec.config(preset).model, {})
    result = fresh.load_state_dict(load_weights(tmp_path / "upstream.pth"), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh.img_neck.fpn_convs[0].conv.weight, upstream["img_neck.fpn_convs.0.conv.weight"])


def _batches(prepared, n: int, train: bool = True) -> list[dict]:
    """The small preset's mapper on the first n steps of the train plan (2 slots per step)."""
    spec = get_spec("streampetr")
    cfg = spec.config("small")
    cfg.data.prepared = str(prepared)
    mapper = spec.build_mapper(cfg, train)
    pipe = FramePipeline(PipelineConfig(str(prepared), "train", Batching(1, 2, 1, 2)), mapper)
    rows = arrow_to_numpy_batch(pipe.rows(0, 0).slice(0, 2 * n))
    return [collate(map_block({k: v[2 * i : 2 * i + 2] for k, v in rows.items()}, mapper), mapper) for i in range(n)]


def test_small_preset_trains_on_mapped_frames(prepared):
    torch.manual_seed(0)
    spec = get_spec("streampetr")
    model = spec.build_model(spec.config("small").model, {}).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 2e-3)
    first = None
    for batch in _batches(prepared, 3) * 2:
        losses = model(batch)
        assert {"loss_cls", "loss_bbox", "dn_loss_cls", "loss_cls2d", "loss_centerness"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        loss = sum(losses.values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert model.img_backbone.conv1.weight.grad.abs().sum() > 0  # the 2D and 3D losses reach the backbone
        opt.step()
    assert loss.item() < first


def test_predict_gives_centre_z_boxes_and_the_memory_is_per_slot(prepared):
    torch.manual_seed(0)
    spec = get_spec("streampetr")
    cfg = spec.config("small").model
    model = spec.build_model(cfg, {}).eval()
    b0, b1, b2 = _batches(prepared, 3, train=False)
    model.reset_state()
    model.predict(b0)
    model.predict(b1)
    state = {k: v.clone() for k, v in model.temporal_state().items()}
    out = model.predict(b2)
    assert len(out) == 2 and out[0].keys() == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 9 and (out[0]["scores"][:-1] >= out[0]["scores"][1:]).all()

    # the head's coder gives bottom z (upstream NMSFreeCoder); predict hands the evaluator centres
    model.load_temporal_state(state)
    raw = model.pts_bbox_head.decode(
        model.pts_bbox_head(model.extract_feat(b2["img"]), model._inputs(b2, torch.device("cpu"), False))
    )
    torch.testing.assert_close(out[0]["boxes"][:, 2], raw[0]["boxes_3d"][:, 2] + raw[0]["boxes_3d"][:, 5] / 2)

    # restoring the memory replays the frame exactly; resetting one slot changes only that slot
    model.load_temporal_state(state)
    again = model.predict(b2)
    torch.testing.assert_close(again[1]["boxes"], out[1]["boxes"])
    model.load_temporal_state(state)
    model.reset_state(torch.tensor([True, False]))
    reset = model.predict(b2)
    assert not torch.allclose(reset[0]["scores"], out[0]["scores"])
    torch.testing.assert_close(reset[1]["boxes"], out[1]["boxes"])
    torch.testing.assert_close(reset[1]["scores"], out[1]["scores"])
