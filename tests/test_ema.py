"""The weight average of `optim.ema_decay` (BEVDepth's `_ema` configs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raydrive.engine.ema import ModelEMA


def test_average_follows_the_upstream_rule_and_swaps_in_and_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.999, start_updates=10_000)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = 0.999 * (1 - math.exp(-10_001 / 2000))
    for k, v in ema.shadow.items():
        assert torch.allclose(v, d * start[k] + (1 - d) * model.state_dict()[k])
    assert "1.num_batches_tracked" not in ema.shadow  # integer buffers are not averaged
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into(model):
        assert torch.allclose(model[0].weight, ema.shadow["0.weight"])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # the state round-trips through a checkpoint
    other = ModelEMA(model, decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 10_001 and torch.equal(other.shadow["0.bias"], ema.shadow["0.bias"])


def test_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="optim.ema_decay"):
        ModelEMA(nn.Linear(1, 1), decay=1.0)
