"""Typed run configuration: dataclasses, per-model presets, `key=value` overrides, YAML dump.

A run's config is a `TrainConfig` with five sections: `run` (scale, global batch, storage, failure
handling), `data` (prepared data, sampling, loader resources), `optim`, and two that belong to the
model: `model` (its network config, e.g. `Sparse4DConfig`) and `mapper` (its frame mapper's
augmentation and filters). Overrides use dotted paths (`optim.lr=3e-4`, `model.num_anchor=300`);
an unknown key is an error that lists close matches.
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
    # Samples per optimizer step, kept whatever the worker count: workers x batch_size x accumulation steps.
    global_batch: int = 4
    batch_size: int = 2  # per worker and micro-batch, at most; lowered when workers x batch_size > global_batch
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (all epochs together)
    stop_at_step: int | None = None  # pause: checkpoint and stop here; a re-run resumes (the schedule is unchanged)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    checkpoint_every: int = 50  # optimizer steps
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
    evaluate: bool = True  # run the model's evaluator on the val split after training
    evaluate_before: bool = False  # with evaluate: also score the untrained model first (shows that the run learns)
    # weights to start from: an upstream .pth, a raydrive checkpoint, or "stage:<preset>" (the final
    # checkpoint of an earlier stage of the same run)
    load_from: str | None = None
    trust_checkpoint: bool = False  # let load_from unpickle objects beyond tensors and numpy (can run code)


@dataclass
class DataSection:
    """Where the prepared data is, how frames are sampled, and what the Ray Data tasks may use. What a
    model does to a frame (augmentation, filters) is its mapper's section, `mapper.*`."""

    dataroot: str | None = None  # default: the embedded synthetic set
    prepared: str | None = None
    seq_split_num: int = 2  # temporal lanes: chunks per scene
    skip_prob: float = 0.0  # temporal lanes: skip a frame (Sparse4D trains with 0.5)
    reverse_prob: float = 0.0  # temporal lanes: play a chunk backwards (Sparse4D trains with 0.1)
    cpus_per_task: float = 0.5
    max_tasks: int = 2  # decode tasks in flight per worker
    prefetch_batches: int = 2


@dataclass
class OptimSection:
    """AdamW with per-prefix lr multipliers, linear warm-up and a cosine or multistep schedule, all in
    optimizer steps of the global batch (so the same for any worker count)."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    lr_mults: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr multiplier
    grad_clip: float | None = None  # max gradient norm; None: no clipping (the norm is still logged)
    schedule: str = "cosine"  # cosine | multistep
    warmup_iters: int = 0
    warmup_ratio: float = 1.0 / 3
    min_lr_ratio: float = 1e-3
    milestones: tuple[float, ...] = ()  # multistep: fractions of the total steps
    gamma: float = 0.1
    loss_scale: float | str = "dynamic"  # fp16 only: a static loss scale (mmcv Fp16OptimizerHook) or "dynamic"


@dataclass
class TrainConfig:
    model_name: str
    preset: str
    run: RunSection
    data: DataSection
    optim: OptimSection
    model: Any  # the model's config dataclass
    mapper: Any  # its frame mapper's config dataclass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, model_cls: type, mapper_cls: type) -> TrainConfig:
        """The inverse of `to_dict` (lists back to tuples where a field is a tuple)."""
        sections = {"run": RunSection, "data": DataSection, "optim": OptimSection, "model": model_cls}
        sections["mapper"] = mapper_cls
        built = {name: _section(typ, d[name]) for name, typ in sections.items()}
        return cls(d["model_name"], d["preset"], **built)


def _section(cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    fixed = {}
    for k, v in values.items():
        origin = typing.get_origin(hints.get(k))
        union_tuple = any(typing.get_origin(a) is tuple for a in typing.get_args(hints.get(k)))
        fixed[k] = tuple(v) if isinstance(v, list) and (origin is tuple or union_tuple) else v
    return cls(**fixed)


SECTIONS = ("run", "data", "optim", "model", "mapper")
# keys that moved; an override with the old name says where to
RENAMED = {
    "data.flip_prob": "data.reverse_prob",
    "data.flip": "mapper.image_flip",
    "data.photometric": "mapper.photometric",
    "data.bev_rot": "mapper.bev_rot",
    "data.rot_lim_deg": "mapper.rot_lim_deg",
    "data.with_depth": "mapper.with_depth",
}


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
    for section in SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]
    return keys


def config_diff(base: TrainConfig, cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The dotted keys whose value in `cfg` differs from `base` (e.g. the run's preset as `spec.config`
    builds it): `{"optim.lr": {"preset": 0.0002, "value": 0.0003}, ...}`, values as plain YAML/JSON types."""
    a, b = _plain(base.to_dict()), _plain(cfg.to_dict())
    diff = {}
    for section in SECTIONS:
        left, right = a.get(section) or {}, b.get(section) or {}
        for name in [*left, *(k for k in right if k not in left)]:
            if left.get(name) != right.get(name):
                diff[f"{section}.{name}"] = {"preset": left.get(name), "value": right.get(name)}
    return diff


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
        if key in RENAMED and RENAMED[key] in known:
            raise ConfigError(f"config key {key!r} is now {RENAMED[key]!r}")
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


@dataclass(frozen=True)
class Batching:
    """How the global batch is split: world_size workers x batch_size samples x accum_steps micro-batches."""

    world_size: int
    batch_size: int  # per worker and micro-batch
    accum_steps: int
    global_batch: int

    @property
    def slots_per_worker(self) -> int:
        return self.batch_size * self.accum_steps


def batching(run: RunSection, world_size: int | None = None) -> Batching:
    """The split of `run.global_batch` over the workers. The per-worker batch is lowered when the
    workers alone would exceed the global batch; the rest is gradient accumulation."""
    world = world_size or run.num_workers
    g, b = run.global_batch, run.batch_size
    if world < 1 or g < 1 or b < 1:
        raise ConfigError(f"run.num_workers ({world}), run.global_batch ({g}) and run.batch_size ({b}) must be >= 1")
    if world * b > g:
        b = g // world
    if b < 1 or g % (world * b):
        fits = [x for x in range(1, g // world + 1) if g % (world * x) == 0]
        hint = f"--batch-size one of {fits}" if fits else f"a worker count that divides {g}"
        raise ConfigError(
            f"run.global_batch={g} cannot be split over {world} worker(s) with batch {run.batch_size}: use {hint}, "
            f"or set run.global_batch to a multiple of {world} x the batch size"
        )
    return Batching(world, b, g // (world * b), g)
