"""StreamPETR's 3D head: image tokens with a 3D position embedding, object queries, a memory queue of
past detections, denoising queries, 3D Hungarian losses and NMS-free decoding.

Behaviour follows exiawsh/StreamPETR `projects/mmdet3d_plugin/models/dense_heads/streampetr_head.py`
with the settings of `projects/configs/StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py`; helpers
come from `models/utils/{misc.py, positional_encoding.py}`, the assigner from
`core/bbox/assigners/hungarian_assigner_3d.py`, the decoder from `core/bbox/coders/nms_free_coder.py`.
Parameter and buffer names match upstream's `pts_bbox_head.*` state dict keys.

Box code (10): x, y, z (centre, metres), log l, log w, log h, sin yaw, cos yaw, vx, vy.

The memory queue (per batch slot, detached, not in the state dict) is kept in the GLOBAL frame
between frames and moved into the current lidar frame before each one, as upstream. What raydrive
does differently:
- the engine says which slots start a new sequence through `reset_memory(slots)` (upstream's
  `prev_exists = 0`); a slot reset that way is zeroed at once and gets the pseudo reference points
  at its next frame. No memory yet (or a new batch size) means every slot starts fresh;
- reference points, ego poses and timestamps of the memory are kept in float64 (upstream mixes
  float32 poses and float64 timestamps); they are cast to float32 where the network reads them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from raydrive.models.sparse4d.blocks import focal_loss
from raydrive.models.sparse4d.head import reduce_mean
from raydrive.models.streampetr.focal_head import inverse_sigmoid

CODE_SIZE = 10
UPSTREAM_PI = 3.14159  # the literal upstream uses in the DN classification avg factor
# mmdet's weight_reduce_loss divides a loss sum by (avg_factor + float32 eps), in every dtype
AVG_EPS = float(torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------------------------------
# Small functions (upstream models/utils/positional_encoding.py, misc.py, core/bbox/util.py)
# ----------------------------------------------------------------------------------------------------


def _sine(pos: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) -> (..., num_feats): interleaved sin/cos of pos * 2pi at DETR's frequencies."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    x = pos[..., None] * (2 * math.pi) / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb3d(pos: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> torch.Tensor:
    """(..., 3) normalised points -> (..., 3 * num_pos_feats), concatenated in the order y, x, z as upstream."""
    emb = [_sine(pos[..., i], num_pos_feats, temperature) for i in range(3)]
    return torch.cat((emb[1], emb[0], emb[2]), dim=-1)


def pos2posemb1d(pos: torch.Tensor, num_pos_feats: int = 256, temperature: float = 10000) -> torch.Tensor:
    """(..., 1) -> (..., num_pos_feats): the sine embedding of a scalar (here a time difference)."""
    return _sine(pos[..., 0], num_pos_feats, temperature)


def nerf_positional_encoding(x: torch.Tensor, num_freqs: int = 6) -> torch.Tensor:
    """(..., D) -> (..., 2 * num_freqs * D): [sin(2^0 x), cos(2^0 x), ..., sin(2^5 x), cos(2^5 x)], no input."""
    freqs = 2.0 ** torch.linspace(0.0, num_freqs - 1, num_freqs, dtype=x.dtype, device=x.device)
    parts = []
    for f in freqs:
        parts += [torch.sin(x * f), torch.cos(x * f)]
    return torch.cat(parts, dim=-1)


def normalize_bbox(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 9) x, y, z, l, w, h, yaw, vx, vy -> (..., 10) box code (log sizes, sin/cos yaw)."""
    yaw = boxes[..., 6:7]
    return torch.cat([boxes[..., 0:3], boxes[..., 3:6].log(), yaw.sin(), yaw.cos(), boxes[..., 7:9]], dim=-1)


def denormalize_bbox(code: torch.Tensor) -> torch.Tensor:
    """(..., 10) box code -> (..., 9) x, y, z, l, w, h, yaw, vx, vy."""
    yaw = torch.atan2(code[..., 6:7], code[..., 7:8])
    return torch.cat([code[..., 0:3], code[..., 3:6].exp(), yaw, code[..., 8:10]], dim=-1)


def transform_points(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply one 4x4 per batch slot: points (B, M, 3), matrix (B, 4, 4) -> (B, M, 3)."""
    homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    return (matrix.unsqueeze(1) @ homo.unsqueeze(-1)).squeeze(-1)[..., :3]


def gather_tokens(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Pick tokens along dim 1: x (B, L, ...), index (B, K) or (B, K, 1) -> (B, K, ...); None keeps all."""
    if index is None:
        return x
    index = index.reshape(index.shape[0], -1)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def focal_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """mmdet FocalLossCost (unweighted): (Q, C) logits, (G,) labels -> (Q, G)."""
    eps = 1e-12
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, labels] - neg[:, labels]


def hungarian_assign_3d(
    cls_logits: torch.Tensor,
    box_code: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    match_costs: torch.Tensor,
    cls_weight: float = 2.0,
    reg_weight: float = 0.25,
    with_velo: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream HungarianAssigner3D: focal cost + L1 on the code (first 8 dims unless with_velo) times
    `match_costs`. Returns (query index, gt index), both (min(Q, G),) int64 on the predictions' device."""
    device = box_code.device
    if gt_boxes.shape[0] == 0 or box_code.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    cost_cls = focal_cost(cls_logits, gt_labels) * cls_weight
    pred = box_code * match_costs
    target = normalize_bbox(gt_boxes) * match_costs
    dims = CODE_SIZE if with_velo else 8
    cost_reg = torch.cdist(pred[:, :dims], target[:, :dims], p=1) * reg_weight
    cost = torch.nan_to_num((cost_cls + cost_reg).detach().float().cpu(), nan=100.0, posinf=100.0, neginf=-100.0)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
        cols, dtype=torch.long, device=device
    )


# ----------------------------------------------------------------------------------------------------
# Modules with upstream's names (models/utils/misc.py)
# ----------------------------------------------------------------------------------------------------


class MLN(nn.Module):
    """Motion-aware layer norm: LN without affine, then gamma(c) * x + beta(c); starts as the identity LN."""

    def __init__(self, c_dim: int, f_dim: int = 256) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Linear(c_dim, f_dim), nn.ReLU())
        self.gamma = nn.Linear(f_dim, f_dim)
        self.beta = nn.Linear(f_dim, f_dim)
        self.ln = nn.LayerNorm(f_dim, elementwise_affine=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.reduce(c)
        return self.gamma(c) * self.ln(x) + self.beta(c)


class SELayerLinear(nn.Module):
    """Upstream SELayer_Linear: x * sigmoid(MLP(x_se)); the image features gate the position embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Linear(channels, channels)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Linear(channels, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor, x_se: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x_se))))


def _mlp(in_dims: int, hidden: int, out_dims: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dims, hidden), nn.ReLU(), nn.Linear(hidden, out_dims))


# ----------------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------------


class StreamPETRHead(nn.Module):
    """StreamPETR's 3D detection head (upstream `StreamPETRHead`); sizes are kwargs so presets can shrink it.

    forward(feats (B, N, C, h, w), batch, topk_indexes=None) -> dict with
      all_cls_scores (L, B, Q + P, num_classes) logits and all_bbox_preds (L, B, Q + P, 10) box codes
      (xyz in metres) for the matching queries (Q = num_query) and propagated ones (P = num_propagated),
      and dn_mask_dict (None, or the denoising queries' outputs and targets). Updates the memory.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 256,
        embed_dims: int = 256,
        num_query: int = 644,
        memory_len: int = 1024,
        topk_proposals: int = 256,
        num_propagated: int = 256,
        stride: int = 16,
        depth_num: int = 64,
        depth_start: float = 1.0,
        lid: bool = True,
        position_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        pc_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        post_center_range: tuple[float, ...] | None = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        max_num: int = 300,
        score_threshold: float | None = None,
        code_weights: tuple[float, ...] = (2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
        match_costs: tuple[float, ...] | None = None,
        num_reg_fcs: int = 2,
        with_ego_pos: bool = True,
        match_with_velo: bool = False,
        with_dn: bool = True,
        num_dn_groups: int = 10,
        dn_noise_scale: float = 1.0,
        dn_noise_trans: float = 0.0,
        dn_split: float = 0.75,
        dn_weight: float = 1.0,
        loss_cls_weight: float = 2.0,
        loss_bbox_weight: float = 0.25,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cls_cost_weight: float = 2.0,
        reg_cost_weight: float = 0.25,
        num_layers: int = 6,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        dropout: float = 0.1,
        with_cp: bool = False,
        cross_attn_radius: float | None = None,
        transformer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        assert embed_dims % 2 == 0, "the 3D sine embedding splits embed_dims in halves"
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_query = num_query
        self.memory_len = memory_len
        self.topk_proposals = topk_proposals
        self.num_propagated = num_propagated
        self.stride = stride
        self.depth_num = depth_num
        self.max_num = max_num
        self.score_threshold = score_threshold
        self.with_ego_pos = with_ego_pos
        self.match_with_velo = match_with_velo
        self.with_dn = with_dn
        self.num_dn_groups = num_dn_groups
        self.dn_noise_scale = dn_noise_scale
        self.dn_noise_trans = dn_noise_trans
        self.dn_split = dn_split
        self.dn_weight = dn_weight
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_cost_weight = cls_cost_weight
        self.reg_cost_weight = reg_cost_weight
        self.num_layers = num_layers
        self.cross_attn_radius = cross_attn_radius  # None upstream; see StreamPETRConfig
        self.post_center_range = tuple(post_center_range) if post_center_range is not None else None

        if transformer is None:
            from raydrive.models.streampetr.transformer import PETRTemporalDecoder

            transformer = PETRTemporalDecoder(
                num_layers=num_layers,
                embed_dims=embed_dims,
                num_heads=num_heads,
                ffn_dims=ffn_dims,
                dropout=dropout,
                with_cp=with_cp,
            )

        # Constants that upstream keeps as frozen nn.Parameters: the same here, so the parameter count
        # (82,947,153 for vov99) and the state-dict keys are upstream's.
        def frozen(values) -> nn.Parameter:
            return nn.Parameter(torch.as_tensor(values, dtype=torch.float32), requires_grad=False)

        self.code_weights = frozen(code_weights)
        self.match_costs = frozen(match_costs if match_costs is not None else code_weights)
        self.pc_range = frozen(pc_range)
        self.position_range = frozen(position_range)
        self.coords_d = frozen(self._depth_bins(depth_num, depth_start, lid))

        self._build_layers(in_channels, num_reg_fcs)
        self.transformer = transformer  # registered last: upstream's state-dict order
        self.init_weights()
        self.reset_memory()

    # ------------------------------------------------------------------ construction

    def _depth_bins(self, depth_num: int, depth_start: float, lid: bool) -> torch.Tensor:
        """Depths of the camera-ray samples up to position_range's x max: linear-increasing (LID) or uniform."""
        index = torch.arange(depth_num, dtype=torch.float32)
        far = self.position_range[3]
        if lid:
            bin_size = (far - depth_start) / (depth_num * (1 + depth_num))
            return depth_start + bin_size * index * (index + 1)
        return depth_start + (far - depth_start) / depth_num * index

    def _build_layers(self, in_channels: int, num_reg_fcs: int) -> None:
        d = self.embed_dims
        cls_layers: list[nn.Module] = []
        reg_layers: list[nn.Module] = []
        for _ in range(num_reg_fcs):
            cls_layers += [nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True)]
            reg_layers += [nn.Linear(d, d), nn.ReLU()]
        cls_branch = nn.Sequential(*cls_layers, nn.Linear(d, self.num_classes))
        reg_branch = nn.Sequential(*reg_layers, nn.Linear(d, CODE_SIZE))
        # Upstream puts the SAME branch instance in every slot: one set of weights shared by all decoder
        # layers, while the state dict still lists cls_branches.0..L-1 (and parameters() counts it once).
        self.cls_branches = nn.ModuleList([cls_branch] * self.num_layers)
        self.reg_branches = nn.ModuleList([reg_branch] * self.num_layers)

        self.position_encoder = _mlp(self.depth_num * 3, d * 4, d)
        self.memory_embed = _mlp(in_channels, d, d)
        self.featurized_pe = SELayerLinear(d)
        self.reference_points = nn.Embedding(self.num_query, 3)
        if self.num_propagated > 0:
            self.pseudo_reference_points = nn.Embedding(self.num_propagated, 3)
        self.query_embedding = _mlp(d * 3 // 2, d, d)
        self.spatial_alignment = MLN(8, d)
        self.time_embedding = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        if self.with_ego_pos:
            self.ego_pose_pe = MLN(180, d)
            self.ego_pose_memory = MLN(180, d)

    def init_weights(self) -> None:
        """Upstream init_weights: uniform refs in [0, 1], frozen pseudo refs, cls bias for prior 0.01."""
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        if self.num_propagated > 0:
            nn.init.uniform_(self.pseudo_reference_points.weight, 0, 1)
            self.pseudo_reference_points.weight.requires_grad = False
        if hasattr(self.transformer, "init_weights"):
            self.transformer.init_weights()
        nn.init.constant_(self.cls_branches[0][-1].bias, -math.log((1 - 0.01) / 0.01))

    # ------------------------------------------------------------------ memory queue

    def reset_memory(self, slots: torch.Tensor | None = None) -> None:
        """Start new sequences: None = every slot (the memory is dropped); else zero the slots where
        `slots` (B,) is True; they get pseudo reference points at their next frame (prev_exists = 0)."""
        if slots is None or self.memory_embedding is None:
            self.memory_embedding: torch.Tensor | None = None  # (B, M, C) float32
            self.memory_reference_point: torch.Tensor | None = None  # (B, M, 3) float64, global frame
            self.memory_timestamp: torch.Tensor | None = None  # (B, M, 1) float64, minus its frame time
            self.memory_egopose: torch.Tensor | None = None  # (B, M, 4, 4) float64, its lidar -> global
            self.memory_velo: torch.Tensor | None = None  # (B, M, 2) float32, in its own frame
            self._fresh: torch.Tensor | None = None  # (B,) bool: slots that start a sequence next frame
            return
        slots = slots.to(device=self.memory_embedding.device, dtype=torch.bool)
        keep = ~slots
        for name in ("memory_embedding", "memory_reference_point", "memory_timestamp", "memory_egopose", "memory_velo"):
            value = getattr(self, name)
            setattr(self, name, value * keep.view(-1, *([1] * (value.dim() - 1))).to(value.dtype))
        self._fresh = self._fresh | slots

    def memory_state(self) -> dict[str, torch.Tensor]:
        """The memory queue as tensors (empty before the first frame / after a full reset)."""
        if self.memory_embedding is None:
            return {}
        return {
            "embedding": self.memory_embedding,
            "reference_point": self.memory_reference_point,
            "timestamp": self.memory_timestamp,
            "egopose": self.memory_egopose,
            "velo": self.memory_velo,
            "fresh": self._fresh,
        }

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what memory_state returned; an empty dict resets every slot."""
        if not state:
            self.reset_memory(None)
            return
        self.memory_embedding = state["embedding"]
        self.memory_reference_point = state["reference_point"]
        self.memory_timestamp = state["timestamp"]
        self.memory_egopose = state["egopose"]
        self.memory_velo = state["velo"]
        self._fresh = state["fresh"]

    @torch.no_grad()
    def _pre_update_memory(self, batch: dict[str, Any], batch_size: int, device: torch.device) -> None:
        """Before a frame: move the memory into the current lidar frame, make timestamps relative to now,
        drop what is past memory_len, clear fresh slots and seed them with the pseudo reference points."""
        if self.memory_embedding is None or self.memory_embedding.shape[0] != batch_size:
            B, M = batch_size, self.memory_len
            self.memory_embedding = torch.zeros(B, M, self.embed_dims, device=device)
            self.memory_reference_point = torch.zeros(B, M, 3, device=device, dtype=torch.float64)
            self.memory_timestamp = torch.zeros(B, M, 1, device=device, dtype=torch.float64)
            self.memory_egopose = torch.zeros(B, M, 4, 4, device=device, dtype=torch.float64)
            self.memory_velo = torch.zeros(B, M, 2, device=device)
            fresh = torch.ones(B, dtype=torch.bool, device=device)
        else:
            fresh = self._fresh
            keep = (~fresh).to(torch.float64)
            ego_inv = batch["ego_pose_inv"].to(device=device, dtype=torch.float64)
            now = batch["timestamp"].to(device=device, dtype=torch.float64)
            M = self.memory_len
            ts = self.memory_timestamp + now.view(-1, 1, 1)
            pose = ego_inv.unsqueeze(1) @ self.memory_egopose
            ref = transform_points(self.memory_reference_point, ego_inv)
            self.memory_timestamp = ts[:, :M] * keep.view(-1, 1, 1)
            self.memory_egopose = pose[:, :M] * keep.view(-1, 1, 1, 1)
            self.memory_reference_point = ref[:, :M] * keep.view(-1, 1, 1)
            self.memory_embedding = self.memory_embedding[:, :M] * keep.view(-1, 1, 1).float()
            self.memory_velo = self.memory_velo[:, :M] * keep.view(-1, 1, 1).float()
        P = self.num_propagated
        if P > 0:
            lo, hi = self.pc_range[:3], self.pc_range[3:]
            pseudo = (self.pseudo_reference_points.weight * (hi - lo) + lo).to(torch.float64)
            is_fresh = fresh.to(torch.float64)
            eye = torch.eye(4, device=device, dtype=torch.float64)
            self.memory_reference_point[:, :P] += is_fresh.view(-1, 1, 1) * pseudo
            self.memory_egopose[:, :P] += is_fresh.view(-1, 1, 1, 1) * eye
        self._fresh = torch.zeros(batch_size, dtype=torch.bool, device=device)

    @torch.no_grad()
    def _post_update_memory(
        self,
        batch: dict[str, Any],
        cls_scores: torch.Tensor,
        bbox_preds: torch.Tensor,
        outs_dec: torch.Tensor,
        pad_size: int,
    ) -> None:
        """After a frame: push the last layer's top-k queries (by best class score, DN excluded) to the front
        of the queue, then move the whole queue to the global frame and timestamps to minus-now."""
        scores = cls_scores[-1][:, pad_size:].float().sigmoid().max(dim=-1).values  # (B, Q')
        boxes = bbox_preds[-1][:, pad_size:]
        _, index = torch.topk(scores, self.topk_proposals, dim=1)
        rec_ref = gather_tokens(boxes[..., :3], index).to(torch.float64)
        rec_velo = gather_tokens(boxes[..., -2:], index).float()
        rec_emb = gather_tokens(outs_dec[-1][:, pad_size:], index).float()
        B, K = index.shape
        device = index.device
        rec_ts = torch.zeros(B, K, 1, device=device, dtype=torch.float64)
        rec_pose = torch.eye(4, device=device, dtype=torch.float64).expand(B, K, 4, 4)

        ego = batch["ego_pose"].to(device=device, dtype=torch.float64)
        now = batch["timestamp"].to(device=device, dtype=torch.float64)
        self.memory_embedding = torch.cat([rec_emb, self.memory_embedding], dim=1)
        self.memory_velo = torch.cat([rec_velo, self.memory_velo], dim=1)
        ref = torch.cat([rec_ref, self.memory_reference_point], dim=1)
        self.memory_reference_point = transform_points(ref, ego)
        self.memory_timestamp = torch.cat([rec_ts, self.memory_timestamp], dim=1) - now.view(-1, 1, 1)
        self.memory_egopose = ego.unsqueeze(1) @ torch.cat([rec_pose, self.memory_egopose], dim=1)

    # ------------------------------------------------------------------ embeddings

    def _pixel_centres(self, h: int, w: int, pad_hw: tuple[float, float], device: torch.device) -> torch.Tensor:
        """(h * w, 2) u, v pixel centres of the stride grid, computed as upstream (normalised, then scaled)."""
        pad_h, pad_w = pad_hw
        s = self.stride
        xs = (torch.arange(0, s * w, s, dtype=torch.float32, device=device) + s // 2) / pad_w * pad_w
        ys = (torch.arange(0, s * h, s, dtype=torch.float32, device=device) + s // 2) / pad_h * pad_h
        v, u = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)

    def position_embedding(
        self, batch: dict[str, Any], shape: tuple[int, int, int, int], topk_indexes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """3D position embedding of the image tokens (upstream `position_embeding`).

        Each token's ray is sampled at the depth bins, lifted with inv(lidar2img), normalised by
        position_range: (B, L, D * 3) -> MLP -> (B, L, C). The cone (B, L, 8) feeds spatial alignment:
        |fx|, |fy| / 1000, the normalised point at the last depth and at depth bin D - 30 (34 of 64)."""
        B, N, h, w = shape
        device, dtype = self.coords_d.device, self.coords_d.dtype  # fp32 in training (geometry out of AMP)
        eps = 1e-5
        pad_hw = batch.get("pad_hw")
        if pad_hw is None:
            pad = (float(h * self.stride), float(w * self.stride))
        else:
            pad = (float(pad_hw[0][0]), float(pad_hw[0][1]))  # upstream reads the first image's pad shape
        D = self.depth_num
        hw = h * w

        centres = self._pixel_centres(h, w, pad, device).repeat(N, 1)  # (N * hw, 2), camera-major tokens
        cams = torch.arange(N, device=device).repeat_interleave(hw)
        centres = gather_tokens(centres.expand(B, -1, -1), topk_indexes)  # (B, L, 2)
        cams = gather_tokens(cams.expand(B, -1), topk_indexes)  # (B, L)

        depth = self.coords_d.view(1, 1, D, 1).expand(*centres.shape[:2], D, 1)
        uv = centres.unsqueeze(2) * torch.clamp(depth, min=eps)
        coords = torch.cat([uv, depth, torch.ones_like(depth)], dim=-1)  # (B, L, D, 4)
        with torch.autocast(device_type=device.type, enabled=False):  # geometry stays fp32 under AMP
            img2lidar = batch["lidar2img"].to(device=device, dtype=dtype).inverse()  # (B, N, 4, 4)
            img2lidar = torch.gather(img2lidar, 1, cams.view(B, -1, 1, 1).expand(-1, -1, 4, 4))  # (B, L, 4, 4)
            points = torch.einsum("blij,bldj->bldi", img2lidar, coords)[..., :3]
        lo, hi = self.position_range[:3], self.position_range[3:]
        points = ((points - lo) / (hi - lo)).reshape(B, -1, D * 3)
        pos_embed = self.position_encoder(inverse_sigmoid(points))

        intrinsics = batch["intrinsics"].to(device=device, dtype=dtype)
        focal = torch.stack([intrinsics[..., 0, 0], intrinsics[..., 1, 1]], dim=-1).abs() / 1e3  # (B, N, 2)
        # Upstream tiles the per-camera focal lengths camera-fastest ((B, N, 2).repeat(1, h*w, 1)) while the
        # tokens are camera-major, so token t reads camera t % N; kept for parity with trained weights.
        focal = gather_tokens(focal.repeat(1, hw, 1), topk_indexes)
        mid = max(D - 30, 0)  # upstream slices [-90:-87] of the D * 3 values: bin 34 when D = 64
        cone = torch.cat([focal, points[..., -3:], points[..., mid * 3 : mid * 3 + 3]], dim=-1)
        return pos_embed, cone

    def _token_rays(
        self, batch: dict[str, Any], shape: tuple[int, int, int, int], topk_indexes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image token's camera ray in the lidar frame: origins (B, L, 3) and unit directions (B, L, 3),
        from its pixel centre lifted at depths 1 and 2 through inv(lidar2img)."""
        B, N, h, w = shape
        device, dtype = self.coords_d.device, self.coords_d.dtype
        pad_hw = batch.get("pad_hw")
        pad = (float(h * self.stride), float(w * self.stride)) if pad_hw is None else tuple(map(float, pad_hw[0]))
        centres = self._pixel_centres(h, w, pad, device).repeat(N, 1)
        cams = torch.arange(N, device=device).repeat_interleave(h * w)
        centres = gather_tokens(centres.expand(B, -1, -1), topk_indexes)
        cams = gather_tokens(cams.expand(B, -1), topk_indexes)
        img2lidar = batch["lidar2img"].to(device=device, dtype=dtype).inverse()
        img2lidar = torch.gather(img2lidar, 1, cams.view(B, -1, 1, 1).expand(-1, -1, 4, 4))
        ends = []
        for depth in (1.0, 2.0):
            coords = torch.cat(
                [centres * depth, torch.full_like(centres[..., :1], depth), torch.ones_like(centres[..., :1])], -1
            )
            ends.append(torch.einsum("blij,blj->bli", img2lidar, coords)[..., :3])
        return ends[0], nn.functional.normalize(ends[1] - ends[0], dim=-1)

    def _cross_attn_mask(self, refs: torch.Tensor, rays: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, 1, Q, L) bool, True = blocked: a query may only look at tokens whose ray passes within
        `cross_attn_radius` metres (+ one 16-px token's spread, ~0.06 m per metre along the ray) of its
        reference point; its 4 nearest rays always stay open, so no row is fully masked."""
        origin, direction = rays
        lo, hi = self.pc_range[:3], self.pc_range[3:]
        centre = refs.detach().float() * (hi - lo) + lo  # (B, Q, 3) metres
        rel = centre.unsqueeze(2) - origin.unsqueeze(1)  # (B, Q, L, 3)
        along = (rel * direction.unsqueeze(1)).sum(-1)
        dist = (rel - along.clamp(min=0).unsqueeze(-1) * direction.unsqueeze(1)).norm(dim=-1)
        limit = self.cross_attn_radius + 0.06 * along.clamp(min=0)
        kth = dist.topk(min(4, dist.shape[-1]), dim=-1, largest=False).values[..., -1:]
        return ((dist > limit) & (dist > kth)).unsqueeze(1)

    def _query_pos(self, refs: torch.Tensor) -> torch.Tensor:
        return self.query_embedding(pos2posemb3d(refs, self.embed_dims // 2))

    def _temporal_alignment(
        self, query_pos: torch.Tensor, tgt: torch.Tensor, refs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MLN the queries and the memory with their ego motion, add the time embedding, and move the first
        num_propagated memory entries into the query set; the rest become extra self-attention keys."""
        B, Q = query_pos.shape[:2]
        lo, hi = self.pc_range[:3].double(), self.pc_range[3:].double()
        temp_refs = ((self.memory_reference_point - lo) / (hi - lo)).float()
        temp_pos = self._query_pos(temp_refs)
        temp_memory = self.memory_embedding
        if self.with_ego_pos:
            eye = torch.eye(4, device=query_pos.device)[:3].flatten()
            motion = torch.cat([torch.zeros_like(refs[..., :3]), eye.expand(B, Q, 12)], dim=-1)
            motion = nerf_positional_encoding(motion)
            tgt = self.ego_pose_memory(tgt, motion)
            query_pos = self.ego_pose_pe(query_pos, motion)
            memory_motion = torch.cat(
                [self.memory_velo.double(), self.memory_timestamp, self.memory_egopose[..., :3, :].flatten(-2)], dim=-1
            ).float()
            memory_motion = nerf_positional_encoding(memory_motion)
            temp_pos = self.ego_pose_pe(temp_pos, memory_motion)
            temp_memory = self.ego_pose_memory(temp_memory, memory_motion)
        d = self.embed_dims
        query_pos = query_pos + self.time_embedding(pos2posemb1d(torch.zeros_like(refs[..., :1]), d))
        temp_pos = temp_pos + self.time_embedding(pos2posemb1d(self.memory_timestamp, d).float())

        P = self.num_propagated
        if P > 0:
            tgt = torch.cat([tgt, temp_memory[:, :P]], dim=1)
            query_pos = torch.cat([query_pos, temp_pos[:, :P]], dim=1)
            refs = torch.cat([refs, temp_refs[:, :P]], dim=1)
            temp_memory = temp_memory[:, P:]
            temp_pos = temp_pos[:, P:]
        return tgt, query_pos, refs, temp_memory, temp_pos

    # ------------------------------------------------------------------ denoising

    def prepare_for_dn(
        self, batch_size: int, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any] | None]:
        """Reference points (B, pad + Q, 3) with the noised GT centres in front (training only), the
        self-attention mask (pad + Q + P, pad + Q + memory_len), True = blocked, and the DN targets.

        Group g holds every frame's GT j at pad index g * max_gt + j; a centre moves by U(-1, 1) * size / 2 *
        noise, and one moved by more than `dn_split` (norm of the U draw) is labelled background."""
        refs = self.reference_points.weight
        device = refs.device
        if not (self.training and self.with_dn):
            return refs.unsqueeze(0).repeat(batch_size, 1, 1), None, None
        boxes_list = [b.to(device=device, dtype=refs.dtype) for b in batch["gt_boxes"]]
        labels_list = [lab.to(device=device, dtype=torch.long) for lab in batch["gt_labels"]]
        known_num = [int(b.shape[0]) for b in boxes_list]
        single_pad = max(known_num, default=0)
        G = self.num_dn_groups
        pad = single_pad * G
        if pad == 0:
            return refs.unsqueeze(0).repeat(batch_size, 1, 1), None, None

        boxes = torch.cat(boxes_list)
        labels = torch.cat(labels_list)
        batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(known_num)])
        known_boxes = boxes.repeat(G, 1)
        known_labels = labels.repeat(G)
        known_bid = batch_idx.repeat(G)
        lo, hi = self.pc_range[:3], self.pc_range[3:]
        centre = known_boxes[:, :3].clone()
        if self.dn_noise_scale > 0:
            rand = torch.rand_like(centre) * 2 - 1
            centre = centre + rand * (known_boxes[:, 3:6] / 2 + self.dn_noise_trans) * self.dn_noise_scale
            known_labels[rand.norm(dim=1) > self.dn_split] = self.num_classes
        # Upstream normalises inside the noise branch only; noise_scale 0 would leave metres there.
        centre = ((centre - lo) / (hi - lo)).clamp(0.0, 1.0)

        in_group = torch.cat([torch.arange(n, device=device) for n in known_num])
        map_known_indice = torch.cat([in_group + single_pad * g for g in range(G)])
        padded = torch.cat([refs.new_zeros(pad, 3), refs]).unsqueeze(0).repeat(batch_size, 1, 1)
        padded[known_bid, map_known_indice] = centre

        attn_mask = self.dn_attention_mask(single_pad, device)
        dn = {
            "known_labels": known_labels,
            "known_bboxs": known_boxes,
            "known_bid": known_bid,
            "map_known_indice": map_known_indice,
            "pad_size": pad,
            "num_tgt": int(known_labels.numel()),
        }
        return padded, attn_mask, dn

    def dn_attention_mask(self, single_pad: int, device: torch.device) -> torch.Tensor:
        """(pad + Q + P, pad + Q + memory_len) bool, True = blocked: the matching and propagated queries do
        not see the DN queries, and DN groups do not see each other; DN queries see everything else."""
        pad = single_pad * self.num_dn_groups
        rows = pad + self.num_query + self.num_propagated
        cols = pad + self.num_query + self.memory_len
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        mask[pad:, :pad] = True
        group = torch.arange(pad, device=device) // max(single_pad, 1)
        mask[:pad, :pad] = group[:, None] != group[None, :]
        return mask

    # ------------------------------------------------------------------ forward

    def forward(
        self, feats: torch.Tensor, batch: dict[str, Any], topk_indexes: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """feats (B, N, C, h, w) stride-16 features; batch with lidar2img, intrinsics, ego_pose(_inv),
        timestamp, pad_hw (and gt_boxes / gt_labels for DN in training); topk_indexes (B, K[, 1]) tokens kept
        by the 2D head or None. Updates the memory queue."""
        B, N, C, h, w = feats.shape
        self._pre_update_memory(batch, B, feats.device)

        tokens = gather_tokens(feats.permute(0, 1, 3, 4, 2).reshape(B, N * h * w, C), topk_indexes)
        pos_embed, cone = self.position_embedding(batch, (B, N, h, w), topk_indexes)
        memory = self.spatial_alignment(self.memory_embed(tokens), cone)
        pos_embed = self.featurized_pe(pos_embed, memory)

        refs, attn_mask, dn = self.prepare_for_dn(B, batch)
        query_pos = self._query_pos(refs)
        tgt = torch.zeros_like(query_pos)
        tgt, query_pos, refs, temp_memory, temp_pos = self._temporal_alignment(query_pos, tgt, refs)

        cross_mask = None
        if self.cross_attn_radius is not None:
            cross_mask = self._cross_attn_mask(refs, self._token_rays(batch, (B, N, h, w), topk_indexes))
        outs_dec = self.transformer(tgt, memory, query_pos, pos_embed, temp_memory, temp_pos, attn_mask, cross_mask)
        outs_dec = torch.nan_to_num(outs_dec)

        ref_logits = inverse_sigmoid(refs)
        lo, hi = self.pc_range[:3], self.pc_range[3:]
        cls_scores, bbox_preds = [], []
        for lvl in range(outs_dec.shape[0]):
            cls_scores.append(self.cls_branches[lvl](outs_dec[lvl]))
            delta = self.reg_branches[lvl](outs_dec[lvl])
            xyz = (delta[..., :3] + ref_logits).sigmoid() * (hi - lo) + lo
            bbox_preds.append(torch.cat([xyz, delta[..., 3:]], dim=-1))
        all_cls = torch.stack(cls_scores)
        all_boxes = torch.stack(bbox_preds)

        pad = dn["pad_size"] if dn is not None else 0
        self._post_update_memory(batch, all_cls, all_boxes, outs_dec, pad)

        if dn is not None:
            dn["output_known_lbs_bboxes"] = (all_cls[:, :, :pad], all_boxes[:, :, :pad])
        return {"all_cls_scores": all_cls[:, :, pad:], "all_bbox_preds": all_boxes[:, :, pad:], "dn_mask_dict": dn}

    # ------------------------------------------------------------------ losses

    def _focal(self, logits: torch.Tensor, labels: torch.Tensor, avg_factor: float) -> torch.Tensor:
        return focal_loss(
            logits,
            labels,
            avg_factor + AVG_EPS,
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            weight=self.loss_cls_weight,
        )

    def _l1(self, pred: torch.Tensor, target_boxes: torch.Tensor, avg_factor: float) -> torch.Tensor:
        """Weighted L1 of box codes against normalised 9-value targets; rows with a non-finite target
        (upstream's isnotnan filter) are skipped."""
        target = normalize_bbox(target_boxes)
        ok = torch.isfinite(target).all(dim=-1)
        diff = (pred[ok] - target[ok]).abs() * self.code_weights
        return diff.sum() / (avg_factor + AVG_EPS) * self.loss_bbox_weight

    @staticmethod
    def _mean_count(count: float, like: torch.Tensor) -> float:
        """Mean of a count over ranks (torch.distributed only when initialised), at least 1."""
        return torch.clamp(reduce_mean(like.new_tensor([float(count)])), min=1).item()

    def assign(
        self, cls_logits: torch.Tensor, box_code: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """3D Hungarian matching of one frame's queries (Q, C), (Q, 10) to its GT (G, 9), (G,)."""
        return hungarian_assign_3d(
            cls_logits,
            box_code,
            gt_boxes,
            gt_labels,
            self.match_costs,
            cls_weight=self.cls_cost_weight,
            reg_weight=self.reg_cost_weight,
            with_velo=self.match_with_velo,
        )

    def loss_single(
        self,
        cls_scores: torch.Tensor,
        bbox_preds: torch.Tensor,
        gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer: Hungarian targets per frame, focal over all queries, L1 over the matched ones."""
        B, Q, _ = cls_scores.shape
        labels = torch.full((B, Q), self.num_classes, dtype=torch.long, device=cls_scores.device)
        pos_preds, pos_targets = [], []
        for b in range(B):
            rows, cols = self.assign(cls_scores[b], bbox_preds[b], gt_boxes[b], gt_labels[b])
            labels[b, rows] = gt_labels[b][cols]
            pos_preds.append(bbox_preds[b, rows])
            pos_targets.append(gt_boxes[b][cols])
        num_pos = sum(int(p.shape[0]) for p in pos_preds)
        loss_cls = self._focal(cls_scores.reshape(B * Q, -1), labels.reshape(-1), max(float(num_pos), 1.0))
        avg = self._mean_count(num_pos, loss_cls)
        loss_bbox = self._l1(torch.cat(pos_preds), torch.cat(pos_targets), avg)
        return torch.nan_to_num(loss_cls), torch.nan_to_num(loss_bbox)

    def dn_loss_single(
        self,
        cls_scores: torch.Tensor,
        bbox_preds: torch.Tensor,
        known_boxes: torch.Tensor,
        known_labels: torch.Tensor,
        num_tgt: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer's DN queries (n, C), (n, 10): focal against the (possibly background) labels with
        upstream's expected-positive avg factor, L1 against the unnoised boxes for all of them."""
        cls_avg = max(num_tgt * UPSTREAM_PI / 6 * self.dn_split**3, 1.0)
        loss_cls = self._focal(cls_scores, known_labels, cls_avg)
        avg = self._mean_count(num_tgt, loss_cls)
        loss_bbox = self._l1(bbox_preds, known_boxes, avg)
        return self.dn_weight * torch.nan_to_num(loss_cls), self.dn_weight * torch.nan_to_num(loss_bbox)

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Upstream's loss dict: loss_cls / loss_bbox (last layer), d{i}.loss_* (earlier layers), and the same
        for DN as dn_loss_*; without DN queries the DN entries repeat the matching losses, detached."""
        all_cls = outputs["all_cls_scores"].float()
        all_boxes = outputs["all_bbox_preds"].float()
        device = all_cls.device
        gt_boxes = [b.to(device=device, dtype=all_boxes.dtype) for b in batch["gt_boxes"]]
        gt_labels = [lab.to(device=device, dtype=torch.long) for lab in batch["gt_labels"]]
        L = all_cls.shape[0]

        losses: dict[str, torch.Tensor] = {}
        per_layer = [self.loss_single(all_cls[i], all_boxes[i], gt_boxes, gt_labels) for i in range(L)]
        self._name_losses(losses, per_layer, "")

        dn = outputs.get("dn_mask_dict")
        if dn is not None:
            known_cls, known_boxes_out = dn["output_known_lbs_bboxes"]
            bid, idx = dn["known_bid"], dn["map_known_indice"]
            known_cls = known_cls[:, bid, idx].float()  # (L, n, C)
            known_boxes_out = known_boxes_out[:, bid, idx].float()
            dn_layer = [
                self.dn_loss_single(
                    known_cls[i], known_boxes_out[i], dn["known_bboxs"], dn["known_labels"], dn["num_tgt"]
                )
                for i in range(L)
            ]
            self._name_losses(losses, dn_layer, "dn_")
        elif self.with_dn:
            self._name_losses(losses, [(c.detach(), b.detach()) for c, b in per_layer], "dn_")
        return losses

    @staticmethod
    def _name_losses(
        losses: dict[str, torch.Tensor], per_layer: list[tuple[torch.Tensor, torch.Tensor]], tag: str
    ) -> None:
        *early, last = per_layer
        losses[f"{tag}loss_cls"], losses[f"{tag}loss_bbox"] = last
        for i, (c, b) in enumerate(early):
            losses[f"d{i}.{tag}loss_cls"] = c
            losses[f"d{i}.{tag}loss_bbox"] = b

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, outputs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """NMS-free decoding of the last layer: the top max_num (query, class) pairs by sigmoid score, boxes
        whose centre is inside post_center_range; boxes_3d (K, 9) with z at the box BOTTOM."""
        cls = outputs["all_cls_scores"][-1].float()
        boxes = outputs["all_bbox_preds"][-1].float()
        results = []
        for b in range(cls.shape[0]):
            flat = cls[b].sigmoid().reshape(-1)
            scores, index = flat.topk(min(self.max_num, flat.numel()))
            labels = index % self.num_classes
            decoded = denormalize_bbox(boxes[b][torch.div(index, self.num_classes, rounding_mode="floor")])
            keep = torch.ones_like(scores, dtype=torch.bool)
            if self.score_threshold:
                keep &= scores >= self.score_threshold
            if self.post_center_range is not None:
                r = decoded.new_tensor(self.post_center_range)
                keep &= (decoded[:, :3] >= r[:3]).all(dim=1) & (decoded[:, :3] <= r[3:]).all(dim=1)
            decoded = decoded[keep]
            decoded[:, 2] = decoded[:, 2] - decoded[:, 5] * 0.5
            results.append({"boxes_3d": decoded, "scores_3d": scores[keep], "labels_3d": labels[keep]})
        return results
