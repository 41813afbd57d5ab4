"""A model is a TrainSpec: what the shared loop needs to know about it, and nothing more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainSpec:
    name: str
    config_cls: type  # the model's config dataclass
    presets: dict[str, dict]  # preset -> model config fields
    defaults: dict[str, dict[str, dict]]  # preset -> {"run"|"data"|"optim": field overrides}
    build: Callable[[Any, np.ndarray | None], nn.Module]  # (model config, anchors or None) -> model
    losses: Callable[[nn.Module, dict], dict[str, torch.Tensor]]  # train-mode forward: batch -> loss terms
    decode: Callable[[nn.Module, dict], list[dict]]  # eval-mode forward: batch -> boxes/scores/labels per frame
    image_hw: Callable[[Any], tuple[int, int]]  # input size the pipeline must produce
    temporal: bool = True  # needs lanes (contiguous frames per batch slot)
    needs_anchors: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)
