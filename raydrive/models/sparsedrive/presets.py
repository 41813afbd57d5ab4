"""SparseDrive's two stages as typed configs: `stage1` / `stage2` are upstream's
`projects/configs/sparsedrive_small_stage{1,2}.py`; `small_stage1` / `small_stage2` run the same two
stages on a CPU in minutes. The staged names `full` and `small` run both, stage 2 starting from stage 1's
final checkpoint (`run.load_from = "stage:<stage 1 preset>"`)."""

from __future__ import annotations

import dataclasses

from raydrive.config import DataSection, OptimSection, RunSection, TrainConfig
from raydrive.models.sparse4d.model import Sparse4DConfig
from raydrive.models.sparse4d.presets import UPSTREAM_OPTIM as SPARSE4D_OPTIM
from raydrive.models.sparse4d.presets import small as sparse4d_small
from raydrive.models.sparsedrive.config import SparseDriveConfig
from raydrive.models.sparsedrive.mapper import SparseDriveMapperConfig

# upstream: AdamW wd 1e-3, clip 25, 500-iteration linear warm-up from 1/3, cosine to 1e-3, fp16 scale 32;
# stage 1 lr 4e-4 with the backbone x0.5, stage 2 lr 3e-4 with the backbone x0.1
STAGE1_OPTIM = {**SPARSE4D_OPTIM, "lr": 4e-4, "lr_mults": {"img_backbone": 0.5}}
STAGE2_OPTIM = {**SPARSE4D_OPTIM, "lr": 3e-4, "lr_mults": {"img_backbone": 0.1}}

STAGES = {"full": ("stage1", "stage2"), "small": ("small_stage1", "small_stage2")}


def stage1() -> TrainConfig:
    """Detection and map: 8 samples per GPU x 8 = global batch 64, 100 epochs (43,900 iterations)."""
    return TrainConfig(
        model_name="sparsedrive",
        preset="stage1",
        run=RunSection(global_batch=64, batch_size=8, epochs=100, checkpoint_every=1000),
        data=DataSection(seq_split_num=2),
        optim=OptimSection(**STAGE1_OPTIM),
        model=SparseDriveConfig(with_motion_plan=False, map_num_temp_instances=0),
        mapper=SparseDriveMapperConfig(),
    )


def stage2() -> TrainConfig:
    """+ motion and planning: 6 per GPU x 8 = global batch 48, 10 epochs, from stage 1's final weights."""
    return TrainConfig(
        model_name="sparsedrive",
        preset="stage2",
        run=RunSection(global_batch=48, batch_size=6, epochs=10, checkpoint_every=1000, load_from="stage:stage1"),
        data=DataSection(seq_split_num=2),
        optim=OptimSection(**STAGE2_OPTIM),
        model=SparseDriveConfig(),
        mapper=SparseDriveMapperConfig(),
    )


def _small_model(**overrides) -> SparseDriveConfig:
    """Sparse4D's small sizes (backbone, image, anchors, decoder), SparseDrive's own defaults where the two
    configs differ (no DN, the yaw swap fixed, ...), then the small map head and planner."""
    sizes = dataclasses.asdict(sparse4d_small().model)
    own = dataclasses.asdict(SparseDriveConfig())
    shared = {k: v for k, v in sizes.items() if getattr(Sparse4DConfig(), k) == own[k]}
    small = dict(
        num_dn_groups=1,  # upstream SparseDrive has none; one group speeds up learning on the tiny set
        map_num_anchor=30,
        map_num_learnable_pts=1,
        motion_num_layers=1,
        motion_num_det=20,
        motion_num_map=5,
    )
    return SparseDriveConfig(**{**shared, **small, **overrides})


def small_stage1() -> TrainConfig:
    """The embedded default's first stage (Sparse4D's small recipe with the map head)."""
    return TrainConfig(
        model_name="sparsedrive",
        preset="small_stage1",
        run=RunSection(
            global_batch=4, batch_size=2, epochs=20, checkpoint_every=100, log_every=10, evaluate_before=True
        ),
        data=DataSection(seq_split_num=2),
        optim=OptimSection(**{**STAGE1_OPTIM, "lr": 3e-3, "warmup_iters": 30, "lr_mults": {}}),
        model=_small_model(with_motion_plan=False, map_num_temp_instances=0),
        mapper=SparseDriveMapperConfig(photometric=False),
    )


def small_stage2() -> TrainConfig:
    """The embedded default's second stage, from the first stage's final checkpoint."""
    cfg = small_stage1()
    cfg.preset = "small_stage2"
    cfg.run = dataclasses.replace(cfg.run, epochs=4, load_from="stage:small_stage1")
    cfg.optim = OptimSection(**{**STAGE2_OPTIM, "lr": 2e-3, "warmup_iters": 10, "lr_mults": {}})
    cfg.model = _small_model(map_num_temp_instances=10)
    return cfg


PRESETS = {"stage1": stage1, "stage2": stage2, "small_stage1": small_stage1, "small_stage2": small_stage2}
