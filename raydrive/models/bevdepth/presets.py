"""BEVDepth experiments as typed configs: `full` is upstream's
`bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py`; `small` trains on a CPU
in minutes."""

from __future__ import annotations

from raydrive.config import DataSection, OptimSection, RunSection, TrainConfig
from raydrive.models.bevdepth.config import BEVDepthConfig
from raydrive.models.bevdepth.mapper import BEVDepthMapperConfig

# upstream: AdamW, lr 2e-4 per 64 samples (8 GPUs x 8), wd 1e-7, MultiStepLR x0.1 after epochs 19 and
# 23 of 24, gradient clip 5, native AMP (dynamic loss scale), no warm-up
UPSTREAM_OPTIM = dict(
    lr=2e-4,
    weight_decay=1e-7,
    grad_clip=5.0,
    schedule="multistep",
    milestones=(19 / 24, 23 / 24),
    gamma=0.1,
    warmup_iters=0,
    loss_scale="dynamic",
)


def full() -> TrainConfig:
    """8 samples per device x 8 devices = global batch 64, 24 epochs."""
    return TrainConfig(
        model_name="bevdepth",
        preset="full",
        run=RunSection(global_batch=64, batch_size=8, epochs=24, checkpoint_every=500),
        data=DataSection(),
        optim=OptimSection(**UPSTREAM_OPTIM),
        model=BEVDepthConfig(),
        mapper=BEVDepthMapperConfig(),
    )


def full_ema() -> TrainConfig:
    """`bev_depth_lss_r50_256x704_128x128_24e_2key_ema`: the same with an EMA of the weights (decay
    0.999), which evaluation uses."""
    cfg = full()
    cfg.preset = "full_ema"
    cfg.optim.ema_decay = 0.999
    return cfg


def small() -> TrainConfig:
    """The embedded default: a narrow ResNet-18, 128x352 input, 28 depth bins and a 64 x 64 BEV grid
    of 1.6 m cells; learns on the synthetic set within 10 minutes on 2 CPU cores (10 epochs = 200 steps:
    8 min 50 s from an empty cache, val mAP 0 -> 0.025; 12 epochs reached 0.036 but took 10 min 15 s)."""
    return TrainConfig(
        model_name="bevdepth",
        preset="small",
        run=RunSection(
            global_batch=4, batch_size=2, epochs=10, checkpoint_every=100, log_every=10, evaluate_before=True
        ),
        data=DataSection(),
        optim=OptimSection(**{**UPSTREAM_OPTIM, "lr": 2e-3, "weight_decay": 1e-4, "milestones": (0.8,)}),
        model=BEVDepthConfig(
            image_hw=(128, 352),
            backbone_depth=18,
            backbone_base_channels=16,
            backbone_blocks=(1, 1, 1, 1),
            neck_channels=32,
            depth_mid_channels=64,
            context_channels=16,
            x_bound=(-51.2, 51.2, 1.6),
            y_bound=(-51.2, 51.2, 1.6),
            d_bound=(2.0, 58.0, 2.0),
            bev_base_channels=32,
            bev_blocks=(1, 1, 1),
            bev_neck_channels=16,
            head_conv=16,
            voxel_size=(0.4, 0.4),
            max_objs=100,
        ),
        mapper=BEVDepthMapperConfig(),
    )


PRESETS = {"full": full, "full_ema": full_ema, "small": small}
