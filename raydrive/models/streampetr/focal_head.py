"""StreamPETR's 2D auxiliary branch (upstream `FocalHead`) with its 2D Hungarian matching and losses.

Behaviour from exiawsh/StreamPETR `projects/mmdet3d_plugin/models/dense_heads/focal_head.py`, with the
settings of `projects/configs/StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py` (`img_roi_head`):
QualityFocalLoss (beta 2, weight 2), L1 on normalised cx, cy, w, h (5), GIoU in pixels (2), L1 on
normalised 2D centres (10), GaussianFocalLoss on a stride-16 centerness heatmap (1); matching costs
FocalLossCost 2, BBoxL1Cost 5 (cxcywh), GIoU cost 2, centre L1 cost 10
(`core/bbox/assigners/hungarian_assigner_2d.py`, `core/bbox/match_costs/match_cost.py`).

Every (frame, camera) pair is one image: outputs are shaped (B*N, h*w, ...) with image index
`b * N + n` and token index `y * w + x`. Predicted boxes and centres are normalised by the padded
image size `pad_hw`; ground truth comes in pixels and is normalised here.
"""

from __future__ import annotations

import math
import random

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from raydrive.models.heatmap import draw_gaussian
from raydrive.models.sparse4d.blocks import gaussian_focal_loss
from raydrive.models.sparse4d.head import reduce_mean

# mmcv `bias_init_with_prob(0.01)`: the classification logits start at a 1% foreground prior.
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
# mmdet's weighted-loss reduction divides by (avg_factor + this).
AVG_EPS = float(torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------- box helpers


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_overlaps(a: torch.Tensor, b: torch.Tensor, giou: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """IoU (or GIoU) of xyxy boxes that broadcast against each other, as mmdet's `bbox_overlaps`.

    Pass `a[:, None]` and `b[None]` for the pairwise matrix, equal shapes for aligned pairs.
    """
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area_a + area_b - overlap).clamp(min=eps)
    iou = overlap / union
    if not giou:
        return iou
    enclose_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose - union) / enclose


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """mmdet's clamped logit."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def feature_locations(h: int, w: int, stride: int, pad_hw: tuple[int, int], device=None) -> torch.Tensor:
    """(h, w, 2) token centres (x, y) normalised by the padded image size (upstream `misc.locations`)."""
    pad_h, pad_w = pad_hw
    xs = (torch.arange(w, dtype=torch.float32, device=device) * stride + stride // 2) / pad_w
    ys = (torch.arange(h, dtype=torch.float32, device=device) * stride + stride // 2) / pad_h
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def pad_hw_of(batch: dict) -> tuple[int, int]:
    """The padded image size shared by every image of the batch (upstream reads `pad_shape[0]`)."""
    row = torch.as_tensor(batch["pad_hw"]).reshape(-1, 2)[0]
    return int(row[0]), int(row[1])


# ----------------------------------------------------------------------------- losses


def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, beta: float = 2.0):
    """Per-sample QFL (mmdet `quality_focal_loss`), summed over classes: (M, C) logits -> (M,).

    Every class is a negative with target 0, scaled by sigmoid^beta; a positive sample (label in
    [0, C)) instead has target `scores` (its IoU) at its class, scaled by |score - sigmoid|^beta.
    """
    prob = logits.sigmoid()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = loss * prob.pow(beta)
    pos = ((labels >= 0) & (labels < logits.shape[-1])).nonzero().squeeze(1)
    if pos.numel():
        cls = labels[pos].long()
        pos_logits = logits[pos, cls]
        pos_score = scores[pos].to(logits.dtype)
        scale = (pos_score - prob[pos, cls]).abs().pow(beta)
        loss_pos = nn.functional.binary_cross_entropy_with_logits(pos_logits, pos_score, reduction="none") * scale
        loss = loss.index_put((pos, cls), loss_pos)
    return loss.sum(dim=1)


def clip_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """mmdet3d `clip_sigmoid`, out of place."""
    return x.sigmoid().clamp(min=eps, max=1 - eps)


# ----------------------------------------------------------------------------- centerness heatmap


def centerness_heatmap(
    centers: torch.Tensor, bboxes: torch.Tensor, hw: tuple[int, int], stride: int = 16
) -> torch.Tensor:
    """(h, w) heatmap of one image: a Gaussian at every 2D centre (pixels), radius from the box.

    Upstream `FocalHead._get_heatmap_single`: radius = ceil(min(l, t, r, b) / 16), at least 1, where
    l, t, r, b are the centre's distances to the box sides; the cell is the centre / 16 truncated.
    Upstream writes 16 literally; `stride` (16 in every config) stands in for it here.
    """
    heatmap = torch.zeros(hw, dtype=torch.float32)
    if len(centers) == 0:
        return heatmap
    centers = centers.detach().float().cpu()
    bboxes = bboxes.detach().float().cpu()
    dist = torch.cat([centers - bboxes[:, :2], bboxes[:, 2:] - centers], dim=-1)
    radii = torch.ceil(dist.min(dim=-1).values / stride).clamp(min=1.0)
    for (x, y), r in zip((centers / stride).tolist(), radii.tolist()):
        draw_gaussian(heatmap, int(x), int(y), int(r))
    return heatmap


# ----------------------------------------------------------------------------- matching


class HungarianAssigner2D:
    """One-to-one matching of one image's tokens to its 2D boxes (upstream `HungarianAssigner2D`).

    Cost = FocalLossCost on the gt class + L1 between normalised cxcywh boxes - GIoU in pixels
    + L1 between normalised centres, each with its weight; solved with scipy on CPU.
    """

    def __init__(
        self,
        cls_weight: float = 2.0,
        reg_weight: float = 5.0,
        iou_weight: float = 2.0,
        centers_weight: float = 10.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        self.cls_weight = cls_weight
        self.reg_weight = reg_weight
        self.iou_weight = iou_weight
        self.centers_weight = centers_weight
        self.alpha = alpha
        self.gamma = gamma

    def focal_cost(self, cls_logits: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
        """mmdet `FocalLossCost`: (T, C) logits, (M,) labels -> (T, M)."""
        p = cls_logits.sigmoid()
        eps = 1e-12
        neg = -(1 - p + eps).log() * (1 - self.alpha) * p.pow(self.gamma)
        pos = -(p + eps).log() * self.alpha * (1 - p).pow(self.gamma)
        return (pos - neg)[:, gt_labels] * self.cls_weight

    def cost(
        self,
        cls_logits: torch.Tensor,
        bbox_pred: torch.Tensor,
        centers_pred: torch.Tensor,
        gt_bboxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_centers: torch.Tensor,
        pad_hw: tuple[int, int],
    ) -> torch.Tensor:
        """(T, M) matching cost; boxes pred normalised cxcywh, gt xyxy pixels; centres normalised / pixels."""
        img_h, img_w = pad_hw
        factor = bbox_pred.new_tensor([img_w, img_h, img_w, img_h])
        cls_cost = self.focal_cost(cls_logits, gt_labels)
        reg_cost = torch.cdist(bbox_pred, xyxy_to_cxcywh(gt_bboxes / factor), p=1) * self.reg_weight
        pred_px = cxcywh_to_xyxy(bbox_pred) * factor
        iou_cost = -box_overlaps(pred_px[:, None], gt_bboxes[None], giou=True) * self.iou_weight
        centers_cost = torch.cdist(centers_pred, gt_centers / factor[:2], p=1) * self.centers_weight
        cost = cls_cost + reg_cost + iou_cost + centers_cost
        return torch.nan_to_num(cost, nan=100.0, posinf=100.0, neginf=-100.0)

    @torch.no_grad()
    def assign(self, cls_logits, bbox_pred, centers_pred, gt_bboxes, gt_labels, gt_centers, pad_hw):
        """-> (token indices, gt indices), both (min(T, M),) int64 on the predictions' device."""
        device = bbox_pred.device
        if len(gt_bboxes) == 0 or len(bbox_pred) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty
        cost = self.cost(cls_logits, bbox_pred, centers_pred, gt_bboxes, gt_labels, gt_centers, pad_hw)
        rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
        return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
            cols, dtype=torch.long, device=device
        )


# ----------------------------------------------------------------------------- head


class FocalHead(nn.Module):
    """Dense 2D detection on the stride-16 features of every camera, the auxiliary 2D task of StreamPETR.

    Per token it predicts class logits and a centerness logit (from `shared_cls`), and from
    `shared_reg` a box as sigmoid distances to its four sides (normalised units) and a 2D centre
    offset in logit space. It also ranks the tokens of each frame by max class prob x centerness
    and returns the top `ratio` share as `topk_indexes` (None when the ratio keeps every token,
    as in both StreamPETR configs: the 3D head then uses all tokens, order does not matter to it).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 256,
        embed_dims: int = 256,
        stride: int = 16,
        use_hybrid_tokens: bool = False,
        train_ratio: float = 1.0,
        infer_ratio: float = 1.0,
        sync_cls_avg_factor: bool = False,
        norm_groups: int = 32,
        qfl_beta: float = 2.0,
        loss_cls_weight: float = 2.0,
        loss_bbox_weight: float = 5.0,
        loss_iou_weight: float = 2.0,
        loss_centers_weight: float = 10.0,
        loss_centerness_weight: float = 1.0,
        assigner: HungarianAssigner2D | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        self.stride = stride
        self.use_hybrid_tokens = use_hybrid_tokens
        self.train_ratio = train_ratio
        self.infer_ratio = infer_ratio
        self.sync_cls_avg_factor = sync_cls_avg_factor
        self.qfl_beta = qfl_beta
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.loss_iou_weight = loss_iou_weight
        self.loss_centers_weight = loss_centers_weight
        self.loss_centerness_weight = loss_centerness_weight
        self.assigner = assigner or HungarianAssigner2D()

        def branch() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_channels, embed_dims, kernel_size=3, padding=1),
                nn.GroupNorm(norm_groups, embed_dims),
                nn.ReLU(),
            )

        self.cls = nn.Conv2d(embed_dims, num_classes, kernel_size=1)
        self.shared_reg = branch()
        self.shared_cls = branch()
        self.centerness = nn.Conv2d(embed_dims, 1, kernel_size=1)
        self.ltrb = nn.Conv2d(embed_dims, 4, kernel_size=1)
        self.center2d = nn.Conv2d(embed_dims, 2, kernel_size=1)
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch default conv init (upstream passes init_cfg=None); class and centerness at a 1% prior."""
        nn.init.constant_(self.cls.bias, PRIOR_BIAS)
        nn.init.constant_(self.centerness.bias, PRIOR_BIAS)

    def _num_sample_tokens(self, num_tokens: int) -> int:
        if self.training:
            ratio = random.uniform(0.2, 1.0) if self.use_hybrid_tokens else self.train_ratio
        else:
            ratio = self.infer_ratio
        return int(num_tokens * ratio)

    def forward(self, feats: torch.Tensor, batch: dict) -> dict[str, torch.Tensor | None]:
        """feats (B, N, C, h, w) -> dict with, for I = B*N images and T = h*w tokens:
        `enc_cls_scores` (I, T, num_classes) logits, `enc_bbox_preds` (I, T, 4) normalised cxcywh,
        `pred_centers2d` (I, T, 2) normalised xy, `centerness` (I, T, 1) logits,
        `topk_indexes` (B, K, 1) int64 into the frame's N*T tokens, or None when K = N*T.
        """
        bs, n, _, h, w = feats.shape
        x = feats.flatten(0, 1)
        location = feature_locations(h, w, self.stride, pad_hw_of(batch), device=feats.device)

        cls_feat = self.shared_cls(x)
        cls_logits = self.cls(cls_feat).permute(0, 2, 3, 1).reshape(bs * n, h * w, self.num_classes)
        centerness = self.centerness(cls_feat).permute(0, 2, 3, 1).reshape(bs * n, h * w, 1)

        reg_feat = self.shared_reg(x)
        ltrb = self.ltrb(reg_feat).permute(0, 2, 3, 1).sigmoid()
        offset = self.center2d(reg_feat).permute(0, 2, 3, 1)
        centers = (inverse_sigmoid(location) + offset).sigmoid()
        corners = torch.cat([location - ltrb[..., :2], location + ltrb[..., 2:]], dim=-1).clamp(0, 1)
        boxes = xyxy_to_cxcywh(corners)

        num_tokens = n * h * w
        num_sample = self._num_sample_tokens(num_tokens)
        topk_indexes = None
        if num_sample < num_tokens:
            score = cls_logits.detach().max(dim=-1).values.reshape(bs, num_tokens, 1).sigmoid()
            weight = score * centerness.detach().reshape(bs, num_tokens, 1).sigmoid()
            topk_indexes = weight.topk(num_sample, dim=1).indices

        return {
            "enc_cls_scores": cls_logits,
            "enc_bbox_preds": boxes.reshape(bs * n, h * w, 4),
            "pred_centers2d": centers.reshape(bs * n, h * w, 2),
            "centerness": centerness,
            "topk_indexes": topk_indexes,
        }

    # ------------------------------------------------------------------------- targets

    @staticmethod
    def image_targets(batch: dict, num_cams: int) -> list[dict[str, torch.Tensor]]:
        """Split each frame's flattened 2D targets into one dict per (frame, camera), image b*N + n.

        `gt_depths2d` is carried along but unused by the loss, as upstream.
        """
        out = []
        for b, cams in enumerate(batch["gt_cams2d"]):
            for cam in range(num_cams):
                keep = cams == cam
                out.append(
                    {
                        "bboxes": batch["gt_bboxes2d"][b][keep],
                        "labels": batch["gt_labels2d"][b][keep],
                        "centers": batch["gt_centers2d"][b][keep],
                        "depths": batch["gt_depths2d"][b][keep],
                    }
                )
        return out

    def loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """2D losses of upstream `FocalHead.loss_single` with its avg factors:
        QFL over max(num_pos, 1) (this rank's count unless `sync_cls_avg_factor`), GIoU over this
        rank's num_pos (zero when it has none), L1 boxes / centres and centerness over the mean
        num_pos across ranks, at least 1.
        """
        cls_scores = outputs["enc_cls_scores"].float()
        bbox_preds = outputs["enc_bbox_preds"].float()
        centers_preds = outputs["pred_centers2d"].float()
        centerness = outputs["centerness"].float()
        num_imgs, num_tokens, num_classes = cls_scores.shape
        device = cls_scores.device
        num_cams = num_imgs // len(batch["gt_cams2d"])
        pad_h, pad_w = pad_hw_of(batch)
        factor = cls_scores.new_tensor([pad_w, pad_h, pad_w, pad_h])

        labels = torch.full((num_imgs, num_tokens), num_classes, dtype=torch.long, device=device)
        bbox_targets = torch.zeros_like(bbox_preds)
        centers_targets = torch.zeros_like(centers_preds)
        pos = torch.zeros((num_imgs, num_tokens), dtype=torch.bool, device=device)
        heatmaps = []
        feat_hw = (pad_h // self.stride, pad_w // self.stride)
        for i, gt in enumerate(self.image_targets(batch, num_cams)):
            gt_bboxes = gt["bboxes"].to(device=device, dtype=bbox_preds.dtype)
            gt_labels = gt["labels"].to(device=device, dtype=torch.long)
            gt_centers = gt["centers"].to(device=device, dtype=bbox_preds.dtype)
            tok, idx = self.assigner.assign(
                cls_scores[i], bbox_preds[i], centers_preds[i], gt_bboxes, gt_labels, gt_centers, (pad_h, pad_w)
            )
            labels[i, tok] = gt_labels[idx]
            bbox_targets[i, tok] = xyxy_to_cxcywh(gt_bboxes[idx] / factor)
            centers_targets[i, tok] = gt_centers[idx] / factor[:2]
            pos[i, tok] = True
            heatmaps.append(centerness_heatmap(gt["centers"], gt["bboxes"], feat_hw, self.stride))

        labels = labels.flatten()
        bbox_preds = bbox_preds.reshape(-1, 4)
        bbox_targets = bbox_targets.reshape(-1, 4)
        pos = pos.flatten()
        weights = pos.to(bbox_preds.dtype)
        num_pos = int(pos.sum())

        # GIoU in pixels over the matched tokens (upstream weights the others by 0); mmdet's GIoULoss
        # returns a graph-connected zero when no weight is positive.
        pred_px = cxcywh_to_xyxy(bbox_preds[pos]) * factor
        target_px = cxcywh_to_xyxy(bbox_targets[pos]) * factor
        if num_pos == 0:
            loss_iou = bbox_preds.sum() * 0
        else:
            giou = box_overlaps(pred_px, target_px, giou=True)
            loss_iou = self.loss_iou_weight * (1 - giou).sum() / (num_pos + AVG_EPS)

        # QFL with the matched box's IoU as the soft target of its class (only read at positives).
        iou_score = torch.zeros_like(weights)
        iou_score[pos] = box_overlaps(target_px, pred_px).detach()
        cls_avg_factor = float(num_pos)
        if self.sync_cls_avg_factor:
            cls_avg_factor = reduce_mean(cls_scores.new_tensor([cls_avg_factor])).item()
        cls_avg_factor = max(cls_avg_factor, 1.0)
        qfl = quality_focal_loss(cls_scores.reshape(-1, num_classes), labels, iou_score, self.qfl_beta)
        loss_cls = self.loss_cls_weight * qfl.sum() / (cls_avg_factor + AVG_EPS)

        avg_pos = reduce_mean(cls_scores.new_tensor([float(num_pos)])).clamp(min=1).item()

        heatmap = torch.stack(heatmaps).to(device).view(num_imgs, -1, 1)
        if heatmap.shape != centerness.shape:
            raise ValueError(
                f"centerness has {centerness.shape[1]} tokens per image but pad_hw {pad_h}x{pad_w} / stride "
                f"{self.stride} gives {heatmap.shape[1]}"
            )
        loss_centerness = self.loss_centerness_weight * gaussian_focal_loss(
            clip_sigmoid(centerness), heatmap, avg_factor=avg_pos + AVG_EPS
        )

        loss_bbox = self.loss_bbox_weight * ((bbox_preds - bbox_targets).abs() * weights[:, None]).sum()
        loss_bbox = loss_bbox / (avg_pos + AVG_EPS)
        centers_l1 = (centers_preds.reshape(-1, 2) - centers_targets.reshape(-1, 2)).abs() * weights[:, None]
        loss_centers = self.loss_centers_weight * centers_l1.sum() / (avg_pos + AVG_EPS)

        return {
            "loss_cls2d": loss_cls,
            "loss_bbox2d": loss_bbox,
            "loss_iou2d": loss_iou,
            "loss_centers2d": loss_centers,
            "loss_centerness": loss_centerness,
        }
