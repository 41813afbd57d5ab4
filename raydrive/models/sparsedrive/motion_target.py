"""Targets and losses of SparseDrive's motion planner.

Behaviour from swc-17/SparseDrive `projects/mmdet3d_plugin/models/motion/{target.py,
motion_planning_head.py}` and the stage-2 config's loss settings:
- motion: the detection head's last-layer Hungarian match gives each matched query its GT future;
  the best mode is the one with the least masked mean distance between cumulative trajectories; focal
  loss (x0.2) on the mode scores and L1 (x0.2) on the best mode's cumulative trajectory, both over
  the number of matched queries (averaged over ranks, at least 1);
- planning: only the GT command's group of modes; best mode as above; focal (x0.5) and L1 (x1, on
  offsets) are plain means as mmdet's losses take them without an avg_factor (the focal mean runs
  over batch x modes, the L1 mean over batch x steps x 2), and L1 (x1) on the 10-d ego status.
"""

from __future__ import annotations

import torch

from raydrive.models.sparse4d.blocks import averaged, focal_loss
from raydrive.models.sparse4d.head import reduce_mean


def best_mode(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index of the mode closest to the target. pred (..., M, T, 2) offsets, target (..., T, 2) offsets,
    mask (..., T); distance = mean over T of the masked L2 gap between the cumulative trajectories."""
    gap = pred.cumsum(dim=-2) - target.cumsum(dim=-2).unsqueeze(-3)
    dist = (torch.linalg.norm(gap, dim=-1) * mask.unsqueeze(-2)).mean(dim=-1)
    return dist.argmin(dim=-1)


def pick_mode(pred: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """pred (..., M, T, 2), mode (...) -> (..., T, 2)."""
    index = mode[..., None, None, None].expand(*mode.shape, 1, *pred.shape[-2:])
    return torch.gather(pred, -3, index).squeeze(-3)


def motion_targets(
    pred: torch.Tensor,
    det_indices: list[tuple[torch.Tensor, torch.Tensor] | None],
    gt_trajs: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per query GT future offsets (bs, N, T, 2) and step mask (bs, N, T), zero where unmatched; and the
    number of matched queries."""
    bs, num_query, _, steps, _ = pred.shape
    target = pred.new_zeros(bs, num_query, steps, 2)
    mask = pred.new_zeros(bs, num_query, steps)
    num_pos = 0
    for i, match in enumerate(det_indices):
        if match is None or len(gt_trajs[i]) == 0:
            continue
        pred_idx, gt_idx = (x.to(pred.device) for x in match)
        target[i, pred_idx] = gt_trajs[i].to(pred)[gt_idx]
        mask[i, pred_idx] = gt_masks[i].to(pred)[gt_idx]
        num_pos += len(pred_idx)
    return target, mask, num_pos


def motion_loss(
    cls: torch.Tensor,
    reg: torch.Tensor,
    det_indices: list[tuple[torch.Tensor, torch.Tensor] | None],
    gt_trajs: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
    cls_weight: float = 0.2,
    reg_weight: float = 0.2,
) -> dict[str, torch.Tensor]:
    """cls (bs, N, M) logits, reg (bs, N, M, T, 2) offsets; GT lists per frame (n, T, 2) and (n, T)."""
    target, mask, num_pos = motion_targets(reg, det_indices, gt_trajs, gt_masks)
    avg = max(float(reduce_mean(cls.new_tensor(float(num_pos)))), 1.0)
    mode = best_mode(reg, target, mask)
    valid = mask.any(dim=-1)  # queries with at least one valid future step
    loss_cls = focal_loss(cls[valid], mode[valid], avg, weight=cls_weight)
    best = pick_mode(reg, mode)
    gap = (best.cumsum(dim=-2) - target.cumsum(dim=-2)).abs() * mask[..., None]
    return {"loss_motion_cls": loss_cls, "loss_motion_reg": averaged(gap.sum(), avg) * reg_weight}


def planning_loss(
    cls: torch.Tensor,
    reg: torch.Tensor,
    status: torch.Tensor,
    gt_trajs: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_cmd: torch.Tensor,
    ego_status: torch.Tensor,
    num_cmd: int = 3,
    cls_weight: float = 0.5,
    reg_weight: float = 1.0,
    status_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """cls (bs, 1, C*M), reg (bs, 1, C*M, T, 2), status (bs, 1, S); gt_trajs (bs, T, 2) offsets, gt_masks
    (bs, T), gt_cmd (bs, C) one-hot, ego_status (bs, S)."""
    bs = cls.shape[0]
    rows = torch.arange(bs, device=cls.device)
    cmd = gt_cmd.to(cls.device).argmax(dim=-1)
    cls = cls.reshape(bs, num_cmd, -1)[rows, cmd]  # (bs, M)
    reg = reg.reshape(bs, num_cmd, -1, *reg.shape[-2:])[rows, cmd]  # (bs, M, T, 2)
    gt_trajs, gt_masks = gt_trajs.to(reg), gt_masks.to(reg)
    mode = best_mode(reg, gt_trajs, gt_masks)
    valid = gt_masks.any(dim=-1)
    # mmdet's mean reduction over every logit (masked ones weigh 0): no avg_factor, so no eps
    loss_cls = focal_loss(cls[valid], mode[valid], None, weight=cls_weight) / cls.numel()
    gap = (pick_mode(reg, mode) - gt_trajs).abs() * gt_masks[..., None]
    loss_status = (status.squeeze(1) - ego_status.to(status)).abs().mean()
    return {
        "loss_plan_cls": loss_cls,
        "loss_plan_reg": gap.sum() / gap.numel() * reg_weight,
        "loss_plan_status": loss_status * status_weight,
    }
