"""StreamPETR registered as a ModelSpec: temporal lanes (one frame per slot and step, the memory queue
carries the past), no assets, nuScenes detection in the lidar frame."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from raydrive.config import TrainConfig
from raydrive.eval.detection import NuScenesDetectionEvaluator
from raydrive.models.streampetr.config import StreamPETRConfig
from raydrive.models.streampetr.mapper import StreamPETRMapper, StreamPETRMapperConfig
from raydrive.models.streampetr.model import StreamPETR
from raydrive.models.streampetr.presets import PRESETS
from raydrive.spec import Lanes, ModelSpec
from raydrive.trainers import register


def build_model(cfg: StreamPETRConfig, assets: Mapping[str, Path]) -> StreamPETR:
    return StreamPETR(cfg)


def build_evaluator(cfg: TrainConfig) -> NuScenesDetectionEvaluator:
    return NuScenesDetectionEvaluator(cfg.data.prepared, cfg.data.dataroot)


SPEC = register(
    ModelSpec(
        name="streampetr",
        description="StreamPETR: query-based temporal 3D detection with a memory queue (VoVNet-99 or ResNet-50)",
        config_cls=StreamPETRConfig,
        mapper_cls=StreamPETRMapperConfig,
        presets=PRESETS,
        build_model=build_model,
        build_mapper=StreamPETRMapper,
        build_evaluator=build_evaluator,
        sampling=Lanes(),
    )
)
train_loop = SPEC.train_loop  # Ray Train's train_loop_per_worker for StreamPETR
