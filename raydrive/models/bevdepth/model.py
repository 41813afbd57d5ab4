"""BEVDepth (upstream `bevdepth/models/base_bev_depth.py` + the Lightning module's losses in
`bevdepth/exps/nuscenes/base_exp.py`): lift-splat BEV features from two key frames, a BEV trunk and
a CenterHead; the depth net is supervised by lidar depth.

The `full` preset is `bev_depth_lss_r50_256x704_128x128_24e_2key`; its state dict is upstream's key
for key (861 keys, 76,384,590 parameters). The engine drives it through `raydrive.spec.DrivingModel`;
it keeps no temporal state (the previous key frame comes with each sample).

Mixed precision: image backbone, neck, depth net and lift run under the engine's autocast; the
frustum geometry runs in fp32 (a deliberate difference: upstream's matmuls there fall to fp16 under
AMP); voxel pooling accumulates in fp32; the BEV trunk, head, detection losses and depth loss run in
fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydrive.models.bevdepth.config import BEVDepthConfig
from raydrive.models.bevdepth.head import BEVDepthHead
from raydrive.models.bevdepth.lss import LSSBackbone

MAT_KEYS = ("sensor2ego_mats", "intrin_mats", "ida_mats", "bda_mat")


class BEVDepth(nn.Module):
    def __init__(self, cfg: BEVDepthConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BEVDepthConfig()
        self.backbone = LSSBackbone(cfg)
        self.head = BEVDepthHead(cfg)

    def bev_and_depth(self, batch: dict):
        device = self.backbone.frustum.device
        dtype = self.backbone.frustum.dtype  # float32, or float64 for parity checks
        imgs = batch["img"].to(device, dtype, non_blocking=True)[:, : self.cfg.num_key_frames]
        mats = {k: batch[k].to(device, dtype) for k in MAT_KEYS}
        mats = {k: v if k == "bda_mat" else v[:, : self.cfg.num_key_frames] for k, v in mats.items()}
        return self.backbone(imgs, mats)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Train mode: detection loss terms per task and the depth loss."""
        if not self.training:
            raise RuntimeError("BEVDepth.forward computes training losses: call train() first, or predict()")
        bev, depth = self.bev_and_depth(batch)
        device = bev.device
        with torch.autocast(device.type, enabled=False):
            preds = self.head(bev)
            boxes = [b.to(device, torch.float32) for b in batch["gt_boxes"]]
            labels = [lab.to(device) for lab in batch["gt_labels"]]
            targets = self.head.targets(boxes, labels, preds[0]["heatmap"].shape[-2:])
            losses = self.head.loss(preds, targets)
            if "depth_labels" in batch:
                losses["loss_depth"] = self.depth_loss(batch["depth_labels"].to(device), depth)
        return losses

    @torch.no_grad()
    def predict(self, batch: dict) -> list[dict]:
        """Eval mode: per frame `boxes` (N, 9) in the mean camera-ego frame, `scores`, `labels`."""
        if self.training:
            raise RuntimeError("BEVDepth.predict decodes in eval mode: call eval() first")
        bev, _ = self.bev_and_depth(batch)
        with torch.autocast(bev.device.type, enabled=False):
            out = self.head.decode(self.head(bev))
        return [{k: v.cpu() for k, v in o.items()} for o in out]

    def depth_loss(self, labels: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """3 x BCE between the predicted depth distribution and the one-hot bin of the nearest lidar
        point in each 16x16 patch, over patches that have one (upstream `get_depth_loss`)."""
        target = downsample_depth(labels, self.cfg.downsample, self.cfg.d_bound, self.backbone.depth_channels)
        pred = depth.permute(0, 2, 3, 1).reshape(-1, self.backbone.depth_channels)
        fg = target.max(dim=1).values > 0.0
        bce = F.binary_cross_entropy(pred[fg], target[fg].to(pred.dtype), reduction="none").sum()
        return self.cfg.depth_loss_weight * (bce / max(1.0, float(fg.sum())))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes upstream's Lightning checkpoints, whose keys carry the module's `model.` prefix."""
        keys = list(state_dict)
        if keys and all(k.startswith("model.") for k in keys):
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def reset_state(self, slots: torch.Tensor | None = None) -> None:
        """No temporal state: the previous key frame comes with every sample."""

    def temporal_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_temporal_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


def downsample_depth(labels: torch.Tensor, factor: int, d_bound, bins: int) -> torch.Tensor:
    """(B, N, H, W) depth maps -> (B * N * H/f * W/f, bins) one-hot of the minimum non-zero depth per
    f x f patch; bin = (d - (lo - step)) / step truncated, outside [0, bins + 1) -> background, and
    column 0 (background) dropped."""
    b, n, h, w = labels.shape
    x = labels.view(b * n, h // factor, factor, w // factor, factor, 1)
    x = x.permute(0, 1, 3, 5, 2, 4).contiguous().view(-1, factor * factor)
    x = torch.where(x == 0.0, 1e5 * torch.ones_like(x), x).min(dim=-1).values
    lo, _, step = d_bound
    x = (x.view(b * n, h // factor, w // factor) - (lo - step)) / step
    x = torch.where((x < bins + 1) & (x >= 0.0), x, torch.zeros_like(x))
    return F.one_hot(x.long(), num_classes=bins + 1).view(-1, bins + 1)[:, 1:].float()
