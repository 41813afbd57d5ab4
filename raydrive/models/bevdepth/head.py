"""BEV trunk + CenterHead: heat maps per task group, box regression at the peaks, Gaussian targets,
losses and decoding (upstream `bevdepth/layers/heads/bev_depth_head.py` on mmdet3d 1.0's
`CenterHead`, `SeparateHead`, `CenterPointBBoxCoder`, `draw_heatmap_gaussian`, `gaussian_radius`,
`circle_nms`; mmdet's `GaussianFocalLoss` and `L1Loss`).

Everything here runs in fp32 with autocast disabled (upstream's `autocast(False)` on the head).
Module names follow upstream's `head.*` keys.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raydrive.models.bevdepth.config import COMMON_HEADS, TASKS, BEVDepthConfig
from raydrive.models.heatmap import draw_gaussian
from raydrive.models.resnet import ResNet
from raydrive.models.secondfpn import SECONDFPN

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # mmdet's weight_reduce_loss adds it to avg_factor


class ConvBNReLU(nn.Module):
    """mmcv ConvModule (conv without bias, BN, ReLU): names `conv` and `bn`."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class SeparateHead(nn.Module):
    """One branch per output: ConvModule then a final 3x3 conv; the heat map's bias starts at -2.19."""

    def __init__(self, cin: int, head_conv: int, num_classes: int, init_bias: float = -2.19):
        super().__init__()
        self.names = [name for name, _ in COMMON_HEADS] + ["heatmap"]
        for name, channels in [*COMMON_HEADS, ("heatmap", num_classes)]:
            final = nn.Conv2d(head_conv, channels, 3, padding=1)
            if name == "heatmap":
                nn.init.constant_(final.bias, init_bias)
            else:
                nn.init.kaiming_normal_(final.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(final.bias)
            setattr(self, name, nn.Sequential(ConvBNReLU(cin, head_conv), final))

    def forward(self, x) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name in self.names}


class BEVDepthHead(nn.Module):
    def __init__(self, cfg: BEVDepthConfig):
        super().__init__()
        self.cfg = cfg
        bev_in = cfg.context_channels * cfg.num_key_frames
        neck_out = cfg.bev_neck_channels * (len(cfg.bev_blocks) + 1)
        # upstream's CenterHead builds these first: the state dict lists them before trunk and neck
        self.shared_conv = ConvBNReLU(neck_out, cfg.head_conv)
        self.task_heads = nn.ModuleList(SeparateHead(cfg.head_conv, cfg.head_conv, len(t)) for t in TASKS)
        self.trunk = ResNet(
            18,
            cfg.bev_base_channels,
            cfg.bev_blocks,
            tuple(range(len(cfg.bev_blocks))),
            in_channels=bev_in,
            strides=(1,) + (2,) * (len(cfg.bev_blocks) - 1),
            stem_pool=False,
        )
        levels = [bev_in] + self.trunk.out_channels
        self.neck = SECONDFPN(levels, [cfg.bev_neck_channels] * len(levels), [2**i for i in range(len(levels))])
        # upstream's target range and cell size are fp32 tensors; mirrored, since they decide the peak cell
        self.target_voxel = torch.tensor(cfg.voxel_size, dtype=torch.float32)
        self.target_origin = torch.tensor((cfg.x_bound[0], cfg.y_bound[0]), dtype=torch.float32)

    def forward(self, bev: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """BEV (B, C, Y, X) -> per task {reg, height, dim, rot, vel, heatmap} maps, in fp32."""
        x = bev.float()
        outs = [x]
        x = self.trunk.relu(self.trunk.bn1(self.trunk.conv1(x)))
        for i in range(len(self.cfg.bev_blocks)):
            x = getattr(self.trunk, f"layer{i + 1}")(x)
            outs.append(x)
        x = self.shared_conv(self.neck(outs))
        return [task(x) for task in self.task_heads]

    # ---- targets -------------------------------------------------------------------------------

    def targets(self, boxes: list[torch.Tensor], labels: list[torch.Tensor], grid_hw: tuple[int, int]):
        """Per task: heat maps (B, classes, H, W), box targets (B, max_objs, 10), flat indices and masks."""
        per_sample = [self._targets_single(b, lab, grid_hw) for b, lab in zip(boxes, labels)]
        return [tuple(torch.stack([s[t][i] for s in per_sample]) for i in range(4)) for t in range(len(TASKS))]

    def _targets_single(self, boxes: torch.Tensor, labels: torch.Tensor, grid_hw):
        cfg = self.cfg
        h, w = grid_hw
        out, offset = [], 0
        for names in TASKS:
            heat = boxes.new_zeros((len(names), h, w))
            anno = boxes.new_zeros((cfg.max_objs, 10), dtype=torch.float32)
            ind = torch.zeros(cfg.max_objs, dtype=torch.int64, device=boxes.device)
            mask = torch.zeros(cfg.max_objs, dtype=torch.uint8, device=boxes.device)
            # upstream gathers the task's boxes class by class (all of class 0, then class 1)
            order = torch.cat([torch.nonzero(labels == offset + c).flatten() for c in range(len(names))])
            tboxes, tcls = boxes[order], labels[order] - offset
            for k in range(min(len(order), cfg.max_objs)):
                self._draw_one(tboxes[k], int(tcls[k]), k, heat, anno, ind, mask, (h, w))
            out.append((heat, anno, ind, mask))
            offset += len(names)
        return out

    def _draw_one(self, box, cls, k, heat, anno, ind, mask, grid_hw):
        """Upstream `get_targets_single` for one box; the centre is built in fp32 as upstream does."""
        cfg = self.cfg
        h, w = grid_hw
        vs, pc, f = self.target_voxel, self.target_origin, cfg.out_size_factor
        width = box[3].cpu() / vs[0] / f
        length = box[4].cpu() / vs[1] / f
        if not (width > 0 and length > 0):
            return
        radius = max(cfg.min_radius, int(gaussian_radius(length, width, cfg.gaussian_overlap)))
        cx = (box[0].cpu() - pc[0]) / vs[0] / f
        cy = (box[1].cpu() - pc[1]) / vs[1] / f
        center = torch.tensor([float(cx), float(cy)], dtype=torch.float32, device=box.device)
        ci = center.to(torch.int32)
        x, y = int(ci[0]), int(ci[1])
        if not (0 <= x < w and 0 <= y < h):
            return
        draw_gaussian(heat[cls], x, y, radius)
        ind[k] = y * w + x
        mask[k] = 1
        anno[k] = torch.cat(
            [
                center - torch.tensor([x, y], dtype=torch.float32, device=box.device),
                box[2:3],
                box[3:6].log(),
                torch.sin(box[6:7]),
                torch.cos(box[6:7]),
                box[7:9],
            ]
        ).to(anno.dtype)

    # ---- losses --------------------------------------------------------------------------------

    def loss(self, preds: list[dict], targets) -> dict[str, torch.Tensor]:
        """Per task: Gaussian focal loss on the clipped sigmoid heat map, averaged by the mean over
        ranks of the number of peaks (at least 1); L1 x 0.25 on the 10 regression values at the peaks,
        averaged by the mean over ranks of the number of objects."""
        cfg = self.cfg
        losses = {}
        for t, (pred, (heat, anno, ind, mask)) in enumerate(zip(preds, targets)):
            hm = torch.clamp(pred["heatmap"].sigmoid(), min=1e-4, max=1 - 1e-4)
            num_pos = reduce_mean(heat.new_tensor(float(heat.eq(1).float().sum().item())))
            cls_avg = max(float(num_pos.item()), 1.0)
            losses[f"loss_heatmap_{t}"] = gaussian_focal_loss(hm, heat).sum() / (cls_avg + FLOAT32_EPS)
            box_pred = torch.cat([pred[n] for n, _ in COMMON_HEADS], dim=1)
            box_pred = box_pred.permute(0, 2, 3, 1).reshape(box_pred.shape[0], -1, box_pred.shape[1])
            box_pred = box_pred.gather(1, ind.unsqueeze(2).expand(-1, -1, box_pred.shape[2]))
            num = reduce_mean(anno.new_tensor(float(mask.float().sum().item())))
            num = max(float(num.item()), 1e-4)
            weights = mask.unsqueeze(2).expand_as(anno).float() * (~torch.isnan(anno)).float()
            weights = weights * weights.new_tensor(cfg.code_weights)
            l1 = (box_pred - anno).abs() * weights
            losses[f"loss_bbox_{t}"] = cfg.loss_bbox_weight * (l1.sum() / (num + FLOAT32_EPS))
        return losses

    # ---- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, preds: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Per sample: `boxes` (N, 9) x, y, z (centre), l, w, h, yaw, vx, vy in the (BEV-augmented) ego
        frame, `scores`, `labels` (CLASSES indices): top-k per task, score and range filter, circle NMS."""
        per_task, offset = [], 0
        for t, pred in enumerate(preds):
            dets = self._decode_task(pred)
            kept = []
            for d in dets:
                centers = torch.cat([d["boxes"][:, :2], d["scores"].view(-1, 1)], 1).detach().cpu().numpy()
                keep = circle_nms(centers, self.cfg.nms_radius[t], self.cfg.post_max_size)
                keep = torch.as_tensor(keep, dtype=torch.long, device=d["boxes"].device)
                kept.append({k: v[keep] for k, v in d.items()})
                kept[-1]["labels"] = kept[-1]["labels"] + offset
            per_task.append(kept)
            offset += len(TASKS[t])
        out = []
        for i in range(len(per_task[0])):
            out.append({k: torch.cat([task[i][k] for task in per_task]) for k in ("boxes", "scores", "labels")})
        return out

    def _decode_task(self, pred: dict) -> list[dict[str, torch.Tensor]]:
        """`CenterPointBBoxCoder.decode`: top-k over classes and cells, centre = (cell + offset) x cell
        size + range start, exp(dim), atan2(sin, cos)."""
        cfg = self.cfg
        heat = pred["heatmap"].sigmoid()
        b, c, h, w = heat.shape
        k = cfg.max_num
        scores, inds = torch.topk(heat.view(b, c, -1), k)
        inds = inds % (h * w)
        ys = (inds.float() / torch.tensor(w, dtype=torch.float)).int().float()
        xs = (inds % w).int().float()
        score, top = torch.topk(scores.view(b, -1), k)
        clses = (top / torch.tensor(k, dtype=torch.float)).int()
        inds = inds.view(b, -1).gather(1, top)
        ys = ys.view(b, -1).gather(1, top)
        xs = xs.view(b, -1).gather(1, top)

        def gather(name):
            m = pred[name]
            return m.permute(0, 2, 3, 1).reshape(b, h * w, -1).gather(1, inds.unsqueeze(2).expand(-1, -1, m.shape[1]))

        reg = gather("reg")
        xs = xs.view(b, k, 1) + reg[:, :, 0:1]
        ys = ys.view(b, k, 1) + reg[:, :, 1:2]
        rot = torch.atan2(gather("rot")[:, :, 0:1], gather("rot")[:, :, 1:2])
        xs = xs * cfg.out_size_factor * cfg.voxel_size[0] + cfg.x_bound[0]
        ys = ys * cfg.out_size_factor * cfg.voxel_size[1] + cfg.y_bound[0]
        boxes = torch.cat([xs, ys, gather("height"), torch.exp(gather("dim")), rot, gather("vel")], dim=2)
        rng = torch.tensor(cfg.post_center_range, dtype=torch.float32, device=boxes.device)  # fp32 as upstream
        lo, hi = rng[:3], rng[3:]
        keep = (boxes[..., :3] >= lo).all(2) & (boxes[..., :3] <= hi).all(2) & (score > cfg.score_threshold)
        return [
            {"boxes": boxes[i, keep[i]], "scores": score[i, keep[i]], "labels": clses[i, keep[i]]} for i in range(b)
        ]


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (mmdet's `reduce_mean`); the value itself outside a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x.div_(dist.get_world_size()))
    return x


def gaussian_focal_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, gamma: float = 4.0):
    """CornerNet's focal loss on a Gaussian heat map (mmdet `gaussian_focal_loss`), element-wise."""
    eps = 1e-12
    pos = -(pred + eps).log() * (1 - pred).pow(alpha) * target.eq(1)
    neg = -(1 - pred + eps).log() * pred.pow(alpha) * (1 - target).pow(gamma)
    return pos + neg


def gaussian_radius(height, width, min_overlap: float):
    """CornerNet's radius: the largest corner shift that keeps IoU >= min_overlap (three cases).
    Works on floats or 0-d tensors (upstream passes tensors of the boxes' dtype)."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + (b1**2 - 4 * c1) ** 0.5) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + (b2**2 - 16 * c2) ** 0.5) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + (b3**2 - 4 * a3 * c3) ** 0.5) / 2
    return min(r1, r2, r3)


def circle_nms(dets: np.ndarray, thresh: float, post_max_size: int) -> list[int]:
    """Greedy NMS on (x, y, score) rows: suppress any lower-scored centre whose squared distance is
    <= thresh (upstream passes the per-task 'radius' as this threshold)."""
    order = dets[:, 2].argsort()[::-1]
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[a + 1 :]
        d2 = (dets[i, 0] - dets[rest, 0]) ** 2 + (dets[i, 1] - dets[rest, 1]) ** 2
        suppressed[rest[d2 <= thresh]] = True
    return keep[:post_max_size]
