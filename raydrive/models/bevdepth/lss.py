"""Lift-splat with a camera-aware depth net: images -> per-camera depth distribution and context ->
points in a frustum -> summed into BEV cells (upstream `bevdepth/layers/backbones/base_lss_fpn.py`).

Module and buffer names follow upstream's `backbone.*` keys so its state dict loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydrive.models.bevdepth.config import BEVDepthConfig
from raydrive.models.resnet import BasicBlock, ResNet
from raydrive.models.secondfpn import SECONDFPN
from raydrive.ops.deform_conv import DeformConv2dPack
from raydrive.ops.voxel_pooling import voxel_pooling


class _ASPPBranch(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, dilation: int):
        super().__init__()
        pad = 0 if k == 1 else dilation
        self.atrous_conv = nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        nn.init.kaiming_normal_(self.atrous_conv.weight)

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous pyramid: dilations 1/6/12/18 and a global-pool branch, concatenated, 1x1 conv, dropout."""

    def __init__(self, cin: int, mid: int, dropout: float = 0.5):
        super().__init__()
        self.aspp1 = _ASPPBranch(cin, mid, 1, 1)
        self.aspp2 = _ASPPBranch(cin, mid, 3, 6)
        self.aspp3 = _ASPPBranch(cin, mid, 3, 12)
        self.aspp4 = _ASPPBranch(cin, mid, 3, 18)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(mid * 5, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        for m in (self.global_avg_pool[1], self.conv1):
            nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        pooled = self.global_avg_pool(x)
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)]
        pooled = F.interpolate(pooled, size=branches[-1].shape[2:], mode="bilinear", align_corners=True)
        x = self.relu(self.bn1(self.conv1(torch.cat(branches + [pooled], dim=1))))
        return self.dropout(x)


class Mlp(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SELayer(nn.Module):
    """x * sigmoid(conv(relu(conv(gate)))): the camera-aware gate."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(channels, channels, 1)

    def forward(self, x, gate):
        return x * torch.sigmoid(self.conv_expand(self.act1(self.conv_reduce(gate))))


def camera_params(mats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 27 camera-aware inputs per camera of the key frame (upstream reads the key frame's matrices
    for every frame): fx, fy, cx, cy; ida [0,0] [0,1] [0,3] [1,0] [1,1] [1,3]; bda [0,0] [0,1] [1,0]
    [1,1] [2,2]; sensor2ego[:3, :4] row by row. Returns (B * N, 27)."""
    intrin = mats["intrin_mats"][:, 0]
    ida = mats["ida_mats"][:, 0]
    s2e = mats["sensor2ego_mats"][:, 0, :, :3, :]
    b, n = intrin.shape[:2]
    bda = mats["bda_mat"].view(b, 1, 4, 4).expand(b, n, 4, 4)
    picks = [
        intrin[..., 0, 0], intrin[..., 1, 1], intrin[..., 0, 2], intrin[..., 1, 2],
        ida[..., 0, 0], ida[..., 0, 1], ida[..., 0, 3], ida[..., 1, 0], ida[..., 1, 1], ida[..., 1, 3],
        bda[..., 0, 0], bda[..., 0, 1], bda[..., 1, 0], bda[..., 1, 1], bda[..., 2, 2],
    ]  # fmt: skip
    return torch.cat([torch.stack(picks, -1), s2e.reshape(b, n, 12)], -1).reshape(b * n, 27)


class DepthNet(nn.Module):
    """Context (C channels) and depth logits (D bins) from the image features, each gated by an MLP of
    the camera parameters; the depth branch adds 3 residual blocks, ASPP and a deformable conv."""

    def __init__(self, cin: int, mid: int, context: int, depth: int, aspp_mid: int, dcn_groups: int):
        super().__init__()
        self.reduce_conv = nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.context_conv = nn.Conv2d(mid, context, 1)
        self.bn = nn.BatchNorm1d(27)
        self.depth_mlp = Mlp(27, mid, mid)
        self.depth_se = SELayer(mid)
        self.context_mlp = Mlp(27, mid, mid)
        self.context_se = SELayer(mid)
        self.depth_conv = nn.Sequential(
            BasicBlock(mid, mid),
            BasicBlock(mid, mid),
            BasicBlock(mid, mid),
            ASPP(mid, aspp_mid),
            DeformConv2dPack(aspp_mid, mid, 3, padding=1, groups=dcn_groups),
            nn.Conv2d(mid, depth, 1),
        )

    def forward(self, x: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        cam = self.bn(cam)
        x = self.reduce_conv(x)
        context = self.context_conv(self.context_se(x, self.context_mlp(cam)[..., None, None]))
        depth = self.depth_conv(self.depth_se(x, self.depth_mlp(cam)[..., None, None]))
        return torch.cat([depth, context], dim=1)


def make_frustum(image_hw: tuple[int, int], downsample: int, d_bound) -> torch.Tensor:
    """(D, fH, fW, 4) of (u, v, d, 1): pixel centres of the feature cells spread over the input image
    (u = linspace(0, W - 1, fW)), at every depth bin."""
    h, w = image_hw
    fh, fw = h // downsample, w // downsample
    d = torch.arange(*d_bound, dtype=torch.float).view(-1, 1, 1).expand(-1, fh, fw)
    u = torch.linspace(0, w - 1, fw, dtype=torch.float).view(1, 1, fw).expand(d.shape[0], fh, fw)
    v = torch.linspace(0, h - 1, fh, dtype=torch.float).view(1, fh, 1).expand(d.shape[0], fh, fw)
    return torch.stack((u, v, d, torch.ones_like(d)), -1)


class LSSBackbone(nn.Module):
    """Upstream `BaseLSSFPN`: one BEV feature map per key frame, concatenated (key frame first); the
    earlier frames run under no_grad."""

    def __init__(self, cfg: BEVDepthConfig):
        super().__init__()
        self.cfg = cfg
        bounds = (cfg.x_bound, cfg.y_bound, cfg.z_bound)
        self.register_buffer("voxel_size", torch.tensor([b[2] for b in bounds], dtype=torch.float))
        self.register_buffer("voxel_coord", torch.tensor([b[0] + b[2] / 2.0 for b in bounds], dtype=torch.float))
        self.register_buffer("voxel_num", torch.tensor([int((b[1] - b[0]) / b[2]) for b in bounds], dtype=torch.long))
        self.register_buffer("frustum", make_frustum(cfg.image_hw, cfg.downsample, cfg.d_bound))
        self.depth_channels = self.frustum.shape[0]
        self.img_backbone = ResNet(
            cfg.backbone_depth, cfg.backbone_base_channels, cfg.backbone_blocks, (0, 1, 2, 3), frozen_stages=0
        )
        levels = self.img_backbone.out_channels
        strides = [4 / cfg.downsample * 2**i for i in range(len(levels))]  # C2..C5 -> stride 16
        self.img_neck = SECONDFPN(levels, [cfg.neck_channels] * len(levels), strides)
        self.depth_net = DepthNet(
            self.img_neck.out_channels,
            cfg.depth_mid_channels,
            cfg.context_channels,
            self.depth_channels,
            cfg.aspp_mid_channels or cfg.depth_mid_channels,
            cfg.dcn_groups,
        )

    def geometry(self, sensor2ego, intrin, ida, bda) -> torch.Tensor:
        """Frustum points -> BEV-augmented ego coordinates, (B, N, D, fH, fW, 3): undo the image
        augmentation, scale (u, v) by depth, camera -> ego, then the BEV augmentation."""
        b, n = sensor2ego.shape[:2]
        points = ida.view(b, n, 1, 1, 1, 4, 4).inverse().matmul(self.frustum.unsqueeze(-1))
        points = torch.cat((points[..., :2, :] * points[..., 2:3, :], points[..., 2:, :]), 5)
        combine = sensor2ego.matmul(torch.inverse(intrin))
        points = combine.view(b, n, 1, 1, 1, 4, 4).matmul(points)
        points = (bda.view(b, 1, 1, 1, 1, 4, 4) @ points).squeeze(-1)
        return points[..., :3]

    def cell_index(self, xyz: torch.Tensor) -> torch.Tensor:
        """Integer BEV cells; `.int()` truncates toward zero as upstream does, so points just below the
        grid's lower edge (-1 < index < 0) land in cell 0."""
        return ((xyz - (self.voxel_coord - self.voxel_size / 2.0)) / self.voxel_size).int()

    def image_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) -> (B * N, C, fH, fW)."""
        return self.img_neck(self.img_backbone(imgs.flatten(0, 1)))

    def frame(self, index: int, imgs: torch.Tensor, mats: dict, cam: torch.Tensor):
        """One key frame: (BEV features (B, C, Y, X), depth logits (B * N, D, fH, fW))."""
        b, n = imgs.shape[:2]
        out = self.depth_net(self.image_features(imgs), cam)
        logits = out[:, : self.depth_channels]
        depth = logits.softmax(dim=1, dtype=out.dtype)
        context = out[:, self.depth_channels : self.depth_channels + self.cfg.context_channels]
        geom = self.geometry(
            mats["sensor2ego_mats"][:, index],
            mats["intrin_mats"][:, index],
            mats["ida_mats"][:, index],
            mats["bda_mat"],
        )
        lifted = depth.unsqueeze(1) * context.unsqueeze(2)  # (B*N, C, D, fH, fW)
        lifted = lifted.reshape(b, n, *lifted.shape[1:]).permute(0, 1, 3, 4, 5, 2)
        bev = voxel_pooling(self.cell_index(geom), lifted.contiguous(), self.voxel_num.tolist())
        return bev, logits

    def forward(self, imgs: torch.Tensor, mats: dict[str, torch.Tensor]):
        """imgs (B, S, N, 3, H, W), S key frames (current first). Returns (BEV (B, S * C, Y, X), the key
        frame's depth distribution (B * N, D, fH, fW) in fp32 for the depth loss)."""
        cam = camera_params(mats)
        bev, logits = self.frame(0, imgs[:, 0], mats, cam)
        feats = [bev]
        with torch.no_grad():
            for s in range(1, imgs.shape[1]):
                feats.append(self.frame(s, imgs[:, s], mats, cam)[0])
        return torch.cat(feats, 1), logits.float().softmax(dim=1)
