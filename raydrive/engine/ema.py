"""Exponential moving average of a model's weights (`optim.ema_decay`), as BEVDepth's `_ema`
configs train (upstream `bevdepth/callbacks/ema.py`, after timm's ModelEMA): after every optimizer
step each floating-point entry of the state dict (parameters and BN statistics) moves toward the
model's by `1 - d`, with d = decay * (1 - exp(-updates / ramp)). Upstream starts the update counter
at the length of the whole schedule, so d is the plain decay from the first step; `start_updates`
keeps that choice explicit.

Every rank keeps the same average (DDP keeps the models identical), so evaluation can swap it in on
all ranks; checkpoints store it next to the model and a resume restores it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float, ramp: float = 2000.0, start_updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1), got {decay}")
        self.decay, self.ramp, self.updates = decay, ramp, start_updates
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def factor(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.factor()
        state = model.state_dict()
        for k, v in self.shadow.items():
            v.mul_(d).add_(state[k].detach().to(v.dtype), alpha=1.0 - d)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            if k in self.shadow:
                self.shadow[k].copy_(v)

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """Run with the averaged weights in `model`, then put the trained ones back."""
        state = model.state_dict()
        saved = {k: state[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].copy_(v)
