"""Sparse4D v3 as a TrainSpec (upstream config: sparse4dv3_temporal_r50_1x8_bs6_256x704)."""

from __future__ import annotations

from raydrive.models.sparse4d.model import PRESETS, Sparse4D, Sparse4DConfig
from raydrive.trainers import register
from raydrive.trainers.spec import TrainSpec

DEFAULTS = {
    # upstream: 6 per GPU x 8, 100 epochs, AdamW 6e-4 wd 1e-3, backbone x0.5, clip 25, 500-iter warm-up from
    # 1/3, cosine to 1e-3, static loss scale 32; sampler skips frames with p .5 and reverses with p .1
    "full": {
        "run": {"batch_size": 6, "epochs": 100, "checkpoint_every": 1000},
        "data": {"skip_prob": 0.5, "flip_prob": 0.1, "seq_split_num": 2},
        "optim": {},
    },
    # the embedded default: learns on the synthetic set within 10 minutes on 2 CPU cores (no HSV
    # photometric step: on a CPU it costs more than it helps in a run this short)
    "small": {
        "run": {"batch_size": 2, "epochs": 20, "checkpoint_every": 100, "log_every": 10, "evaluate_before": True},
        "data": {"skip_prob": 0.0, "flip_prob": 0.0, "seq_split_num": 2, "photometric": False},
        "optim": {"lr": 1e-3, "warmup_iters": 30, "lr_mults": {"img_backbone": 1.0}},
    },
}

SPEC = register(
    TrainSpec(
        name="sparse4d",
        config_cls=Sparse4DConfig,
        presets=PRESETS,
        defaults=DEFAULTS,
        build=lambda cfg, anchors: Sparse4D(cfg, anchors),
        losses=lambda model, batch: model(batch),
        decode=lambda model, batch: model(batch),
        image_hw=lambda cfg: tuple(cfg.image_hw),
        temporal=True,
        needs_anchors=True,
        description="Sparse4D v3: temporal sparse 3D detection (ResNet-50 + FPN, 900 anchors)",
    )
)
