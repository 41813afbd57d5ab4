"""Engine pieces: LR schedule (mmcv semantics), atomic checkpoints, NaN stop, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from raydrive.config import OptimSection
from raydrive.engine import checkpoint as ckpt
from raydrive.engine.loop import NonFiniteLoss, Worker
from raydrive.engine.optim import param_groups
from raydrive.engine.schedule import lr_factor
from raydrive.engine.state import TrainState


def test_warmup_then_cosine_like_mmcv():
    cfg = OptimSection(warmup_iters=500, warmup_ratio=1 / 3, min_lr_ratio=1e-3)
    total = 58_600
    assert lr_factor(0, total, cfg) == pytest.approx(1 / 3, rel=1e-3)
    assert lr_factor(250, total, cfg) == pytest.approx(
        (1 - 0.5 * (2 / 3)) * lr_factor(250, total, OptimSection(warmup_iters=0))
    )
    assert lr_factor(500, total, cfg) == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 500 / total)))
    assert lr_factor(total, total, cfg) == pytest.approx(1e-3)
    ms = OptimSection(schedule="multistep", milestones=(0.5, 0.9), warmup_iters=0)
    assert [lr_factor(s, 100, ms) for s in (0, 49, 50, 90)] == pytest.approx([1, 1, 0.1, 0.01])


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    rng = ckpt.rng_state()
    expected = torch.rand(3)
    d = ckpt.save(
        tmp_path / "c", model.state_dict(), {"optimizer": opt.state_dict(), "step": 7, "rng": [rng]}, {"step": 7}
    )
    assert not (tmp_path / "c.partial").exists()
    m, state, meta = ckpt.load(d)  # torch.load(weights_only=True) inside
    assert meta["step"] == state["step"] == 7 and torch.equal(m["weight"], model.weight)
    ckpt.set_rng_state(state["rng"][0])
    assert torch.equal(torch.rand(3), expected)
    (d / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.BrokenCheckpoint, match="train_state.pt is missing"):
        ckpt.load(d)


def test_nan_loss_stops_with_a_clear_message():
    losses = {"loss_cls_0": torch.tensor(1.0), "loss_box_0": torch.tensor(float("nan"))}
    w = Worker.__new__(Worker)  # only what the check reads: the world size and the step
    w.world, w.state = 1, TrainState(step=11)
    with pytest.raises(NonFiniteLoss, match=r"step 12 \(terms: \['loss_box_0'\]\).*last checkpoint is intact"):
        w._global_terms(losses, sum(losses.values()))
    ok = {"a": torch.tensor(1.5), "b": torch.tensor(0.25)}
    assert w._global_terms(ok, sum(ok.values())) == {"a": 1.5, "b": 0.25, "loss": 1.75}


def test_param_groups_apply_lr_multipliers():
    model = torch.nn.ModuleDict({"img_backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
    groups = param_groups(model, OptimSection(lr=1e-3, lr_mults={"img_backbone": 0.5}))
    by_mult = {g["lr_mult"]: g for g in groups}
    assert by_mult[0.5]["lr"] == pytest.approx(5e-4) and len(by_mult[0.5]["params"]) == 2
    assert by_mult[1.0]["lr"] == pytest.approx(1e-3) and len(by_mult[1.0]["params"]) == 2
