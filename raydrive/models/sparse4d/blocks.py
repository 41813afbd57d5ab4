"""Sparse4D v3 building blocks. Behaviour follows HorizonRobotics/Sparse4D
`projects/mmdet3d_plugin/models/{blocks.py, detection3d/detection3d_blocks.py}`; the parameter names
match the upstream state dict so that upstream checkpoints load with strict=True.

Anchor / box state layout (upstream `core/box3d.py`): X, Y, Z, W, L, H, SIN_YAW, COS_YAW, VX, VY, VZ,
where slot "W" holds the log extent along the heading (our `l`), "L" the log width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydrive.ops import deformable_aggregation

# mmdet's weight_reduce_loss divides a loss sum by (avg_factor + float32 eps), in every dtype
AVG_EPS = float(torch.finfo(torch.float32).eps)


def averaged(total: torch.Tensor, avg_factor: float) -> torch.Tensor:
    """A loss sum over mmdet's normaliser (`mmdet/models/losses/utils.py` weight_reduce_loss)."""
    return total / (avg_factor + AVG_EPS)


X, Y, Z, W, L, H, SIN_YAW, COS_YAW, VX, VY, VZ = range(11)
CNS, YNS = 0, 1


def xavier_init_except_refine(operation_order: list[str], layers: nn.ModuleList) -> None:
    """Sparse4D-style heads' first init step (upstream detection3d_head.py `init_weights`): xavier-uniform
    on every weight matrix of the non-refine layers; the blocks' own `init_weights` follow."""
    for op, layer in zip(operation_order, layers):
        if op != "refine":
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)


def linear_relu_ln(embed_dims: int, in_loops: int, out_loops: int, input_dims: int | None = None) -> list[nn.Module]:
    """out_loops x ([Linear, ReLU] x in_loops, LayerNorm): the upstream MLP pattern (indices matter)."""
    layers: list[nn.Module] = []
    dims = input_dims or embed_dims
    for _ in range(out_loops):
        for _ in range(in_loops):
            layers += [nn.Linear(dims, embed_dims), nn.ReLU(inplace=True)]
            dims = embed_dims
        layers.append(nn.LayerNorm(embed_dims))
    return layers


class Scale(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


class AnchorEncoder(nn.Module):
    """SparseBox3DEncoder in "cat" mode: pos, size, yaw and velocity embeddings concatenated."""

    def __init__(self, dims: tuple[int, int, int, int] = (128, 32, 32, 64), out_loops: int = 4):
        super().__init__()

        def mlp(i, o):
            return nn.Sequential(*linear_relu_ln(o, 1, out_loops, i))

        self.pos_fc, self.size_fc, self.yaw_fc, self.vel_fc = (
            mlp(3, dims[0]),
            mlp(3, dims[1]),
            mlp(2, dims[2]),
            mlp(3, dims[3]),
        )

    def forward(self, anchor: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.pos_fc(anchor[..., [X, Y, Z]]),
                self.size_fc(anchor[..., [W, L, H]]),
                self.yaw_fc(anchor[..., [SIN_YAW, COS_YAW]]),
                self.vel_fc(anchor[..., VX : VZ + 1]),
            ],
            dim=-1,
        )


class KeyPointsGenerator(nn.Module):
    """Fixed key points (fractions of the box size) plus learnable ones, rotated and moved onto the box."""

    def __init__(self, embed_dims: int = 256, num_learnable_pts: int = 0, fix_scale=None):
        super().__init__()
        fix_scale = fix_scale if fix_scale is not None else ((0.0, 0.0, 0.0),)
        self.fix_scale = nn.Parameter(torch.tensor(fix_scale, dtype=torch.float32), requires_grad=False)
        self.num_learnable_pts = num_learnable_pts
        self.num_pts = len(fix_scale) + num_learnable_pts
        if num_learnable_pts > 0:
            self.learnable_fc = nn.Linear(embed_dims, num_learnable_pts * 3)

    def forward(self, anchor: torch.Tensor, instance_feature: torch.Tensor | None = None) -> torch.Tensor:
        bs, n = anchor.shape[:2]
        size = anchor[..., None, [W, L, H]].exp()
        pts = self.fix_scale * size
        if self.num_learnable_pts > 0 and instance_feature is not None:
            learn = self.learnable_fc(instance_feature).reshape(bs, n, self.num_learnable_pts, 3).sigmoid() - 0.5
            pts = torch.cat([pts, learn * size], dim=-2)
        cos, sin = anchor[..., COS_YAW, None], anchor[..., SIN_YAW, None]
        x = pts[..., 0] * cos - pts[..., 1] * sin
        y = pts[..., 0] * sin + pts[..., 1] * cos
        return torch.stack([x, y, pts[..., 2]], dim=-1) + anchor[..., None, [X, Y, Z]]

    @staticmethod
    def anchor_projection(
        anchor: torch.Tensor, t_src2dst: torch.Tensor, time_interval: torch.Tensor, fix_yaw_swap: bool = False
    ) -> torch.Tensor:
        """Move cached anchors into the current frame: centre += v dt, then rigid transform.

        Upstream writes the rotated (cos, sin) into the (SIN, COS) slots (a "TODO: Fix bug" in
        detection3d_blocks.py). Sparse4D v3 checkpoints were trained with it and DrivingSDK keeps it,
        so raydrive keeps it by default; `fix_yaw_swap=True` gives SparseDrive's corrected order.
        """
        t = t_src2dst.to(anchor.dtype)[:, None]
        vel = anchor[..., VX:]
        center = anchor[..., [X, Y, Z]] + vel * time_interval.to(anchor.dtype)[:, None, None]
        center = (t[..., :3, :3] @ center[..., None]).squeeze(-1) + t[..., :3, 3]
        yaw = (t[..., :2, :2] @ anchor[..., [COS_YAW, SIN_YAW], None]).squeeze(-1)  # (cos', sin')
        if fix_yaw_swap:
            yaw = yaw.flip(-1)
        vel = (t[..., : vel.shape[-1], : vel.shape[-1]] @ vel[..., None]).squeeze(-1)
        return torch.cat([center, anchor[..., [W, L, H]], yaw, vel], dim=-1)


class DeformableFeatureAggregation(nn.Module):
    """Sample image features at key points of each anchor in every camera and level, weighted per group."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_groups: int = 8,
        num_levels: int = 4,
        num_cams: int = 6,
        attn_drop: float = 0.15,
        num_learnable_pts: int = 6,
        fix_scale=None,
        kps_generator: nn.Module | None = None,
    ):
        """`kps_generator`: another key-point layout (SparseDrive's map polylines), called as
        `kps_generator(anchor, instance_feature) -> (bs, N, P, 3)` with a `num_pts` attribute; by
        default the box one built from `num_learnable_pts` and `fix_scale`."""
        super().__init__()
        self.embed_dims, self.num_groups, self.num_levels, self.num_cams = embed_dims, num_groups, num_levels, num_cams
        self.attn_drop = attn_drop
        if kps_generator is None:
            kps_generator = KeyPointsGenerator(embed_dims, num_learnable_pts, fix_scale)
        self.kps_generator = kps_generator
        self.num_pts = self.kps_generator.num_pts
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.camera_encoder = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, 12))
        self.weights_fc = nn.Linear(embed_dims, num_groups * num_levels * self.num_pts)

    def init_weights(self):
        nn.init.zeros_(self.weights_fc.weight)
        nn.init.zeros_(self.weights_fc.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, instance_feature, anchor, anchor_embed, feature_maps, metas) -> torch.Tensor:
        bs, n = instance_feature.shape[:2]
        key_points = self.kps_generator(anchor, instance_feature)
        weights = self._weights(instance_feature, anchor_embed, metas["projection_mat"])
        points_2d = self.project_points(key_points, metas["projection_mat"], metas["image_wh"])
        features = deformable_aggregation(feature_maps, points_2d, weights)
        return torch.cat([self.output_proj(features), instance_feature], dim=-1)  # residual_mode "cat"

    def _weights(self, instance_feature, anchor_embed, projection_mat) -> torch.Tensor:
        bs, n = instance_feature.shape[:2]
        cam_embed = self.camera_encoder(projection_mat[:, :, :3].reshape(bs, self.num_cams, -1))
        feature = (instance_feature + anchor_embed)[:, :, None] + cam_embed[:, None]
        # softmax jointly over cameras x levels x points, per group
        w = self.weights_fc(feature).reshape(bs, n, -1, self.num_groups).softmax(dim=-2)
        w = w.reshape(bs, n, self.num_cams, self.num_levels, self.num_pts, self.num_groups)
        if self.training and self.attn_drop > 0:
            keep = torch.rand(bs, n, self.num_cams, 1, self.num_pts, 1, device=w.device) > self.attn_drop
            w = keep.to(w.dtype) * w / (1 - self.attn_drop)
        return w.permute(0, 1, 4, 2, 3, 5)  # (bs, N, P, cams, levels, groups)

    @staticmethod
    def project_points(key_points, projection_mat, image_wh) -> torch.Tensor:
        """(bs, N, P, 3) lidar points -> (bs, N, P, cams, 2) image coordinates normalised to [0, 1]."""
        pts = torch.cat([key_points, torch.ones_like(key_points[..., :1])], dim=-1)
        uvz = torch.einsum("bcij,bnpj->bnpci", projection_mat, pts)
        uv = uvz[..., :2] / uvz[..., 2:3].clamp(min=1e-5)
        return uv / image_wh[:, None, None]


class AsymmetricFFN(nn.Module):
    """Pre-LN FFN from 2C (DFA output + its input) to C, with a linear identity branch."""

    def __init__(
        self, in_channels: int = 512, embed_dims: int = 256, feedforward_channels: int = 1024, drop: float = 0.1
    ):
        super().__init__()
        self.pre_norm = nn.LayerNorm(in_channels)
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(in_channels, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(drop),
        )
        self.identity_fc = nn.Linear(in_channels, embed_dims)

    def forward(self, x):
        x = self.pre_norm(x)
        return self.identity_fc(x) + self.layers(x)


class GraphAttention(nn.Module):
    """mmcv MultiheadAttention semantics: out = query + dropout(MHA(query + pos, key + pos, value)).

    Sparse4D concatenates the position to the features before calling (decoupled attention) and
    passes no `query_pos`; SparseDrive's map head adds it here. As in mmcv, `value` defaults to the
    key without its position, and a missing `key_pos` is `query_pos` when the shapes agree.
    """

    def __init__(self, embed_dims: int = 512, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, key=None, value=None, attn_mask=None, query_pos=None, key_pos=None):
        key = query if key is None else key
        value = key if value is None else value
        identity = query
        if query_pos is not None:
            if key_pos is None and query_pos.shape == key.shape:
                key_pos = query_pos
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        out = self.attn(query, key, value, attn_mask=attn_mask, need_weights=False)[0]
        return identity + self.dropout(out)


class RefinementModule(nn.Module):
    """Box refinement (added to the anchor), classification on the feature, quality on feature + embed."""

    def __init__(self, embed_dims: int = 256, num_cls: int = 10, output_dim: int = 11):
        super().__init__()
        self.layers = nn.Sequential(
            *linear_relu_ln(embed_dims, 2, 2), nn.Linear(embed_dims, output_dim), Scale(output_dim)
        )
        self.cls_layers = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2), nn.Linear(embed_dims, num_cls))
        self.quality_layers = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2), nn.Linear(embed_dims, 2))

    def init_weights(self):
        nn.init.constant_(self.cls_layers[-1].bias, -float(torch.log(torch.tensor((1 - 0.01) / 0.01))))

    def forward(self, instance_feature, anchor, anchor_embed, time_interval, return_cls=True):
        feature = instance_feature + anchor_embed
        out = self.layers(feature)
        refined = out[..., : COS_YAW + 1] + anchor[..., : COS_YAW + 1]  # X..H and SIN, COS (refine_yaw)
        vel = out[..., VX:] / time_interval[:, None, None] + anchor[..., VX:]
        box = torch.cat([refined, vel], dim=-1)
        if not return_cls:
            return box, None, None
        return box, self.cls_layers(instance_feature), self.quality_layers(feature)


class DenseDepthNet(nn.Module):
    """Auxiliary dense depth: a 1x1 conv per level, exp, scaled by focal / 100; L1 to lidar depth."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_depth_layers: int = 3,
        equal_focal: float = 100.0,
        max_depth: float = 60.0,
        loss_weight: float = 0.2,
    ):
        super().__init__()
        self.equal_focal, self.max_depth, self.loss_weight = equal_focal, max_depth, loss_weight
        self.depth_layers = nn.ModuleList(nn.Conv2d(embed_dims, 1, 1) for _ in range(num_depth_layers))

    def forward(self, feature_maps, focal):
        depths = []
        for conv, feat in zip(self.depth_layers, feature_maps):
            d = conv(feat.flatten(0, 1).float()).exp()
            depths.append(d * (focal.reshape(-1, 1, 1, 1) / self.equal_focal))
        return depths

    def loss(self, depth_preds, gt_depths) -> torch.Tensor:
        loss = depth_preds[0].new_zeros(())
        for pred, gt in zip(depth_preds, gt_depths):
            pred, gt = pred.reshape(-1), gt.reshape(-1)
            fg = (gt > 0) & ~torch.isnan(pred)
            err = (pred[fg].clamp(0, self.max_depth) - gt[fg]).abs().sum()
            loss = loss + err / max(1.0, float(fg.sum()) * len(depth_preds)) * self.loss_weight
        return loss


class GridMask(nn.Module):
    """Sparse4D's GridMask (mode 1, inverted; no rotation; one mask per batch), applied with prob p."""

    def __init__(self, ratio: float = 0.5, prob: float = 0.7):
        super().__init__()
        self.ratio, self.prob = ratio, prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or torch.rand(()) > self.prob:
            return x
        n, c, h, w = x.shape
        hh, ww = int(1.5 * h), int(1.5 * w)
        d = int(torch.randint(2, h, ()))
        length = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        mask = torch.ones(hh, ww, device=x.device, dtype=x.dtype)
        st_h, st_w = int(torch.randint(d, ())), int(torch.randint(d, ()))
        for i in range(hh // d):
            s = d * i + st_h
            mask[s : min(s + length, hh)] = 0
        for i in range(ww // d):
            s = d * i + st_w
            mask[:, s : min(s + length, ww)] = 0
        mask = 1 - mask[(hh - h) // 2 : (hh - h) // 2 + h, (ww - w) // 2 : (ww - w) // 2 + w]
        return x * mask


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    avg_factor: float | None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: float = 1.0,
) -> torch.Tensor:
    """Sigmoid focal loss; a label outside [0, num_cls) (background, -3 DN negatives) is all-negative.
    The sum over mmdet's `avg_factor` normaliser, or (None) the plain sum, which a caller taking mmdet's
    "mean" reduction divides itself."""
    num_cls = logits.shape[-1]
    valid = (labels >= 0) & (labels < num_cls)
    target = torch.zeros_like(logits)
    target[valid, labels[valid]] = 1.0
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    w = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w
    total = loss.sum() if avg_factor is None else averaged(loss.sum(), avg_factor)
    return total * weight


def gaussian_focal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    avg_factor: float,
    alpha: float = 2.0,
    gamma: float = 4.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    pos = -(pred + eps).log() * (1 - pred).pow(alpha) * target.eq(1)
    neg = -(1 - pred + eps).log() * pred.pow(alpha) * (1 - target).pow(gamma)
    return averaged((pos + neg).sum(), avg_factor)
