"""SparseDrive registered as a ModelSpec: temporal lanes, its four k-means assets, two stages, and the
detection + tracking + map + planning evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from raydrive.config import TrainConfig
from raydrive.data.assets import SPARSEDRIVE_ASSETS
from raydrive.eval.sparsedrive import SparseDriveEvaluator
from raydrive.models.sparsedrive.config import SparseDriveConfig
from raydrive.models.sparsedrive.mapper import SparseDriveMapper, SparseDriveMapperConfig
from raydrive.models.sparsedrive.model import SparseDrive
from raydrive.models.sparsedrive.presets import PRESETS, STAGES
from raydrive.spec import Lanes, ModelSpec
from raydrive.trainers import register


def build_model(cfg: SparseDriveConfig, assets: Mapping[str, Path]) -> SparseDrive:
    det, map_, motion, plan = (np.load(assets[a]) if a in assets else None for a in SPARSEDRIVE_ASSETS)
    return SparseDrive(cfg, det, map_, motion, plan)


def build_evaluator(cfg: TrainConfig) -> SparseDriveEvaluator:
    return SparseDriveEvaluator(cfg.data.prepared, cfg.data.dataroot, with_plan=cfg.model.with_motion_plan)


SPEC = register(
    ModelSpec(
        name="sparsedrive",
        description="SparseDrive: end-to-end detection, tracking, online map, motion and planning (2 stages)",
        config_cls=SparseDriveConfig,
        mapper_cls=SparseDriveMapperConfig,
        presets=PRESETS,
        build_model=build_model,
        build_mapper=SparseDriveMapper,
        build_evaluator=build_evaluator,
        sampling=Lanes(),
        assets=SPARSEDRIVE_ASSETS,
        stages=STAGES,
    )
)
train_loop = SPEC.train_loop  # Ray Train's train_loop_per_worker for SparseDrive
