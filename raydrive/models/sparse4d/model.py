"""Sparse4D v3 detector: ResNet + FPN + dense depth (auxiliary) + the temporal sparse head.

The `full` preset is the upstream `sparse4dv3_temporal_r50_1x8_bs6_256x704` config and its state
dict matches upstream key for key (48,156,232 parameters); `small` trains on a CPU in minutes.
The engine drives it through `raydrive.spec.DrivingModel`: `forward` (train-mode loss terms),
`predict` (eval: boxes, scores, labels and tracking ids per frame), `reset_state` (all temporal state,
or the batch slots that start a new sequence) and `temporal_state` / `load_temporal_state` (the
instance bank's cache, for checkpoints and for swapping between gradient-accumulation micro-batches).

Mixed precision: the engine runs `forward` / `predict` under `torch.autocast` for fp16/bf16. Backbone,
neck and depth net run under it (upstream's `auto_fp16` on `extract_feat`); the head and the losses
disable it and run in fp32 (upstream's `force_fp32`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raydrive.models.fpn import FPN
from raydrive.models.resnet import ResNet
from raydrive.models.sparse4d.blocks import DenseDepthNet, GridMask
from raydrive.models.sparse4d.head import Sparse4DHead


@dataclass
class Sparse4DConfig:
    image_hw: tuple[int, int] = (256, 704)
    backbone_depth: int = 50
    backbone_base_channels: int = 64
    backbone_blocks: tuple[int, ...] | None = None
    backbone_with_cp: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    embed_dims: int = 256
    num_groups: int = 8
    num_decoder: int = 6
    num_single_frame_decoder: int = 1
    num_anchor: int = 900
    num_temp_instances: int = 600
    num_learnable_pts: int = 6
    anchor_encoder_dims: tuple[int, int, int, int] = (128, 32, 32, 64)
    num_dn_groups: int = 5
    dropout: float = 0.1
    attn_drop: float = 0.15
    num_classes: int = 10
    num_cams: int = 6
    num_depth_layers: int = 3
    depth_loss_weight: float = 0.2
    use_grid_mask: bool = True
    cls_threshold_to_reg: float = 0.05
    fix_yaw_swap: bool = False  # upstream Sparse4D keeps the swapped yaw slots (see blocks.anchor_projection)
    encode_last_anchor: bool = False  # SparseDrive: anchor_embed of the final anchors (see Sparse4DHead)
    track_in_training: bool = False  # SparseDrive: tracking ids in training too (its instance queue reads them)
    decode_top_k: int = 300

    @property
    def num_levels(self) -> int:
        return len(self.out_indices)

    def __post_init__(self):
        if sum(self.anchor_encoder_dims) != self.embed_dims:
            raise ValueError(f"anchor_encoder_dims {self.anchor_encoder_dims} must sum to embed_dims {self.embed_dims}")
        if self.embed_dims % self.num_groups:
            raise ValueError(f"embed_dims {self.embed_dims} must be divisible by num_groups {self.num_groups}")
        if not 0 < self.num_single_frame_decoder <= self.num_decoder:
            raise ValueError("num_single_frame_decoder must be in [1, num_decoder]")
        if self.num_temp_instances >= self.num_anchor:
            raise ValueError("num_temp_instances must be smaller than num_anchor")


class Sparse4D(nn.Module):
    def __init__(self, cfg: Sparse4DConfig | None = None, anchor: np.ndarray | None = None):
        super().__init__()
        self.cfg = cfg = cfg or Sparse4DConfig()
        self.img_backbone = ResNet(
            cfg.backbone_depth,
            cfg.backbone_base_channels,
            cfg.backbone_blocks,
            cfg.out_indices,
            with_cp=cfg.backbone_with_cp,
        )
        self.img_neck = FPN([self.img_backbone.out_channels[i] for i in cfg.out_indices], cfg.embed_dims)
        self.depth_branch = DenseDepthNet(cfg.embed_dims, cfg.num_depth_layers, loss_weight=cfg.depth_loss_weight)
        self.head = Sparse4DHead(cfg, anchor)
        self.grid_mask = GridMask() if cfg.use_grid_mask else None

    def extract_feat(self, img: torch.Tensor, focal: torch.Tensor | None = None):
        """Backbone, neck and (with `focal`) depth, under whatever autocast the caller set; fp32 features."""
        bs, cams = img.shape[:2]
        x = img.flatten(0, 1)
        if self.grid_mask is not None:
            x = self.grid_mask(x)
        feats = self.img_neck(self.img_backbone(x))
        feats = [f.reshape(bs, cams, *f.shape[1:]) for f in feats]
        depths = self.depth_branch(feats, focal) if focal is not None else None
        return [f.float() for f in feats], depths

    @staticmethod
    def metas(batch: dict, device) -> dict:
        return {
            "projection_mat": batch["projection_mat"].to(device, torch.float32),
            "image_wh": batch["image_wh"].to(device, torch.float32),
            "T_global": batch["T_global"].to(device, torch.float64),
            "T_global_inv": batch["T_global_inv"].to(device, torch.float64),
            "timestamp": batch["timestamp"].to(device, torch.float64),
        }

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Train mode: the loss terms. Sequence starts come through `reset_state`, not the batch."""
        if not self.training:
            raise RuntimeError("Sparse4D.forward computes training losses: call train() first, or predict()")
        device = next(self.parameters()).device
        img = batch["img"].to(device, non_blocking=True)
        focal = batch["focal"].to(device, torch.float32)
        feats, depths = self.extract_feat(img, focal)
        labels = [x.to(device) for x in batch["gt_labels"]]
        boxes = [x.to(device, torch.float32) for x in batch["gt_boxes"]]
        with torch.autocast(device.type, enabled=False):  # the head and the losses run in fp32
            out = self.head(feats, self.metas(batch, device), labels, boxes)
            losses = self.head.loss(out, labels, boxes)
            if depths is not None and "depth" in batch:
                losses["loss_dense_depth"] = self.depth_loss(depths, batch["depth"], img.shape[1], device)
        return losses

    def depth_loss(self, depths: list[torch.Tensor], points: list[torch.Tensor], num_cams: int, device) -> torch.Tensor:
        """The auxiliary dense-depth loss against the frames' lidar depth points (fp32)."""
        gt = depth_maps(points, [d.shape[-2:] for d in depths], self.cfg.image_hw, num_cams, device)
        return self.depth_branch.loss([d.float() for d in depths], gt)

    @torch.no_grad()
    def predict(self, batch: dict) -> list[dict]:
        """Eval mode: per frame `boxes` (N, 9), `scores`, `labels`, `instance_ids` (CPU tensors)."""
        if self.training:
            raise RuntimeError("Sparse4D.predict decodes in eval mode: call eval() first")
        device = next(self.parameters()).device
        feats, _ = self.extract_feat(batch["img"].to(device, non_blocking=True))
        with torch.autocast(device.type, enabled=False):
            out = self.head(feats, self.metas(batch, device))
        return self.head.decode(out, self.cfg.decode_top_k)

    def reset_state(self, slots: torch.Tensor | None = None) -> None:
        """None: forget all temporal state (cache, tracking ids, id counter). A bool (batch,) tensor: those
        slots start a new sequence at the next forward / predict."""
        self.head.instance_bank.reset(slots)

    def temporal_state(self) -> dict[str, torch.Tensor]:
        """The instance bank's state per batch slot (cached feature / anchor / confidence / temp_confidence,
        timestamp, T_global, instance_id, prev_id, a pending slot reset), as references: later frames
        assign new tensors and never change these in place."""
        return self.head.instance_bank.state()

    def load_temporal_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `temporal_state()`'s output (also an older checkpoint's subset); `{}` is a full reset."""
        self.head.instance_bank.load_state(state)


def depth_maps(points: list[torch.Tensor], shapes, image_hw, num_cams: int, device) -> list[torch.Tensor]:
    """Per-level depth targets from (cam, u, v, d) points: the nearest point wins a cell, -1 where empty
    (Sparse4D `MultiScaleDepthMapGenerator`: rounded pixel, floor by stride, depth clipped to [0.1, 60])."""
    maps = []
    for h, w in shapes:
        stride_h, stride_w = image_hw[0] / h, image_hw[1] / w
        level = []
        for pts in points:
            pts = pts.to(device)
            m = torch.full((num_cams * h * w,), float("inf"), device=device)
            if len(pts):
                u = torch.floor(torch.round(pts[:, 1]) / stride_w).long()
                v = torch.floor(torch.round(pts[:, 2]) / stride_h).long()
                d = pts[:, 3]
                ok = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (d >= 0.1)
                idx = pts[ok, 0].long() * h * w + v[ok] * w + u[ok]
                m.scatter_reduce_(0, idx, d[ok].clamp(0.1, 60.0), reduce="amin")
            level.append(torch.where(torch.isinf(m), torch.full_like(m, -1.0), m).reshape(num_cams, h, w))
        maps.append(torch.stack(level).flatten(0, 1))
    return maps
