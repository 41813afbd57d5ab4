"""StreamPETR detector: image backbone + CPFPN (stride-16 level) + the 2D FocalHead (training only) + the
3D head with its memory queue (upstream `projects/mmdet3d_plugin/models/detectors/petr3d.py`, with the
configs' `queue_length=1`: one frame per batch slot and step, the past reaching it only through the
memory).

The state dict has upstream's keys in upstream's order (`pts_bbox_head`, `img_backbone`, `img_neck`,
`img_roi_head`), so upstream checkpoints load strictly. The engine drives it through
`raydrive.spec.DrivingModel`; sequence starts come through `reset_state` (upstream's `prev_exists`).

Mixed precision: backbone and neck run under the engine's autocast (upstream `auto_fp16` on
`extract_feat`, fp32 out); the heads and losses run in fp32 except the decoder's attention, which
follows the autocast the caller set.
"""

from __future__ import annotations

import torch
from torch import nn

from raydrive.models.sparse4d.blocks import GridMask
from raydrive.models.streampetr.backbones import build_backbone
from raydrive.models.streampetr.config import StreamPETRConfig
from raydrive.models.streampetr.cpfpn import CPFPN
from raydrive.models.streampetr.focal_head import FocalHead
from raydrive.models.streampetr.head import StreamPETRHead

HEAD_KEYS = ("lidar2img", "intrinsics", "ego_pose", "ego_pose_inv", "timestamp", "pad_hw")
TARGET_KEYS = ("gt_boxes", "gt_labels", "gt_cams2d", "gt_bboxes2d", "gt_labels2d", "gt_centers2d", "gt_depths2d")


def _backbone(cfg: StreamPETRConfig) -> nn.Module:
    small = {}
    if cfg.backbone == "r50":
        small = {"depth": cfg.backbone_depth, "base_channels": cfg.backbone_base_channels}
        if cfg.backbone_blocks is not None:
            small["blocks"] = tuple(cfg.backbone_blocks)
    return build_backbone(cfg.backbone, cfg.backbone_with_cp, cfg.backbone_frozen_bn, **small)


def _head(cfg: StreamPETRConfig) -> StreamPETRHead:
    return StreamPETRHead(
        num_classes=cfg.num_classes,
        in_channels=cfg.embed_dims,
        embed_dims=cfg.embed_dims,
        num_query=cfg.num_query,
        memory_len=cfg.memory_len,
        topk_proposals=cfg.topk_proposals,
        num_propagated=cfg.num_propagated,
        stride=cfg.stride,
        depth_num=cfg.depth_num,
        position_range=tuple(cfg.position_range),
        pc_range=tuple(cfg.pc_range),
        post_center_range=tuple(cfg.position_range),
        max_num=cfg.decode_top_k,
        with_dn=cfg.num_dn_groups > 0,
        num_dn_groups=max(cfg.num_dn_groups, 1),
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        ffn_dims=cfg.ffn_dims,
        dropout=cfg.dropout,
        with_cp=cfg.decoder_with_cp,
        cross_attn_radius=cfg.cross_attn_radius,
    )


class StreamPETR(nn.Module):
    def __init__(self, cfg: StreamPETRConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or StreamPETRConfig()
        # registration order = upstream's state-dict order
        self.pts_bbox_head = _head(cfg)
        self.img_backbone = _backbone(cfg)
        self.img_neck = CPFPN(list(self.img_backbone.out_channels), cfg.embed_dims, num_outs=2)
        self.img_roi_head = (
            FocalHead(cfg.num_classes, cfg.embed_dims, cfg.embed_dims, cfg.stride, norm_groups=cfg.norm_groups)
            if cfg.with_2d_head
            else None
        )
        self.grid_mask = GridMask() if cfg.use_grid_mask else None

    def extract_feat(self, img: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) -> the stride-16 CPFPN level (B, N, C, H/16, W/16) in the heads' dtype: fp32 out
        of autocast (upstream `auto_fp16(out_fp32=True)`), float64 in a float64 model (parity checks)."""
        bs, cams = img.shape[:2]
        x = img.flatten(0, 1)
        if self.grid_mask is not None:
            x = self.grid_mask(x)
        feat = self.img_neck(self.img_backbone(x))[0]
        return feat.reshape(bs, cams, *feat.shape[1:]).to(self.pts_bbox_head.code_weights.dtype)

    @staticmethod
    def _inputs(batch: dict, device, with_targets: bool) -> dict:
        """The batch keys the heads read, on the model's device; the heads cast them to their own dtype
        (geometry and targets in fp32 out of autocast, ego poses and timestamps stay float64)."""
        out = {k: batch[k].to(device) for k in HEAD_KEYS}
        if with_targets:
            out.update({k: [x.to(device) for x in batch[k]] for k in TARGET_KEYS})
        return out

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Train mode: the loss terms of the 3D head (every decoder layer, denoising) and the 2D head."""
        if not self.training:
            raise RuntimeError("StreamPETR.forward computes training losses: call train() first, or predict()")
        device = next(self.parameters()).device
        feats = self.extract_feat(batch["img"].to(device, non_blocking=True))
        data = self._inputs(batch, device, with_targets=True)
        with torch.autocast(device.type, enabled=False):  # upstream force_fp32 on the heads' losses
            topk = None
            losses: dict[str, torch.Tensor] = {}
            if self.img_roi_head is not None:
                out2d = self.img_roi_head(feats, data)
                topk = out2d.get("topk_indexes")
                losses.update(self.img_roi_head.loss(out2d, data))
            out = self.pts_bbox_head(feats, data, topk)
            losses.update(self.pts_bbox_head.loss(out, data))
        return losses

    @torch.no_grad()
    def predict(self, batch: dict) -> list[dict]:
        """Eval mode: per frame `boxes` (N, 9: x, y, z centre, l, w, h, yaw, vx, vy), `scores`, `labels`
        (CPU tensors), as the detection evaluator reads them. The 2D head is skipped, as upstream."""
        if self.training:
            raise RuntimeError("StreamPETR.predict decodes in eval mode: call eval() first")
        device = next(self.parameters()).device
        feats = self.extract_feat(batch["img"].to(device, non_blocking=True))
        with torch.autocast(device.type, enabled=False):
            out = self.pts_bbox_head(feats, self._inputs(batch, device, with_targets=False))
            decoded = self.pts_bbox_head.decode(out)
        results = []
        for d in decoded:
            boxes = d["boxes_3d"].float().clone()
            boxes[:, 2] += boxes[:, 5] * 0.5  # the coder's bottom z back to the centre
            results.append({"boxes": boxes.cpu(), "scores": d["scores_3d"].cpu(), "labels": d["labels_3d"].cpu()})
        return results

    def reset_state(self, slots: torch.Tensor | None = None) -> None:
        """None: forget the memory of every slot; a bool (batch,) tensor: those slots start a new sequence."""
        self.pts_bbox_head.reset_memory(slots)

    def temporal_state(self) -> dict[str, torch.Tensor]:
        return self.pts_bbox_head.memory_state()

    def load_temporal_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pts_bbox_head.load_memory_state(state)
