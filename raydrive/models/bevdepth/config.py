"""BEVDepth's model config: defaults are upstream's `bev_depth_lss_r50_256x704_128x128_24e_2key`
(`bevdepth/exps/nuscenes/base_exp.py` and the 2key exp file)."""

from __future__ import annotations

from dataclasses import dataclass

# CenterHead's task groups; their order is CLASSES' order, so a task-local label plus the task's
# offset is the index into CLASSES.
TASKS: tuple[tuple[str, ...], ...] = (
    ("car",),
    ("truck", "construction_vehicle"),
    ("bus", "trailer"),
    ("barrier",),
    ("motorcycle", "bicycle"),
    ("pedestrian", "traffic_cone"),
)
COMMON_HEADS = (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2))


@dataclass
class BEVDepthConfig:
    image_hw: tuple[int, int] = (256, 704)
    # image backbone (ResNet, stem frozen) and SECONDFPN neck to stride 16
    backbone_depth: int = 50
    backbone_base_channels: int = 64
    backbone_blocks: tuple[int, ...] | None = None
    neck_channels: int = 128  # per level; 4 levels concatenated feed the depth net
    downsample: int = 16
    # depth net
    depth_mid_channels: int = 512
    context_channels: int = 80
    aspp_mid_channels: int | None = None  # None: depth_mid_channels (upstream)
    dcn_groups: int = 4
    # LSS grid: (min, max, step)
    x_bound: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    y_bound: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    z_bound: tuple[float, float, float] = (-5.0, 3.0, 8.0)
    d_bound: tuple[float, float, float] = (2.0, 58.0, 0.5)
    num_key_frames: int = 2  # current + previous key frame, concatenated in BEV
    # BEV trunk (ResNet-18 style, 3 stages) + SECONDFPN neck
    bev_base_channels: int = 160
    bev_blocks: tuple[int, ...] = (2, 2, 2)
    bev_neck_channels: int = 64
    # CenterHead
    head_conv: int = 64
    voxel_size: tuple[float, float] = (0.2, 0.2)  # with out_size_factor: the target grid's cell (0.8 m)
    out_size_factor: int = 4
    gaussian_overlap: float = 0.1
    min_radius: int = 2
    max_objs: int = 500
    code_weights: tuple[float, ...] = (1.0,) * 10
    loss_bbox_weight: float = 0.25
    depth_loss_weight: float = 3.0
    # decoding
    score_threshold: float = 0.1
    max_num: int = 500
    post_center_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    nms_radius: tuple[float, ...] = (4.0, 12.0, 10.0, 1.0, 0.85, 0.175)  # per task, on squared distance
    post_max_size: int = 83

    def __post_init__(self):
        for name in ("x_bound", "y_bound", "z_bound", "d_bound"):
            lo, hi, step = getattr(self, name)
            if not (hi > lo and step > 0):
                raise ValueError(
                    f"model.{name} must be (min, max, step) with max > min and step > 0, got {(lo, hi, step)}"
                )
        if self.image_hw[0] % self.downsample or self.image_hw[1] % self.downsample:
            raise ValueError(f"model.image_hw {self.image_hw} must be divisible by model.downsample {self.downsample}")
        if len(self.nms_radius) != len(TASKS):
            raise ValueError(f"model.nms_radius needs one radius per task ({len(TASKS)}), got {len(self.nms_radius)}")
        if len(self.code_weights) != 10:
            raise ValueError(f"model.code_weights needs 10 values, got {len(self.code_weights)}")
        if self.num_key_frames < 1:
            raise ValueError("model.num_key_frames must be >= 1")
        if self.depth_mid_channels % self.dcn_groups:
            raise ValueError("model.depth_mid_channels must be divisible by model.dcn_groups")

    @property
    def depth_bins(self) -> int:
        lo, hi, step = self.d_bound
        return len(_arange(lo, hi, step))

    @property
    def bev_hw(self) -> tuple[int, int]:
        """(Y, X) cells of the BEV grid."""
        return (
            int((self.y_bound[1] - self.y_bound[0]) / self.y_bound[2]),
            int((self.x_bound[1] - self.x_bound[0]) / self.x_bound[2]),
        )


def _arange(lo: float, hi: float, step: float):
    import torch

    return torch.arange(lo, hi, step, dtype=torch.float)
