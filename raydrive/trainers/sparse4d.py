"""Sparse4D v3 registered as a ModelSpec: temporal lanes, k-means anchors, nuScenes detection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from raydrive.config import TrainConfig
from raydrive.eval.detection import NuScenesDetectionEvaluator
from raydrive.models.sparse4d.mapper import Sparse4DMapper, Sparse4DMapperConfig
from raydrive.models.sparse4d.model import Sparse4D, Sparse4DConfig
from raydrive.models.sparse4d.presets import PRESETS
from raydrive.spec import Lanes, ModelSpec
from raydrive.trainers import register

ANCHORS = "det_anchors_900"


def build_model(cfg: Sparse4DConfig, assets: Mapping[str, Path]) -> Sparse4D:
    return Sparse4D(cfg, np.load(assets[ANCHORS]) if ANCHORS in assets else None)


def build_evaluator(cfg: TrainConfig) -> NuScenesDetectionEvaluator:
    return NuScenesDetectionEvaluator(cfg.data.prepared, cfg.data.dataroot)


SPEC = register(
    ModelSpec(
        name="sparse4d",
        description="Sparse4D v3: temporal sparse 3D detection (ResNet-50 + FPN, 900 anchors)",
        config_cls=Sparse4DConfig,
        mapper_cls=Sparse4DMapperConfig,
        presets=PRESETS,
        build_model=build_model,
        build_mapper=Sparse4DMapper,
        build_evaluator=build_evaluator,
        sampling=Lanes(),
        assets=(ANCHORS,),
    )
)
train_loop = SPEC.train_loop  # Ray Train's train_loop_per_worker for Sparse4D
