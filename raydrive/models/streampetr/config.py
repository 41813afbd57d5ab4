"""StreamPETR's model config: one typed dataclass for both upstream presets and the CPU preset.

Defaults are upstream's `projects/configs/StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py`;
`presets.py` sets the ResNet-50 variant and the small CPU model from them.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONES = ("vov99", "r50")


@dataclass
class StreamPETRConfig:
    image_hw: tuple[int, int] = (320, 800)
    # image backbone: "vov99" (VoVNet-99 eSE, stage4/5) or "r50" (ResNet C4/C5); the small preset
    # shrinks r50 with backbone_depth / backbone_base_channels / backbone_blocks
    backbone: str = "vov99"
    backbone_depth: int = 50  # r50 only
    backbone_base_channels: int = 64  # r50 only
    backbone_blocks: tuple[int, ...] | None = None  # r50 only: blocks per stage (None: the depth's)
    backbone_frozen_bn: bool = True  # vov: fixed BN statistics; r50: fixed statistics and affines
    backbone_with_cp: bool = True
    use_grid_mask: bool = True
    embed_dims: int = 256
    norm_groups: int = 32  # the 2D head's GroupNorm
    num_classes: int = 10
    num_cams: int = 6
    stride: int = 16
    # 3D head
    num_query: int = 644
    memory_len: int = 1024
    topk_proposals: int = 256
    num_propagated: int = 256
    depth_num: int = 64
    position_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    pc_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    num_layers: int = 6
    num_heads: int = 8
    ffn_dims: int = 2048
    dropout: float = 0.1
    decoder_with_cp: bool = True
    num_dn_groups: int = 10  # 0: no denoising queries
    decode_top_k: int = 300
    # metres: each query's cross-attention only sees image tokens whose camera ray passes this close to its
    # reference point (plus the token's spread), a geometric prior in place of the learned position
    # coupling. None: every token (upstream)
    cross_attn_radius: float | None = None
    with_2d_head: bool = True  # the auxiliary FocalHead (img_roi_head); training only, as upstream

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if len(self.image_hw) != 2 or any(int(x) % 32 for x in self.image_hw):
            raise ValueError(
                f"model.image_hw must be (height, width), both multiples of 32 (upstream pads to 32), "
                f"got {self.image_hw}"
            )
        if self.embed_dims % self.num_heads or self.embed_dims % 2:
            raise ValueError(f"model.embed_dims {self.embed_dims} must be even and divisible by num_heads")
        if self.num_propagated > self.topk_proposals or self.topk_proposals > self.memory_len:
            raise ValueError("need model.num_propagated <= model.topk_proposals <= model.memory_len")
        if self.embed_dims % self.norm_groups:
            raise ValueError(f"model.embed_dims {self.embed_dims} must be divisible by norm_groups {self.norm_groups}")
