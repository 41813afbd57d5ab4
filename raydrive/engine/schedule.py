"""Learning-rate factors per step, with mmcv's semantics (upstream configs use its LrUpdaterHook).

- linear warm-up: factor goes from `warmup_ratio` to 1 over `warmup_iters` steps, on top of the
  regular schedule (mmcv: lr = regular * (1 - (1 - step / warmup_iters) * (1 - warmup_ratio)));
- cosine: from 1 down to `min_lr_ratio` over all steps (mmcv CosineAnnealing with min_lr_ratio);
- multistep: times `gamma` at each milestone (fractions of the total steps).
"""

from __future__ import annotations

import math

from raydrive.config import OptimSection


def lr_factor(step: int, total_steps: int, cfg: OptimSection) -> float:
    total = max(1, total_steps)
    if cfg.schedule == "cosine":
        progress = min(step, total) / total
        regular = cfg.min_lr_ratio + 0.5 * (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "multistep":
        regular = cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    else:
        raise ValueError(f"optim.schedule must be cosine or multistep, got {cfg.schedule!r}")
    if step < cfg.warmup_iters:
        regular *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return regular
