"""SparseDrive: Sparse4D's image encoder and detection head, the online map head and the motion planner.

Behaviour from swc-17/SparseDrive `projects/mmdet3d_plugin/models/{sparsedrive.py, sparsedrive_head.py}`:
one image encoder (ResNet + FPN, grid mask, auxiliary dense depth) feeds three heads in order: detection,
map, then motion and planning, which reads the detection head's instance features, anchor embeddings,
tracking ids and anchor encoder and the map head's instances. The motion loss uses the detection head's
last-layer Hungarian match. The state-dict layout is upstream's (`head.det_head.`, `head.map_head.`,
`head.motion_plan_head.`). Stage 1 builds no motion planner (`with_motion_plan=False`); stage 2 loads
stage 1's weights and starts the planner fresh (`fresh_on_load`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raydrive.models.sparse4d.head import Sparse4DHead
from raydrive.models.sparse4d.model import Sparse4D
from raydrive.models.sparsedrive.config import SparseDriveConfig
from raydrive.models.sparsedrive.map_head import MapHead, MapHeadConfig
from raydrive.models.sparsedrive.motion import MotionConfig, MotionPlanningHead

MOTION_PREFIX = "head.motion_plan_head."


def map_config(cfg: SparseDriveConfig) -> MapHeadConfig:
    return MapHeadConfig(
        embed_dims=cfg.embed_dims,
        num_anchor=cfg.map_num_anchor,
        num_groups=cfg.num_groups,
        num_decoder=cfg.num_decoder,
        num_single_frame_decoder=cfg.num_single_frame_decoder,
        num_temp_instances=cfg.map_num_temp_instances,
        num_cams=cfg.num_cams,
        num_levels=cfg.num_levels,
        num_learnable_pts=cfg.map_num_learnable_pts,
        dropout=cfg.dropout,
        attn_drop=cfg.attn_drop,
    )


def motion_config(cfg: SparseDriveConfig) -> MotionConfig:
    return MotionConfig(
        embed_dims=cfg.embed_dims,
        num_heads=cfg.num_groups,
        dropout=cfg.dropout,
        num_layers=cfg.motion_num_layers,
        queue_length=cfg.motion_queue_length,
        num_classes=cfg.num_classes,
        num_det=min(cfg.motion_num_det, cfg.num_anchor),
        num_map=min(cfg.motion_num_map, cfg.map_num_anchor),
    )


class SparseDriveHead(nn.Module):
    """Upstream's `SparseDriveHead`: the three heads under their upstream names."""

    def __init__(self, det_head: Sparse4DHead, map_head: MapHead | None, motion_plan_head: MotionPlanningHead | None):
        super().__init__()
        self.det_head, self.map_head, self.motion_plan_head = det_head, map_head, motion_plan_head


class SparseDrive(Sparse4D):
    """The DrivingModel of SparseDrive (Sparse4D's image encoder, metas and depth loss are reused)."""

    def __init__(
        self,
        cfg: SparseDriveConfig | None = None,
        det_anchor: np.ndarray | None = None,
        map_anchor: np.ndarray | None = None,
        motion_anchor: np.ndarray | None = None,
        plan_anchor: np.ndarray | None = None,
    ):
        cfg = cfg or SparseDriveConfig()
        super().__init__(cfg, det_anchor)
        map_head = MapHead(map_config(cfg), map_anchor) if cfg.with_map else None
        motion = MotionPlanningHead(motion_config(cfg), motion_anchor, plan_anchor) if cfg.with_motion_plan else None
        self.head = SparseDriveHead(self.head, map_head, motion)
        # stage 2 starts from stage 1's weights, which have no planner (upstream loads them non-strictly)
        self.fresh_on_load = (MOTION_PREFIX,) if cfg.with_motion_plan else ()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Train mode: the loss terms of every task the config enables."""
        if not self.training:
            raise RuntimeError("SparseDrive.forward computes training losses: call train() first, or predict()")
        device = next(self.parameters()).device
        img = batch["img"].to(device, non_blocking=True)
        feats, depths = self.extract_feat(img, batch["focal"].to(device, torch.float32))
        labels = [x.to(device) for x in batch["gt_labels"]]
        boxes = [x.to(device, torch.float32) for x in batch["gt_boxes"]]
        metas = self.metas(batch, device)
        h = self.head
        with torch.autocast(device.type, enabled=False):  # the heads and the losses run in fp32
            det_out = h.det_head(feats, metas, labels, boxes)
            losses = h.det_head.loss(det_out, labels, boxes)
            det_indices = list(h.det_head.target.indices)  # the last layer's match: loss() ran it last
            map_out = None
            if h.map_head is not None:
                map_out = h.map_head(feats, metas)
                map_labels = [x.to(device) for x in batch["map_labels"]]
                map_lines = [x.to(device, torch.float32) for x in batch["map_lines"]]
                losses.update(h.map_head.loss(map_out, map_labels, map_lines))
            if h.motion_plan_head is not None:
                motion_out = h.motion_plan_head(det_out, map_out, feats, metas, h.det_head.anchor_encoder)
                losses.update(h.motion_plan_head.loss(motion_out, det_indices, self._plan_targets(batch, device)))
            if depths is not None and "depth" in batch:
                losses["loss_dense_depth"] = self.depth_loss(depths, batch["depth"], img.shape[1], device)
        return losses

    @staticmethod
    def _plan_targets(batch: dict, device) -> dict:
        return {
            "gt_agent_fut_trajs": [x.to(device, torch.float32) for x in batch["gt_agent_fut_trajs"]],
            "gt_agent_fut_masks": [x.to(device, torch.float32) for x in batch["gt_agent_fut_masks"]],
            **{
                k: batch[k].to(device, torch.float32)
                for k in ("gt_ego_fut_trajs", "gt_ego_fut_masks", "gt_ego_fut_cmd", "ego_status")
            },
        }

    @torch.no_grad()
    def predict(self, batch: dict) -> list[dict]:
        """Eval mode, per frame (under the keys raydrive/viz draws): detection (`boxes`, `scores`, `labels`,
        `instance_ids`, `cls_scores`), map (`map_polylines` (K, 20, 2), `map_scores`, `map_labels`) and, in
        stage 2, motion (`trajectories` (N, 6, 12, 2) positions, `trajectory_scores`) and the plan
        (`ego_trajectory` (6, 2) positions, `plan_scores`), all in the key-frame lidar frame."""
        if self.training:
            raise RuntimeError("SparseDrive.predict decodes in eval mode: call eval() first")
        device = next(self.parameters()).device
        feats, _ = self.extract_feat(batch["img"].to(device, non_blocking=True))
        metas = self.metas(batch, device)
        h = self.head
        with torch.autocast(device.type, enabled=False):
            det_out = h.det_head(feats, metas)
            results = h.det_head.decode(det_out, self.cfg.decode_top_k)
            map_out = h.map_head(feats, metas) if h.map_head is not None else None
            if map_out is not None:
                for r, m in zip(results, h.map_head.decode(map_out)):
                    r.update(map_polylines=m["vectors"], map_scores=m["scores"], map_labels=m["labels"])
            if h.motion_plan_head is not None:
                motion_out = h.motion_plan_head(det_out, map_out, feats, metas, h.det_head.anchor_encoder)
                command = batch["gt_ego_fut_cmd"].to(device, torch.float32)
                for r, m in zip(results, h.motion_plan_head.decode(motion_out, results, command)):
                    r.update(
                        trajectories=m["trajs"],
                        trajectory_scores=m["traj_scores"],
                        ego_trajectory=m["plan"],
                        plan_scores=m["plan_scores"],
                    )
        return results

    def _stateful(self) -> dict[str, nn.Module]:
        heads = {"det": self.head.det_head.instance_bank, "map": self.head.map_head}
        heads["motion"] = self.head.motion_plan_head
        return {k: v for k, v in heads.items() if v is not None}

    def reset_state(self, slots: torch.Tensor | None = None) -> None:
        """None: forget every head's temporal state; a bool (batch,) tensor: those slots start a sequence."""
        for part in self._stateful().values():
            part.reset(slots)

    def temporal_state(self) -> dict[str, torch.Tensor]:
        """Every head's state under `det.`, `map.` and `motion.` prefixes (references, never changed in place)."""
        return {f"{name}.{k}": v for name, part in self._stateful().items() for k, v in part.state().items()}

    def load_temporal_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in self._stateful().items():
            prefix = f"{name}."
            part.load_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
