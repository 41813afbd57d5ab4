"""SparseDrive: both upstream stages are the upstream model key for key (stage 2 loads stage 1's weights
with a fresh planner); the small stages train on mapped frames with every task's loss, decode what the
evaluator reads, and keep every head's temporal state through the engine's calls."""

from __future__ import annotations

import pytest
import torch
from conftest import upstream_keys

from raydrive.config import Batching
from raydrive.data.pipeline import FramePipeline, PipelineConfig, arrow_to_numpy_batch, collate, map_block
from raydrive.engine.checkpoint import load_weights
from raydrive.trainers import get_spec

UPSTREAM = {
    "stage1": ("sparsedrive_small_stage1.txt", 1179, 75_675_882),
    "stage2": ("sparsedrive_small_stage2.txt", 1324, 86_142_365),
}


@pytest.mark.parametrize("preset", ["stage1", "stage2"])
def test_upstream_stages_are_upstream_key_for_key_and_load_strictly(preset, tmp_path):
    name, num_keys, num_params = UPSTREAM[preset]
    spec = get_spec("sparsedrive")
    model = spec.build_model(spec.config(preset).model, {})
    keys = upstream_keys(name)
    sd = model.state_dict()
    assert len(keys) == num_keys and {k: tuple(v.shape) for k, v in sd.items()} == keys
    assert sum(p.numel() for p in model.parameters()) == num_params

    # an mmcv-style upstream checkpoint (upstream's sparsedrive_stage{1,2}.pth layout) loads strictly
    # through --load-from's loader
    g = torch.Generator().manual_seed(0)
    upstream = {
        k: torch.randint(0, 5, s, generator=g) if k.endswith("tracked") else torch.randn(s, generator=g)
        for k, s in keys.items()
    }
    torch.save({"meta": {"epoch": 100}, "state_dict": upstream}, tmp_path / "upstream.pth")
    result = model.load_state_dict(load_weights(tmp_path / "upstream.pth"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key in ("img_backbone.conv1.weight", "head.map_head.instance_bank.anchor"):
        torch.testing.assert_close(model.state_dict()[key], upstream[key])


def _batches(prepared, preset: str, n: int, train: bool = True) -> list[dict]:
    """The preset's mapper on the first n steps of the train plan (2 slots per step)."""
    spec = get_spec("sparsedrive")
    cfg = spec.config(preset)
    cfg.data.prepared = str(prepared)
    mapper = spec.build_mapper(cfg, train)
    pipe = FramePipeline(PipelineConfig(str(prepared), "train", Batching(1, 2, 1, 2)), mapper)
    rows = arrow_to_numpy_batch(pipe.rows(0, 0).slice(0, 2 * n))
    return [collate(map_block({k: v[2 * i : 2 * i + 2] for k, v in rows.items()}, mapper), mapper) for i in range(n)]


def test_small_stages_train_predict_and_carry_state(prepared):
    torch.manual_seed(0)
    spec = get_spec("sparsedrive")
    batches = _batches(prepared, "small_stage2", 2)
    assert batches[0]["map_lines"][0].shape[1:] == (38, 20, 2)
    assert len(batches[0]["gt_agent_fut_trajs"][0]) == len(batches[0]["gt_boxes"][0]), "futures follow the boxes"

    stage1 = spec.build_model(spec.config("small_stage1").model, {}).train()
    losses = stage1(batches[0])
    assert any(k.startswith("loss_map_") for k in losses) and not any("plan" in k for k in losses)

    model = spec.build_model(spec.config("small_stage2").model, {}).train()
    result = model.load_state_dict(stage1.state_dict(), strict=False)
    assert result.missing_keys and all(k.startswith(model.fresh_on_load) for k in result.missing_keys)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for batch in batches:
        losses = model(batch)
        assert {"loss_motion_cls", "loss_motion_reg", "loss_plan_cls", "loss_plan_reg", "loss_plan_status"} <= set(
            losses
        )
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    state = model.temporal_state()
    assert {k.split(".")[0] for k in state} == {"det", "map", "motion"}

    model.eval()
    model.reset_state()
    eval_batches = _batches(prepared, "small_stage2", 2, train=False)
    model.predict(eval_batches[0])
    saved = model.temporal_state()
    out = model.predict(eval_batches[1])
    model.load_temporal_state(saved)
    again = model.predict(eval_batches[1])
    for key in ("boxes", "map_polylines", "trajectories", "ego_trajectory"):
        assert out[0][key].shape == again[0][key].shape
        torch.testing.assert_close(torch.as_tensor(out[0][key]), torch.as_tensor(again[0][key]))
    frame = out[0]
    assert frame["ego_trajectory"].shape == (6, 2) and frame["trajectories"].shape[1:] == (6, 12, 2)
    assert frame["map_polylines"].shape[1:] == (20, 2) and len(frame["instance_ids"]) == len(frame["boxes"])
