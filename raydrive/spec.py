"""What a model tells the shared engine, and nothing more.

A model is one `ModelSpec` (registered in `raydrive/trainers/`): how to build the network from its
config and its prepared assets, its **frame mapper** (what a Ray Data task turns an info row into),
its **evaluator** (what it scores and how), how frames are **sampled**, its typed **presets** and
its **stages**. The engine (`raydrive/engine/`) drives every model through the protocols below and
never names a model, a dataset field or a metric. Shapes follow torchtitan's TrainSpec (builders
for what varies) and detectron2's DatasetMapper / DatasetEvaluator split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from raydrive.config import TrainConfig

# ---------------------------------------------------------------------------------------------------------------
# Sampling: which frames a worker's batch slots see, and in which order.


@dataclass(frozen=True)
class Lanes:
    """Temporal lanes: every global batch slot streams contiguous frames of a scene chunk in time order
    (Sparse4D's GroupInBatchSampler; `raydrive/data/lanes.py`). For models with temporal state."""


@dataclass(frozen=True)
class KeyFrames:
    """Freely shuffled key frames, each joined with the key frames at `offsets` of the same scene
    (BEVDepth: (-1, 0), the previous key frame; the current frame is reused at a scene start, as
    upstream). The mapper sees offset `o != 0` columns as `f"{column}@{o}"`, e.g. `cam_data_path@-1`."""

    offsets: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Shuffle:
    """Freely shuffled single frames (no temporal state)."""


Sampling = Lanes | KeyFrames | Shuffle


# ---------------------------------------------------------------------------------------------------------------
# Protocols the engine calls.


@runtime_checkable
class DrivingModel(Protocol):
    """The network as the engine sees it.

    Mixed precision: the engine wraps `forward` and `predict` in `torch.autocast` when the run is
    fp16/bf16; a model keeps its fp32 parts (upstream's `force_fp32` heads) by disabling autocast
    around them.
    """

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Train mode: the loss terms (the engine sums them)."""

    def predict(self, batch: dict) -> list[dict]:
        """Eval mode, no grad: one dict of outputs per frame, which the model's evaluator reads."""

    def reset_state(self, slots: torch.Tensor | None = None) -> None:
        """Forget temporal state: all of it (None; before evaluation) or that of the batch slots where
        a bool (batch,) tensor is True (the sampling plan starts a new sequence there)."""

    def temporal_state(self) -> dict[str, torch.Tensor]:
        """The temporal cache as tensors (references; the engine copies what it keeps)."""

    def load_temporal_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `temporal_state()`'s output; an empty dict is a full reset."""


class FrameMapper(Protocol):
    """Turns a block of planned info rows into model inputs, inside a Ray Data task (pickled there).

    `columns`: the parquet columns it reads (plus the plan's own columns, which the pipeline adds:
    token, scene_token, frame, epoch, step, slot, seq_start, seq_id, aug_seed). `ragged`: output keys
    whose per-frame arrays differ in length, with the shape of one element (e.g. {"gt_boxes": (9,)});
    they are collated into lists of tensors. `strings`: output keys that stay lists of str.
    """

    columns: tuple[str, ...]
    ragged: Mapping[str, tuple[int, ...]]
    strings: tuple[str, ...]

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Evaluator(Protocol):
    """detectron2's DatasetEvaluator split across ranks: `process` on every rank, `state` gathered to
    rank 0, `evaluate` there. `headline` names the metrics that the progress line, the final report
    and `raydrive eval` print (e.g. ("mAP", "NDS"))."""

    headline: tuple[str, ...]

    def process(self, batch: dict, outputs: list[dict]) -> None: ...

    def state(self) -> Any:
        """What this rank collected (picklable)."""

    def evaluate(self, states: list[Any]) -> dict[str, Any]:
        """Rank 0: every rank's state -> metrics (headline keys as floats; more keys allowed)."""

    def format(self, metrics: dict[str, Any]) -> str:
        """A table for the console."""

    # Optional: `pictures(states: list[Any], out_dir: Path, tag: str) -> list[Path]`, called on rank 0
    # after `evaluate` with the same states when the run folder is known (`raydrive/engine/evaluate.py`):
    # draw the split's fixed frames into out_dir (`<run folder>/pictures/step_<N>`) and return the files.
    # NuScenesDetectionEvaluator draws BEV views and camera grids with `raydrive/viz/`.


# ---------------------------------------------------------------------------------------------------------------
# The spec.


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str  # one line for `--help` and `raydrive.list_models()` users
    config_cls: type  # the `model` section's dataclass
    mapper_cls: type  # the `mapper` section's dataclass
    presets: Mapping[str, Callable[[], TrainConfig]]  # typed experiment configs (model, mapper, run, optim, data)
    build_model: Callable[[Any, Mapping[str, Path]], torch.nn.Module]  # (model config, asset paths) -> DrivingModel
    build_mapper: Callable[[TrainConfig, bool], FrameMapper]  # (config, train?) -> mapper
    build_evaluator: Callable[[TrainConfig], Evaluator]  # cheap: reads data only in evaluate()
    sampling: Sampling = field(default_factory=Lanes)
    assets: tuple[str, ...] = ()  # prepared assets by registered name (raydrive/data/assets.py)
    # a preset name that stands for several presets run in order, each later one starting from the
    # earlier one's final checkpoint (its run.load_from = "stage:<earlier preset>")
    stages: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_preset: str = "full"  # on the user's data; "small" on the embedded synthetic set
    embedded_preset: str = "small"

    def config(self, preset: str) -> TrainConfig:
        """A fresh config of one (non-staged) preset, named after the model and preset."""
        if preset not in self.presets:
            choices = sorted([*self.presets, *self.stages])
            raise KeyError(f"model {self.name!r} has no preset {preset!r}; presets: {', '.join(choices)}")
        cfg = self.presets[preset]()
        cfg.model_name, cfg.preset = self.name, preset
        return cfg

    def stage_presets(self, preset: str) -> tuple[str, ...]:
        """The presets one run of `preset` trains, in order (one unless it names stages)."""
        return tuple(self.stages.get(preset, (preset,)))

    def train_loop(self, config: dict) -> None:
        """Ray Train's train_loop_per_worker for this model: the shared loop bound to this spec."""
        from raydrive.engine.loop import train_loop

        train_loop(self, config)
