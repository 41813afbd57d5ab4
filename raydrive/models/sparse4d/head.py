"""Sparse4D v3 head: instance bank with temporal instances, denoising, decoder layers, losses, decode.

Behaviour from HorizonRobotics/Sparse4D `projects/mmdet3d_plugin/models/{sparse4d_head.py,
instance_bank.py, detection3d/{target.py, losses.py, decoder.py}}`. What raydrive does differently:
- the temporal cache is also reset per batch slot where the lane says a new sequence starts, through
  `InstanceBank.reset(slots)` (upstream relies on the >2 s timestamp jump between scenes; raydrive does
  both);
- temporal denoising groups (optional in the spec) are not carried across frames; the 5 single-frame
  DN groups with positive and negative queries are;
- tracking ids are produced in eval mode as upstream's instance bank does (no score threshold, as in
  the v3 config), and decoding is upstream's `SparseBox3DDecoder` with ids: one box per query, its best
  class; in train mode no ids are kept (upstream leaves stale ones).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from raydrive.models.sparse4d.blocks import (
    CNS,
    COS_YAW,
    SIN_YAW,
    VX,
    YNS,
    AnchorEncoder,
    AsymmetricFFN,
    DeformableFeatureAggregation,
    GraphAttention,
    KeyPointsGenerator,
    RefinementModule,
    X,
    Z,
    averaged,
    focal_loss,
    gaussian_focal_loss,
    xavier_init_except_refine,
)

FIX_SCALE = ((0, 0, 0), (0.45, 0, 0), (-0.45, 0, 0), (0, 0.45, 0), (0, -0.45, 0), (0, 0, 0.45), (0, 0, -0.45))


def _topk(confidence, k, *inputs):
    conf, idx = torch.topk(confidence, k, dim=1)
    return conf, [torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1])) for x in inputs]


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class InstanceBank(nn.Module):
    """Learnable anchors (features zero and frozen) plus the top instances cached from the last frame."""

    def __init__(
        self,
        num_anchor: int,
        embed_dims: int,
        anchor: np.ndarray | None,
        num_temp_instances: int,
        confidence_decay: float = 0.6,
        max_time_interval: float = 2.0,
        default_time_interval: float = 0.5,
        fix_yaw_swap: bool = False,
    ):
        super().__init__()
        anchor = (
            np.zeros((num_anchor, 11), dtype=np.float32)
            if anchor is None
            else np.asarray(anchor, np.float32)[:num_anchor]
        )
        if len(anchor) < num_anchor:
            raise ValueError(f"the anchor file has {len(anchor)} rows, the model needs {num_anchor}")
        self.num_anchor, self.embed_dims, self.num_temp_instances = num_anchor, embed_dims, num_temp_instances
        self.confidence_decay, self.max_time_interval = confidence_decay, max_time_interval
        self.default_time_interval, self.fix_yaw_swap = default_time_interval, fix_yaw_swap
        self.anchor = nn.Parameter(torch.tensor(anchor))
        self.instance_feature = nn.Parameter(torch.zeros(num_anchor, embed_dims), requires_grad=False)
        self.anchor_handler = KeyPointsGenerator(embed_dims)  # only its anchor_projection; fix_scale (1, 3) keeps keys
        self.reset()

    def reset(self, slots: torch.Tensor | None = None):
        """`None`: forget everything (cache, tracking ids, the id counter). A bool (batch,) tensor: those
        slots start a new sequence; the next `get()` ignores their cached instances (as it does past
        `max_time_interval`) and `update()` gives their queries id -1."""
        if slots is None:
            self.cached_feature = self.cached_anchor = self.cached_metas = None
            self.mask = self.confidence = self.temp_confidence = None
            self.instance_id = None
            self.prev_id: int | torch.Tensor = 0  # next new tracking id
            self.pending_reset: torch.Tensor | None = None  # slots whose cache the next get() drops
            return
        slots = slots.to(self.anchor.device, torch.bool, copy=True).reshape(-1)
        if self.pending_reset is not None and self.pending_reset.shape == slots.shape:
            slots = slots | self.pending_reset
        self.pending_reset = slots

    def get(self, batch_size: int, metas: dict):
        feature = self.instance_feature[None].expand(batch_size, -1, -1)
        anchor = self.anchor[None].expand(batch_size, -1, -1)
        if self.cached_anchor is not None and self.cached_anchor.shape[0] == batch_size:
            dt = (metas["timestamp"] - self.cached_metas["timestamp"]).to(feature.dtype)
            self.mask = dt.abs() <= self.max_time_interval
            if self.pending_reset is not None:
                if self.pending_reset.shape != (batch_size,):
                    raise ValueError(f"reset slots {tuple(self.pending_reset.shape)} for a batch of {batch_size}")
                self.mask = self.mask & ~self.pending_reset.to(self.mask.device)
            t_prev2cur = metas["T_global_inv"].to(torch.float64) @ self.cached_metas["T_global"].to(torch.float64)
            self.cached_anchor = self.anchor_handler.anchor_projection(
                self.cached_anchor, t_prev2cur, dt, self.fix_yaw_swap
            )
            dt = torch.where((dt != 0) & self.mask, dt, dt.new_tensor(self.default_time_interval))
        else:
            self.reset()
            dt = feature.new_full((batch_size,), self.default_time_interval)
        self.pending_reset = None
        return feature, anchor, self.cached_feature, self.cached_anchor, dt

    def update(self, instance_feature, anchor, confidence):
        """After the single-frame layers: keep the best current instances behind the cached ones."""
        if self.cached_feature is None:
            return instance_feature, anchor
        num_dn = instance_feature.shape[1] - self.num_anchor
        dn_feat, dn_anchor = instance_feature[:, self.num_anchor :], anchor[:, self.num_anchor :]
        instance_feature, anchor = instance_feature[:, : self.num_anchor], anchor[:, : self.num_anchor]
        conf = confidence[:, : self.num_anchor].max(dim=-1).values
        _, (sel_feat, sel_anchor) = _topk(conf, self.num_anchor - self.num_temp_instances, instance_feature, anchor)
        sel_feat = torch.cat([self.cached_feature, sel_feat], dim=1)
        sel_anchor = torch.cat([self.cached_anchor, sel_anchor], dim=1)
        m = self.mask[:, None, None]
        instance_feature = torch.where(m, sel_feat, instance_feature)
        anchor = torch.where(m, sel_anchor, anchor)
        # slots that dropped their cache carry no confidence (cache() would otherwise raise this frame's
        # leading queries with a stale one) and their queries have no id yet (upstream instance_bank.py update)
        if self.confidence is not None:
            self.confidence = torch.where(self.mask[:, None], self.confidence, self.confidence.new_tensor(0))
        if self.instance_id is not None:
            self.instance_id = torch.where(self.mask[:, None], self.instance_id, self.instance_id.new_tensor(-1))
        if num_dn > 0:
            instance_feature = torch.cat([instance_feature, dn_feat], dim=1)
            anchor = torch.cat([anchor, dn_anchor], dim=1)
        return instance_feature, anchor

    def cache(self, instance_feature, anchor, confidence, metas):
        if self.num_temp_instances <= 0:
            return
        conf = confidence.detach().max(dim=-1).values.sigmoid()
        if self.confidence is not None:
            conf[:, : self.num_temp_instances] = torch.maximum(
                self.confidence * self.confidence_decay, conf[:, : self.num_temp_instances]
            )
        self.temp_confidence = conf  # which queries' ids update_instance_id() keeps
        self.cached_metas = {"timestamp": metas["timestamp"].detach(), "T_global": metas["T_global"].detach()}
        self.confidence, (self.cached_feature, self.cached_anchor) = _topk(
            conf, self.num_temp_instances, instance_feature.detach(), anchor.detach()
        )

    def get_instance_id(self, confidence: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """(batch, num_anchor) tracking ids of this frame's queries, after `cache()`: cached instances keep
        theirs, every other query (above `threshold`, if any) gets the next new id, in row-major order."""
        conf = confidence.max(dim=-1).values.sigmoid()
        ids = torch.full(conf.shape, -1, dtype=torch.long, device=conf.device)
        if self.instance_id is not None and self.instance_id.shape[0] == ids.shape[0]:
            ids[:, : self.instance_id.shape[1]] = self.instance_id
        new = ids < 0
        if threshold is not None:
            new = new & (conf >= threshold)
        prev_id = torch.as_tensor(self.prev_id, dtype=torch.long, device=ids.device)
        order = new.flatten().cumsum(0).reshape(new.shape) - 1  # counting without a host sync
        ids = torch.where(new, order + prev_id, ids)
        self.prev_id = prev_id + new.sum()
        if self.num_temp_instances > 0:
            self.update_instance_id(ids, conf)
        return ids

    def update_instance_id(self, ids: torch.Tensor, conf: torch.Tensor):
        """Keep the ids of the instances `cache()` kept (the top `num_temp_instances` of temp_confidence,
        which lead the next frame's queries); the other slots are -1."""
        temp_conf = self.temp_confidence if self.temp_confidence is not None else conf
        kept = torch.gather(ids, 1, torch.topk(temp_conf, self.num_temp_instances, dim=1).indices)
        self.instance_id = F.pad(kept, (0, self.num_anchor - self.num_temp_instances), value=-1)

    # every tensor the bank carries from one frame to the next, under the keys of `state()`
    _STATE = {
        "feature": "cached_feature",
        "anchor": "cached_anchor",
        "confidence": "confidence",
        "temp_confidence": "temp_confidence",
        "instance_id": "instance_id",
        "seq_reset": "pending_reset",
    }

    def state(self) -> dict[str, torch.Tensor]:
        """The temporal state as tensor references. Nothing here is changed in place by a later frame
        (each frame assigns new tensors), so a caller may hold it and `load_state` it later."""
        out = {key: getattr(self, attr) for key, attr in self._STATE.items() if getattr(self, attr) is not None}
        if self.cached_metas is not None:
            out["timestamp"], out["T_global"] = self.cached_metas["timestamp"], self.cached_metas["T_global"]
        out["prev_id"] = torch.as_tensor(self.prev_id, dtype=torch.long)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state()`'s output; `{}` is a full reset."""
        self.reset()
        device = self.anchor.device
        for key, attr in self._STATE.items():
            if key in state:
                setattr(self, attr, state[key].to(device))
        if "timestamp" in state:
            self.cached_metas = {"timestamp": state["timestamp"].to(device), "T_global": state["T_global"].to(device)}
        if "prev_id" in state:
            self.prev_id = state["prev_id"].to(device, torch.long)


def encode_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 9) x, y, z, l, w, h, yaw, vx, vy -> (N, 10) regression target x, y, z, log lwh, sin, cos, vx, vy."""
    return torch.cat(
        [boxes[:, :3], boxes[:, 3:6].log(), boxes[:, 6:7].sin(), boxes[:, 6:7].cos(), boxes[:, 7:]], dim=-1
    )


class Target:
    """Hungarian assignment and denoising queries (SparseBox3DTarget)."""

    def __init__(
        self,
        num_cls=10,
        cls_weight=2.0,
        box_weight=0.25,
        alpha=0.25,
        gamma=2.0,
        num_dn_groups=5,
        dn_noise_scale=(2.0,) * 3 + (0.5,) * 7,
        max_dn_gt=32,
        reg_weights=(2.0,) * 3 + (0.5,) * 3 + (0.0,) * 4,
        cls_wise_reg_weights=None,
    ):
        self.num_cls, self.cls_weight, self.box_weight, self.alpha, self.gamma = (
            num_cls,
            cls_weight,
            box_weight,
            alpha,
            gamma,
        )
        self.num_dn_groups, self.dn_noise_scale, self.max_dn_gt = num_dn_groups, dn_noise_scale, max_dn_gt
        self.reg_weights = reg_weights
        # traffic cone: no yaw in the cost, velocity counts (upstream config)
        self.cls_wise_reg_weights = cls_wise_reg_weights or {9: (2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0)}

    def _instance_weights(self, labels, targets):
        w = (~targets.isnan()).to(targets.dtype)
        for cls, weight in self.cls_wise_reg_weights.items():
            w = torch.where((labels == cls)[:, None], w.new_tensor(weight), w)
        return w

    def _cls_cost(self, cls_pred, labels):
        p = cls_pred.sigmoid()
        neg = -(1 - p + 1e-12).log() * (1 - self.alpha) * p.pow(self.gamma)
        pos = -(p + 1e-12).log() * self.alpha * (1 - p).pow(self.gamma)
        return (pos[:, labels] - neg[:, labels]) * self.cls_weight

    def _box_cost(self, pred, target, weights):
        w = pred.new_tensor(self.reg_weights)
        return (torch.abs(pred[:, None] - target[None]) * weights[None] * w).sum(-1) * self.box_weight

    @torch.no_grad()
    def sample(self, cls_pred, box_pred, labels_list, boxes_list):
        """Per-query class target (num_cls = background), box target and box weights."""
        bs, num_pred, num_cls = cls_pred.shape
        cls_target = cls_pred.new_full((bs, num_pred), num_cls, dtype=torch.long)
        box_target = box_pred.new_zeros(box_pred.shape)
        weights = box_pred.new_zeros(box_pred.shape)
        # per frame (pred_idx, gt_idx) of this call's match: SparseDrive's motion loss reads the last layer's
        self.indices: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * bs
        for i in range(bs):
            if len(labels_list[i]) == 0:
                continue
            target = encode_boxes(boxes_list[i])
            inst_w = self._instance_weights(labels_list[i], target)
            cost = self._cls_cost(cls_pred[i], labels_list[i]) + self._box_cost(
                box_pred[i], torch.nan_to_num(target), inst_w
            )
            cost = cost.cpu().numpy()
            cost = np.where(np.isneginf(cost) | np.isnan(cost), 1e8, cost)
            pred_idx, gt_idx = linear_sum_assignment(cost)
            pred_idx, gt_idx = torch.as_tensor(pred_idx), torch.as_tensor(gt_idx)
            self.indices[i] = (pred_idx, gt_idx)
            cls_target[i, pred_idx] = labels_list[i][gt_idx]
            box_target[i, pred_idx] = target[gt_idx]
            weights[i, pred_idx] = inst_w[gt_idx]
        return cls_target, box_target, weights

    @torch.no_grad()
    def dn_anchors(self, labels_list, boxes_list):
        """Noisy copies of the GT (positives within +-1 noise scale, negatives 1-2 scales away), matched
        back to the GT per group; returns (anchor, box target, class target, attention mask, valid)."""
        if self.num_dn_groups <= 0:
            return None
        labels_list = [x[: self.max_dn_gt] for x in labels_list]
        boxes_list = [x[: self.max_dn_gt] for x in boxes_list]
        max_gt = max(len(x) for x in labels_list)
        if max_gt == 0:
            return None
        labels = torch.stack([F.pad(x, (0, max_gt - len(x)), value=-1) for x in labels_list])
        target = torch.stack([F.pad(torch.nan_to_num(encode_boxes(x)), (0, 0, 0, max_gt - len(x))) for x in boxes_list])
        target = torch.where(labels[..., None] == -1, target.new_tensor(0.0), target)
        bs, g = labels.shape[0], self.num_dn_groups
        labels, target = labels.repeat(g, 1), target.repeat(g, 1, 1)  # group-major: index = group * bs + b
        scale = target.new_tensor(self.dn_noise_scale)
        pos = target + (torch.rand_like(target) * 2 - 1) * scale
        sign = torch.where(torch.rand_like(target) > 0.5, 1.0, -1.0)
        neg = target + (torch.rand_like(target) + 1) * sign * scale
        dn_anchor = torch.cat([pos, neg], dim=1)
        n = dn_anchor.shape[1]
        dn_box_target = torch.zeros_like(dn_anchor)
        dn_cls_target = labels.new_full((bs * g, n), -3)
        ones = torch.ones_like(target[0])
        for i in range(bs * g):
            a_idx, g_idx = linear_sum_assignment(self._box_cost(dn_anchor[i], target[i], ones).cpu().numpy())
            a_idx, g_idx = torch.as_tensor(a_idx), torch.as_tensor(g_idx)
            dn_box_target[i, a_idx] = target[i, g_idx]
            dn_cls_target[i, a_idx] = labels[i, g_idx]
        valid = (dn_cls_target >= 0) | ((torch.cat([labels, labels], 1) >= 0) & (dn_cls_target == -3))

        def regroup(x):  # (g * bs, n, ...) -> (bs, g * n, ...)
            return x.reshape(g, bs, n, *x.shape[2:]).transpose(0, 1).flatten(1, 2)

        mask = torch.ones(g * n, g * n, dtype=torch.bool, device=target.device)
        for k in range(g):
            mask[k * n : (k + 1) * n, k * n : (k + 1) * n] = False
        return regroup(dn_anchor), regroup(dn_box_target), regroup(dn_cls_target), mask, regroup(valid)


class Sparse4DHead(nn.Module):
    def __init__(self, cfg, anchor: np.ndarray | None = None):
        super().__init__()
        c = cfg
        self.cfg = c
        d = c.embed_dims
        self.num_single_frame_decoder = c.num_single_frame_decoder
        # SparseDrive's detection3d_head.py re-encodes the anchor after the last refine too (its output
        # anchor_embed feeds the motion planner); Sparse4D skips that unused encoding.
        self.encode_last_anchor = c.encode_last_anchor
        self.instance_bank = InstanceBank(c.num_anchor, d, anchor, c.num_temp_instances, fix_yaw_swap=c.fix_yaw_swap)
        self.anchor_encoder = AnchorEncoder(tuple(c.anchor_encoder_dims))
        single = ["deformable", "ffn", "norm", "refine"]
        multi = ["temp_gnn", "gnn", "norm", "deformable", "ffn", "norm", "refine"]
        self.operation_order = single * c.num_single_frame_decoder + multi * (
            c.num_decoder - c.num_single_frame_decoder
        )
        build = {
            "temp_gnn": lambda: GraphAttention(2 * d, c.num_groups, c.dropout),
            "gnn": lambda: GraphAttention(2 * d, c.num_groups, c.dropout),
            "norm": lambda: nn.LayerNorm(d),
            "ffn": lambda: AsymmetricFFN(2 * d, d, 4 * d, c.dropout),
            "deformable": lambda: DeformableFeatureAggregation(
                d, c.num_groups, c.num_levels, c.num_cams, c.attn_drop, c.num_learnable_pts, FIX_SCALE
            ),
            "refine": lambda: RefinementModule(d, c.num_classes),
        }
        self.layers = nn.ModuleList(build[op]() for op in self.operation_order)
        self.fc_before = nn.Linear(d, 2 * d, bias=False)
        self.fc_after = nn.Linear(2 * d, d, bias=False)
        self.target = Target(num_cls=c.num_classes, num_dn_groups=c.num_dn_groups)
        self.reg_weights = (2.0,) * 3 + (1.0,) * 7
        self.init_weights()

    def init_weights(self):
        xavier_init_except_refine(self.operation_order, self.layers)
        for layer in self.layers:
            if hasattr(layer, "init_weights"):
                layer.init_weights()

    def graph_model(self, index, query, query_pos, key=None, key_pos=None, value=None, attn_mask=None):
        """Decoupled attention: position is concatenated, not added; the residual carries it too."""
        query = torch.cat([query, query_pos], dim=-1)
        if key is not None:
            key = torch.cat([key, key_pos], dim=-1)
        if value is not None:
            value = self.fc_before(value)
        return self.fc_after(self.layers[index](query, key, value, attn_mask=attn_mask))

    def forward(self, feature_maps, metas, gt_labels=None, gt_boxes=None) -> dict:
        bs = feature_maps[0].shape[0]
        feature, anchor, temp_feature, temp_anchor, dt = self.instance_bank.get(bs, metas)
        attn_mask, dn = None, None
        if self.training and gt_labels is not None:
            dn = self.target.dn_anchors(gt_labels, gt_boxes)
        num_free = anchor.shape[1]
        if dn is not None:
            dn_anchor, dn_box_target, dn_cls_target, dn_mask, dn_valid = dn
            dn_anchor = torch.cat(
                [dn_anchor, dn_anchor.new_zeros(*dn_anchor.shape[:2], anchor.shape[-1] - dn_anchor.shape[-1])], -1
            )
            anchor = torch.cat([anchor, dn_anchor], dim=1)
            feature = torch.cat([feature, feature.new_zeros(bs, dn_anchor.shape[1], feature.shape[-1])], dim=1)
            total = anchor.shape[1]
            attn_mask = torch.ones(total, total, dtype=torch.bool, device=anchor.device)
            attn_mask[:num_free, :num_free] = False
            attn_mask[num_free:, num_free:] = dn_mask
        anchor_embed = self.anchor_encoder(anchor)
        temp_embed = self.anchor_encoder(temp_anchor) if temp_anchor is not None else None

        predictions, classifications, qualities = [], [], []
        last = len(self.operation_order) - 1
        for i, op in enumerate(self.operation_order):
            layer = self.layers[i]
            if op == "temp_gnn":
                feature = self.graph_model(
                    i,
                    feature,
                    anchor_embed,
                    temp_feature,
                    temp_embed,
                    temp_feature,
                    attn_mask=attn_mask if temp_feature is None else None,
                )
            elif op == "gnn":
                feature = self.graph_model(i, feature, anchor_embed, value=feature, attn_mask=attn_mask)
            elif op in ("norm", "ffn"):
                feature = layer(feature)
            elif op == "deformable":
                feature = layer(feature, anchor, anchor_embed, feature_maps, metas)
            else:  # refine
                return_cls = self.training or len(predictions) == self.num_single_frame_decoder - 1 or i == last
                anchor, cls, qt = layer(feature, anchor, anchor_embed, dt, return_cls)
                predictions.append(anchor)
                classifications.append(cls)
                qualities.append(qt)
                if len(predictions) == self.num_single_frame_decoder:
                    feature, anchor = self.instance_bank.update(feature, anchor, cls)
                if i != last or self.encode_last_anchor:
                    anchor_embed = self.anchor_encoder(anchor)
                if len(predictions) > self.num_single_frame_decoder and temp_embed is not None:
                    temp_embed = anchor_embed[:, : self.instance_bank.num_temp_instances]
        out = {
            "classification": [c[:, :num_free] if c is not None else None for c in classifications],
            "prediction": [p[:, :num_free] for p in predictions],
            "quality": [q[:, :num_free] if q is not None else None for q in qualities],
            "instance_feature": feature[:, :num_free],  # SparseDrive's motion planner reads these two
            "anchor_embed": anchor_embed[:, :num_free],
        }
        if dn is not None:
            out.update(
                dn_classification=[c[:, num_free:] for c in classifications],
                dn_prediction=[p[:, num_free:] for p in predictions],
                dn_reg_target=dn_box_target,
                dn_cls_target=dn_cls_target,
                dn_valid_mask=dn_valid,
            )
        self.instance_bank.cache(feature[:, :num_free], anchor[:, :num_free], cls[:, :num_free], metas)
        if self.training and not self.cfg.track_in_training:
            self.instance_bank.instance_id = None  # ids are not tracked in training; they would go stale
        else:  # upstream sparse4d_head.py forward: ids for every query (the v3 decoder has no score threshold)
            out["instance_id"] = self.instance_bank.get_instance_id(cls[:, :num_free])
        return out

    def loss(self, out: dict, gt_labels: list[torch.Tensor], gt_boxes: list[torch.Tensor]) -> dict:
        losses = {}
        nreg = len(self.reg_weights)
        reg_w = out["prediction"][0].new_tensor(self.reg_weights)
        for k, (cls, reg, qt) in enumerate(zip(out["classification"], out["prediction"], out["quality"])):
            reg = reg[..., :nreg]
            cls_target, box_target, weights = self.target.sample(cls, reg, gt_labels, gt_boxes)
            mask = ~torch.all(box_target == 0, dim=-1)
            num_pos = max(float(reduce_mean(mask.sum().to(reg.dtype))), 1.0)
            mask = mask & (cls.max(dim=-1).values.sigmoid() > self.cfg.cls_threshold_to_reg)
            losses[f"loss_cls_{k}"] = focal_loss(cls.flatten(0, 1), cls_target.flatten(), num_pos, weight=2.0)
            losses.update(
                self._reg_loss(
                    reg[mask],
                    torch.nan_to_num(box_target[mask]),
                    (weights * reg_w)[mask],
                    num_pos,
                    f"_{k}",
                    qt[mask] if qt is not None else None,
                    cls_target[mask],
                )
            )
        if "dn_prediction" in out:
            valid = out["dn_valid_mask"].flatten(0, 1)
            dn_cls = out["dn_cls_target"].flatten(0, 1)[valid]
            dn_reg = out["dn_reg_target"].flatten(0, 1)[valid][..., :nreg]
            pos = dn_cls >= 0
            num_dn = max(float(reduce_mean(valid.sum().to(dn_reg.dtype))), 1.0)
            for k, (cls, reg) in enumerate(zip(out["dn_classification"], out["dn_prediction"])):
                losses[f"loss_cls_dn_{k}"] = focal_loss(cls.flatten(0, 1)[valid], dn_cls, num_dn, weight=2.0)
                pred = reg.flatten(0, 1)[valid][pos][..., :nreg]
                losses[f"loss_box_dn_{k}"] = averaged((torch.abs(pred - dn_reg[pos]) * reg_w).sum(), num_dn) * 0.25
        return losses

    def _reg_loss(self, box, target, weight, avg, suffix, quality, cls_target) -> dict:
        # barrier (class 5) has no front or back: flip the target yaw when that is closer
        cos_sim = F.cosine_similarity(target[..., [SIN_YAW, COS_YAW]], box[..., [SIN_YAW, COS_YAW]], dim=-1)
        reverse = (cls_target == 5) & (cos_sim < 0)
        target = target.clone()
        target[..., [SIN_YAW, COS_YAW]] = torch.where(
            reverse[..., None], -target[..., [SIN_YAW, COS_YAW]], target[..., [SIN_YAW, COS_YAW]]
        )
        out = {f"loss_box{suffix}": averaged((torch.abs(box - target) * weight).sum(), avg) * 0.25}
        if quality is not None:
            cns_target = torch.exp(-torch.norm(target[..., X : Z + 1] - box[..., X : Z + 1], dim=-1))
            out[f"loss_cns{suffix}"] = averaged(
                F.binary_cross_entropy_with_logits(quality[..., CNS], cns_target.detach(), reduction="sum"), avg
            )
            yns_target = (
                F.cosine_similarity(target[..., [SIN_YAW, COS_YAW]], box[..., [SIN_YAW, COS_YAW]], dim=-1) > 0
            ).float()
            out[f"loss_yns{suffix}"] = gaussian_focal_loss(quality[..., YNS].sigmoid(), yns_target, avg)
        return out

    @torch.no_grad()
    def decode(self, out: dict, num_output: int = 300) -> list[dict]:
        """Per frame: `boxes` (N, 9: x, y, z, l, w, h, yaw, vx, vy), `scores`, `labels`, `instance_ids`.

        Upstream's `SparseBox3DDecoder.decode` with instance ids (`detection3d/decoder.py`, squeeze_cls):
        each query keeps its best class; the top `num_output` queries by that score, each score times
        the query's sigmoid centerness, sorted again. `instance_ids` are -1 where `out` has none.
        """
        score, label = out["classification"][-1].sigmoid().max(dim=-1)
        box = out["prediction"][-1]
        scores, idx = score.topk(min(num_output, score.shape[1]), dim=1)
        cls_scores = scores
        quality = out.get("quality")
        if quality is not None and quality[-1] is not None:
            scores = scores * torch.gather(quality[-1][..., CNS], 1, idx).sigmoid()
            scores, order = scores.sort(dim=1, descending=True)
            idx = torch.gather(idx, 1, order)
            # aligned with the boxes (upstream SparseDrive's decoder leaves its cls_scores in the pre-sort order)
            cls_scores = torch.gather(cls_scores, 1, order)
        labels = torch.gather(label, 1, idx)
        ids = out.get("instance_id")
        ids = torch.gather(ids, 1, idx) if ids is not None else torch.full_like(idx, -1)
        results = []
        for i in range(idx.shape[0]):
            b = box[i, idx[i]]
            yaw = torch.atan2(b[:, SIN_YAW], b[:, COS_YAW])
            decoded = torch.cat([b[:, :3], b[:, 3:6].exp(), yaw[:, None], b[:, VX : VX + 2]], dim=-1)
            results.append(
                {
                    "boxes": decoded.float().cpu(),
                    "scores": scores[i].float().cpu(),
                    "labels": labels[i].long().cpu(),
                    "instance_ids": ids[i].long().cpu(),
                    "cls_scores": cls_scores[i].float().cpu(),  # before the centerness factor (tracking)
                    "query_index": idx[i].long().cpu(),  # the query each box decodes (SparseDrive's motion)
                }
            )
        return results
