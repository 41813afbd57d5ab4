"""BEVDepth (r50, 2 key frames) registered as a ModelSpec: key-frame sampling (current + previous),
no assets, nuScenes detection in the mean camera-ego frame."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from raydrive.config import TrainConfig
from raydrive.eval.detection import NuScenesDetectionEvaluator
from raydrive.models.bevdepth.config import BEVDepthConfig
from raydrive.models.bevdepth.mapper import BEVDepthMapper, BEVDepthMapperConfig
from raydrive.models.bevdepth.model import BEVDepth
from raydrive.models.bevdepth.presets import PRESETS
from raydrive.spec import KeyFrames, ModelSpec
from raydrive.trainers import register


def build_model(cfg: BEVDepthConfig, assets: Mapping[str, Path]) -> BEVDepth:
    return BEVDepth(cfg)


def build_evaluator(cfg: TrainConfig) -> NuScenesDetectionEvaluator:
    return NuScenesDetectionEvaluator(cfg.data.prepared, cfg.data.dataroot, frame="mean_cam_ego")


SPEC = register(
    ModelSpec(
        name="bevdepth",
        description="BEVDepth: lift-splat BEV detection with lidar-supervised depth (ResNet-50, 2 key frames)",
        config_cls=BEVDepthConfig,
        mapper_cls=BEVDepthMapperConfig,
        presets=PRESETS,
        build_model=build_model,
        build_mapper=BEVDepthMapper,
        build_evaluator=build_evaluator,
        sampling=KeyFrames((-1, 0)),
    )
)
train_loop = SPEC.train_loop  # Ray Train's train_loop_per_worker for BEVDepth
