"""AdamW with lr-multiplier groups, the fp16 grad scaler, and the per-step learning rate."""

from __future__ import annotations

import torch

from raydrive.config import OptimSection
from raydrive.engine.schedule import lr_factor


def param_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """One group per lr multiplier (first matching name prefix wins, e.g. img_backbone x0.5)."""
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for prefix, m in optim.lr_mults.items() if name.startswith(prefix)), 1.0)
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr": optim.lr * m, "lr_mult": m} for m, ps in groups.items()]


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, weight_decay=optim.weight_decay)


def build_scaler(amp_dtype: torch.dtype | None, device: torch.device, optim: OptimSection):
    """A GradScaler for fp16 only: static (mmcv's Fp16OptimizerHook, as upstream configs use) or dynamic."""
    if amp_dtype != torch.float16:
        return None
    dynamic = optim.loss_scale == "dynamic"
    return torch.amp.GradScaler(
        device.type,
        init_scale=32.0 if dynamic else float(optim.loss_scale),
        growth_interval=2000 if dynamic else 10**9,
    )


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, optim: OptimSection) -> float:
    """The schedule's lr for this optimizer step (base group), applied to every group."""
    lr = optim.lr * lr_factor(step, total, optim)
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"]
    return lr


def clip_and_step(model, optimizer, scaler, optim: OptimSection) -> float:
    """Unscale (fp16), clip, step; returns the gradient norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = optim.grad_clip if optim.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step on inf gradients
        scaler.update(None if optim.loss_scale == "dynamic" else float(optim.loss_scale))
    else:
        optimizer.step()
    return float(grad_norm)
