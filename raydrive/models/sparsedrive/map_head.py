"""SparseDrive online map head: a Sparse4D-style decoder whose anchors are 20-point polylines.

Behaviour from swc-17/SparseDrive: the `map_head` of `projects/configs/sparsedrive_small_stage{1,2}.py`
built by `models/detection3d/detection3d_head.py` (Sparse4DHead) with the blocks of
`models/map/map_blocks.py` (SparsePoint3DEncoder, SparsePoint3DKeyPointsGenerator,
SparsePoint3DRefinementModule), `models/map/decoder.py` and `models/instance_bank.py`. Compared with
raydrive's Sparse4D head: attention adds the position embedding (not decoupled), every decoder layer
starts with self-attention, there is no denoising, no quality branch and no tracking ids, the instance
features are trainable, and the refinement simply adds an offset to each point.

Anchor layout: (x0, y0, x1, y1, ..., x19, y19), metres, lidar frame (x right, y forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raydrive.data.sparsedrive_fields import MAP_CLASSES, ROI_SIZE
from raydrive.models.sparse4d.blocks import (
    AsymmetricFFN,
    DeformableFeatureAggregation,
    GraphAttention,
    Scale,
    focal_loss,
    linear_relu_ln,
    xavier_init_except_refine,
)
from raydrive.models.sparse4d.head import InstanceBank, reduce_mean
from raydrive.models.sparsedrive.map_target import MapTarget, line_loss


@dataclass
class MapHeadConfig:
    """Defaults are upstream's sparsedrive_small config; `num_temp_instances` is 0 in stage 1, 33 in 2."""

    embed_dims: int = 256
    num_anchor: int = 100
    num_sample: int = 20  # points per polyline
    num_classes: int = len(MAP_CLASSES)
    num_groups: int = 8
    num_decoder: int = 6
    num_single_frame_decoder: int = 1
    num_temp_instances: int = 0
    num_cams: int = 6
    num_levels: int = 4
    num_learnable_pts: int = 3
    fix_height: tuple[float, ...] = (0.0, 0.5, -0.5, 1.0, -1.0)
    ground_height: float = -1.84023  # the road in the lidar frame (metres)
    dropout: float = 0.1
    attn_drop: float = 0.15
    confidence_decay: float = 0.6
    cls_threshold_to_reg: float = 0.05
    roi_size: tuple[float, float] = ROI_SIZE
    cls_cost_weight: float = 1.0
    line_cost_weight: float = 10.0
    cls_loss_weight: float = 1.0
    line_loss_weight: float = 10.0
    line_beta: float = 0.01

    def __post_init__(self):
        if self.embed_dims % self.num_groups:
            raise ValueError(f"embed_dims {self.embed_dims} must be divisible by num_groups {self.num_groups}")
        if not 0 < self.num_single_frame_decoder <= self.num_decoder:
            raise ValueError("num_single_frame_decoder must be in [1, num_decoder]")
        if self.num_temp_instances >= self.num_anchor:
            raise ValueError("num_temp_instances must be smaller than num_anchor")

    @property
    def anchor_dims(self) -> int:
        return 2 * self.num_sample


class PolylineProjection(nn.Module):
    """Moves cached polylines into the current lidar frame (SparsePoint3DKeyPointsGenerator's
    anchor_projection): a 2-D rigid transform of every point; map elements do not move, so the time
    interval is unused. No parameters, so the instance bank keeps upstream's keys."""

    def anchor_projection(
        self, anchor: torch.Tensor, t_src2dst: torch.Tensor, time_interval=None, fix_yaw_swap: bool = False
    ) -> torch.Tensor:
        t = t_src2dst.to(anchor.dtype)[:, None]  # (bs, 1, 4, 4)
        pts = anchor.unflatten(-1, (-1, 2))  # (bs, N, P, 2)
        moved = torch.einsum("bnij,bnpj->bnpi", t[..., :2, :2], pts) + t[..., None, :2, 3]
        return moved.flatten(-2)


class MapInstanceBank(InstanceBank):
    """raydrive's InstanceBank with polyline anchors and trainable instance features (feat_grad=True)."""

    def __init__(self, cfg: MapHeadConfig, anchor: np.ndarray | None):
        if anchor is None:
            anchor = np.zeros((cfg.num_anchor, cfg.anchor_dims), np.float32)
        anchor = np.asarray(anchor, np.float32).reshape(len(anchor), -1)  # (K, 20, 2) k-means file -> (K, 40)
        if anchor.shape[1] != cfg.anchor_dims:
            raise ValueError(f"map anchors have {anchor.shape[1]} values, the head needs {cfg.anchor_dims}")
        super().__init__(
            cfg.num_anchor, cfg.embed_dims, anchor, cfg.num_temp_instances, confidence_decay=cfg.confidence_decay
        )
        self.anchor_handler = PolylineProjection()
        self.instance_feature.requires_grad_(True)


class PointEncoder(nn.Module):
    """SparsePoint3DEncoder: one MLP from the flat polyline to the embedding."""

    def __init__(self, embed_dims: int, anchor_dims: int):
        super().__init__()
        self.pos_fc = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, anchor_dims))

    def forward(self, anchor: torch.Tensor) -> torch.Tensor:
        return self.pos_fc(anchor)


class PolylineKeyPoints(nn.Module):
    """SparsePoint3DKeyPointsGenerator: around every polyline point, `num_learnable_pts` learnt xy
    offsets at each of the `fix_height` heights above the ground -> (bs, N, P * H * L, 3)."""

    def __init__(self, cfg: MapHeadConfig):
        super().__init__()
        self.num_sample, self.num_learnable_pts = cfg.num_sample, cfg.num_learnable_pts
        self.fix_height, self.ground_height = tuple(cfg.fix_height), cfg.ground_height
        self.num_pts = cfg.num_sample * len(self.fix_height) * cfg.num_learnable_pts
        self.learnable_fc = nn.Linear(cfg.embed_dims, self.num_pts * 2)

    def init_weights(self):
        nn.init.xavier_uniform_(self.learnable_fc.weight)
        nn.init.zeros_(self.learnable_fc.bias)

    def forward(self, anchor: torch.Tensor, instance_feature: torch.Tensor) -> torch.Tensor:
        bs, n = anchor.shape[:2]
        shape = (bs, n, self.num_sample, len(self.fix_height), self.num_learnable_pts, 2)
        xy = self.learnable_fc(instance_feature).reshape(shape) + anchor.reshape(bs, n, self.num_sample, 1, 1, 2)
        z = anchor.new_tensor(self.fix_height)[:, None] + self.ground_height  # (H, 1)
        z = z.expand(shape[:-1])[..., None]
        return torch.cat([xy, z], dim=-1).flatten(2, 4)


class PointRefinement(nn.Module):
    """SparsePoint3DRefinementModule: polyline offset (scaled per coordinate) and class logits."""

    def __init__(self, embed_dims: int, anchor_dims: int, num_cls: int):
        super().__init__()
        self.layers = nn.Sequential(
            *linear_relu_ln(embed_dims, 2, 2), nn.Linear(embed_dims, anchor_dims), Scale(anchor_dims)
        )
        self.cls_layers = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2), nn.Linear(embed_dims, num_cls))

    def init_weights(self):
        nn.init.constant_(self.cls_layers[-1].bias, -float(np.log((1 - 0.01) / 0.01)))

    def forward(self, instance_feature, anchor, anchor_embed) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers(instance_feature + anchor_embed) + anchor, self.cls_layers(instance_feature)


def operation_order(cfg: MapHeadConfig) -> list[str]:
    single = ["gnn", "norm", "deformable", "ffn", "norm", "refine"]
    multi = ["temp_gnn"] + single
    return single * cfg.num_single_frame_decoder + multi * (cfg.num_decoder - cfg.num_single_frame_decoder)


class MapHead(nn.Module):
    """Online vector map: `forward` -> per-layer class logits and polylines; `loss`; `decode`."""

    def __init__(self, cfg: MapHeadConfig | None = None, anchor: np.ndarray | None = None):
        super().__init__()
        self.cfg = c = cfg or MapHeadConfig()
        d = c.embed_dims
        self.instance_bank = MapInstanceBank(c, anchor)
        self.anchor_encoder = PointEncoder(d, c.anchor_dims)
        self.operation_order = operation_order(c)
        build = {
            "temp_gnn": lambda: GraphAttention(d, c.num_groups, c.dropout),
            "gnn": lambda: GraphAttention(d, c.num_groups, c.dropout),
            "norm": lambda: nn.LayerNorm(d),
            "ffn": lambda: AsymmetricFFN(2 * d, d, 4 * d, c.dropout),
            "deformable": lambda: DeformableFeatureAggregation(
                d, c.num_groups, c.num_levels, c.num_cams, c.attn_drop, kps_generator=PolylineKeyPoints(c)
            ),
            "refine": lambda: PointRefinement(d, c.anchor_dims, c.num_classes),
        }
        self.layers = nn.ModuleList(build[op]() for op in self.operation_order)
        self.target = MapTarget(c.num_sample, c.roi_size, c.cls_cost_weight, c.line_cost_weight, c.line_beta)
        self.init_weights()

    def init_weights(self):
        """detection3d_head.init_weights: xavier on the non-refine layers, then each block's own init."""
        xavier_init_except_refine(self.operation_order, self.layers)
        for layer in self.layers:
            if hasattr(layer, "init_weights"):
                layer.init_weights()
            if isinstance(layer, DeformableFeatureAggregation):
                layer.kps_generator.init_weights()
        nn.init.xavier_uniform_(self.instance_bank.instance_feature)

    # ---- temporal state (the instance bank's cache; empty in stage 1, num_temp_instances = 0) ----
    def reset(self, slots: torch.Tensor | None = None) -> None:
        self.instance_bank.reset(slots)

    def state(self) -> dict[str, torch.Tensor]:
        return self.instance_bank.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.instance_bank.load_state(state)

    def forward(self, feature_maps: list[torch.Tensor], metas: dict) -> dict:
        """feature_maps: per level (bs, cams, C, H, W); metas: projection_mat, image_wh, timestamp,
        T_global, T_global_inv. Returns per layer `classification` (bs, N, C) and `prediction`
        (bs, N, 2 P), and the last layer's `instance_feature` and `anchor_embed` (bs, N, C)."""
        bs = feature_maps[0].shape[0]
        bank = self.instance_bank
        feature, anchor, temp_feature, temp_anchor, _ = bank.get(bs, metas)
        anchor_embed = self.anchor_encoder(anchor)
        temp_embed = self.anchor_encoder(temp_anchor) if temp_anchor is not None else None
        predictions, classifications = [], []
        for op, layer in zip(self.operation_order, self.layers):
            if op == "temp_gnn":  # without cached instances this is one more self-attention
                feature = layer(feature, temp_feature, temp_feature, query_pos=anchor_embed, key_pos=temp_embed)
            elif op == "gnn":
                feature = layer(feature, value=feature, query_pos=anchor_embed)
            elif op in ("norm", "ffn"):
                feature = layer(feature)
            elif op == "deformable":
                feature = layer(feature, anchor, anchor_embed, feature_maps, metas)
            else:  # refine
                anchor, cls = layer(feature, anchor, anchor_embed)
                predictions.append(anchor)
                classifications.append(cls)
                if len(predictions) == self.cfg.num_single_frame_decoder:
                    feature, anchor = bank.update(feature, anchor, cls)
                anchor_embed = self.anchor_encoder(anchor)  # also after the last layer: motion reads it
                if len(predictions) > self.cfg.num_single_frame_decoder and temp_embed is not None:
                    temp_embed = anchor_embed[:, : bank.num_temp_instances]
        bank.cache(feature, anchor, cls, metas)
        return {
            "classification": classifications,
            "prediction": predictions,
            "instance_feature": feature,
            "anchor_embed": anchor_embed,
        }

    def loss(self, out: dict, gt_labels: list[torch.Tensor], gt_lines: list[torch.Tensor]) -> dict:
        """gt_labels: per frame (M,) classes; gt_lines: per frame (M, num_perm, P, 2) from `map_targets`.
        Per layer k: `loss_map_cls_{k}` (focal) and `loss_map_line_{k}` (smooth L1 x 10)."""
        c = self.cfg
        losses = {}
        for k, (cls, line) in enumerate(zip(out["classification"], out["prediction"])):
            cls_target, line_target, weights = self.target.sample(cls, line, gt_labels, gt_lines)
            mask = ~torch.all(line_target == 0, dim=-1)
            num_pos = max(float(reduce_mean(mask.sum().to(line.dtype))), 1.0)
            mask = mask & (cls.max(dim=-1).values.sigmoid() > c.cls_threshold_to_reg)
            losses[f"loss_map_cls_{k}"] = focal_loss(
                cls.flatten(0, 1), cls_target.flatten(), num_pos, weight=c.cls_loss_weight
            )
            losses[f"loss_map_line_{k}"] = line_loss(
                line[mask], line_target[mask], weights[mask], num_pos, c.roi_size, c.line_beta, c.line_loss_weight
            )
        return losses

    @torch.no_grad()
    def decode(self, out: dict, score_threshold: float | None = None) -> list[dict]:
        """SparsePoint3DDecoder: the top N (query, class) pairs over all classes of the last layer.
        Per frame: `vectors` (K, P, 2) metres, `scores` (K,), `labels` (K,), all on the CPU."""
        cls = out["classification"][-1].sigmoid()
        bs, num_query, num_cls = cls.shape
        points = out["prediction"][-1].reshape(bs, num_query, -1, 2)
        scores, idx = cls.flatten(1).topk(num_query, dim=1)
        results = []
        for i in range(bs):
            keep = scores[i] >= score_threshold if score_threshold is not None else slice(None)
            results.append(
                {
                    "vectors": points[i, idx[i] // num_cls][keep].float().cpu(),
                    "scores": scores[i][keep].float().cpu(),
                    "labels": (idx[i] % num_cls)[keep].long().cpu(),
                }
            )
        return results
