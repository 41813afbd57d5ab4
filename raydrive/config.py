"""Typed run configuration: dataclasses, per-model presets, `key=value` overrides, YAML dump.

A run's config is a `TrainConfig` with four sections: `run` (scale, storage, failure handling),
`data`, `optim` and `model` (the model's own dataclass, e.g. `Sparse4DConfig`). Overrides use dotted
paths (`optim.lr=3e-4`, `model.num_anchor=300`); an unknown key is an error that lists close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class RunSection:
    name: str | None = None  # default: "<model>-<preset>"
    storage_path: str | None = None  # default: <cache>/runs; must be shared storage on multi-node clusters
    num_workers: int = 2
    batch_size: int = 2  # per worker
    epochs: int = 1
    max_steps: int | None = None  # stop after this many steps (all epochs together)
    stop_at_step: int | None = None  # pause: checkpoint and stop here; a re-run resumes (the schedule is unchanged)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    checkpoint_every: int = 50  # steps
    keep_checkpoints: int = 2
    seed: int = 0
    accelerator: str = "auto"  # auto | npu | cuda | cpu
    backend: str | None = None  # hccl | nccl | gloo; default from the accelerator
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    cpus_per_worker: float | None = None
    log_every: int = 10
    benchmark: bool = False
    benchmark_steps: int = 20
    benchmark_warmup: int = 3  # steps excluded from the mean step time
    evaluate: bool = True  # decode the val split after training and score it with the devkit
    evaluate_before: bool = False  # also score the untrained model first (shows that the run learns)
    load_from: str | None = None  # upstream or raydrive checkpoint with the model's weights


@dataclass
class DataSection:
    dataroot: str | None = None  # default: the embedded synthetic set
    prepared: str | None = None
    seq_split_num: int = 2
    skip_prob: float = 0.0
    flip_prob: float = 0.0
    photometric: bool = True
    bev_rot: tuple[float, float] = (-0.3925, 0.3925)
    rot_lim_deg: tuple[float, float] = (-5.4, 5.4)
    flip: bool = True
    with_depth: bool = True
    cpus_per_task: float = 0.5
    max_tasks: int = 2  # decode tasks in flight per worker
    prefetch_batches: int = 2


@dataclass
class OptimSection:
    lr: float = 6e-4
    weight_decay: float = 1e-3
    lr_mults: dict[str, float] = field(default_factory=lambda: {"img_backbone": 0.5})
    grad_clip: float = 25.0
    schedule: str = "cosine"  # cosine | multistep
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3
    min_lr_ratio: float = 1e-3
    milestones: tuple[float, ...] = ()  # multistep: fractions of the total steps
    gamma: float = 0.1
    loss_scale: float | str = 32.0  # static loss scale for fp16 (upstream mmcv Fp16 hook); "dynamic"


@dataclass
class TrainConfig:
    model_name: str
    preset: str
    run: RunSection
    data: DataSection
    optim: OptimSection
    model: Any

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class ConfigError(ValueError):
    pass


def all_keys(cfg: TrainConfig) -> list[str]:
    keys = []
    for section in ("run", "data", "optim", "model"):
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]
    return keys


def _convert(text: str, typ, key: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(text, a, key)
            except (ValueError, ConfigError) as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={text!r}: {'; '.join(errors)}")
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {text!r}")
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key} expects {typ.__name__}, got {text!r}") from None
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        inner = args[0] if args else str
        return tuple(_convert(p.strip(), inner, key) for p in parts)
    if origin is dict:
        parsed = yaml.safe_load(text)
        if not isinstance(parsed, dict):
            raise ConfigError(f"{key} expects a mapping like {{img_backbone: 0.5}}, got {text!r}")
        return {str(k): float(v) for k, v in parsed.items()}
    return yaml.safe_load(text)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings, converting to each field's type. A section's own checks run
    once with all of its overrides applied (fields may depend on each other)."""
    known = all_keys(cfg)
    changes: dict[str, dict[str, Any]] = {}
    given: dict[str, list[str]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example optim.lr=3e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in known:
            short = [k for k in known if k.split(".", 1)[1] == key]
            close = short or difflib.get_close_matches(key, known, n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see the resolved config printed at start-up"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        section_name, name = key.split(".", 1)
        hints = typing.get_type_hints(type(getattr(cfg, section_name)))
        changes.setdefault(section_name, {})[name] = _convert(text.strip(), hints[name], key)
        given.setdefault(section_name, []).append(item)
    for section_name, values in changes.items():
        try:
            setattr(cfg, section_name, dataclasses.replace(getattr(cfg, section_name), **values))
        except ValueError as e:  # the section's own checks (e.g. the model config's __post_init__)
            raise ConfigError(f"{' '.join(given[section_name])}: {e}") from None
    return cfg
