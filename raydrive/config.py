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
import math
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
    # start even when the cluster cannot host the workers yet (an autoscaling cluster adds nodes on demand)
    wait_for_resources: bool = False
    # how Ray places the workers: PACK (fewest nodes) or SPREAD (one node's loss takes fewer workers)
    placement_strategy: str = "PACK"


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
    # exponential moving average of the weights, used for evaluation and kept in checkpoints
    # (BEVDepth's `_ema` configs: 0.999); None: off
    ema_decay: float | None = None


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
            hint = f"; did you mean {', '.join(close)}?" if close else "; `--show-config` lists every key"
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


# ---------------------------------------------------------------------------------------------------------------
# Ranges, checked before Ray starts: a bad value fails in a second with the key and the fix, not on the workers.

FLAGS = {
    "run.num_workers": "--num-workers",
    "run.global_batch": "--global-batch",
    "run.batch_size": "--batch-size",
    "run.epochs": "--epochs",
    "run.max_steps": "--max-steps",
    "run.max_failures": "--max-failures",
    "run.cpus_per_worker": "--cpus-per-worker",
    "run.seed": "--seed",
}
CHOICES = {
    "run.accelerator": ("auto", "npu", "cuda", "cpu"),
    "run.backend": (None, "hccl", "nccl", "gloo"),
    "run.precision": ("auto", "fp32", "fp16", "bf16"),
    "optim.schedule": ("cosine", "multistep"),
    "run.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}
# key -> (lowest allowed, whether None is allowed); None means "unset" for optional keys
MINIMUMS = {
    "run.num_workers": (1, False),
    "run.global_batch": (1, False),
    "run.batch_size": (1, False),
    "run.epochs": (1, False),
    "run.max_steps": (1, True),
    "run.stop_at_step": (1, True),
    "run.max_failures": (-1, False),
    "run.checkpoint_every": (1, False),
    "run.keep_checkpoints": (1, False),
    "run.log_every": (1, False),
    "run.benchmark_steps": (1, False),
    "run.benchmark_warmup": (0, False),
    "data.seq_split_num": (1, False),
    "data.max_tasks": (1, False),
    "data.prefetch_batches": (0, False),
    "optim.warmup_iters": (0, False),
    "optim.lr": (0, False),  # 0 freezes the weights (a check run)
    "optim.weight_decay": (0, False),
}
POSITIVE = ("run.cpus_per_worker", "data.cpus_per_task", "optim.grad_clip", "optim.gamma")
FRACTIONS = ("optim.min_lr_ratio",)  # [0, 1]; fields named *_prob too, in every section


def _name(key: str, value) -> str:
    flag = FLAGS.get(key)
    return f"{flag} {value}" if flag else f"{key}={value}"


def _fix(key: str, what: str) -> str:
    flag = FLAGS.get(key)
    return f"pass {flag} with a value {what}" if flag else f"set {key} to a value {what}"


def _range_problem(key: str, value) -> str | None:
    """What is wrong with one shared key's value, or None."""
    if key in CHOICES and value not in CHOICES[key]:
        shown = ", ".join(str(c) for c in CHOICES[key] if c is not None)
        return f"{_name(key, value)}: not one of {shown}; choose one of them"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_name(key, value)}: not a finite number; give a finite one"
    if key in MINIMUMS and value < MINIMUMS[key][0]:
        low, optional = MINIMUMS[key]
        unset = f", or leave {FLAGS.get(key, key)} out" if optional else ""
        return f"{_name(key, value)}: must be >= {low}; {_fix(key, f'>= {low}')}{unset}"
    if key in POSITIVE and value <= 0:
        return f"{_name(key, value)}: must be > 0; {_fix(key, '> 0')}"
    if (key in FRACTIONS or key.endswith("_prob")) and not 0 <= value <= 1:
        return f"{_name(key, value)}: must be within [0, 1]; {_fix(key, 'from 0 to 1')}"
    return None


def _tuple_problem(key: str, hint, value, default) -> str | None:
    """A fixed-length tuple field (e.g. `tuple[float, float]`) holding another number of items."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not tuple else [hint]
    for a in args:
        if typing.get_origin(a) is tuple:
            items = typing.get_args(a)
            fixed = items and Ellipsis not in items
            if fixed and isinstance(value, (tuple, list)) and len(value) != len(items):
                fits = isinstance(default, tuple) and len(default) == len(items)
                example = ",".join(str(v) for v in default) if fits else ",".join(["..."] * len(items))
                return (
                    f"{key}={tuple(value)}: needs {len(items)} values, got {len(value)}; "
                    f"give {len(items)} comma-separated values, e.g. {key}=({example})"
                )
    return None


def _section_problems(section_name: str, section) -> list[str]:
    hints = typing.get_type_hints(type(section))
    problems = []
    for f in dataclasses.fields(section):
        key, value = f"{section_name}.{f.name}", getattr(section, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        problems.append(_range_problem(key, value) or _tuple_problem(key, hints.get(f.name), value, default))
    return [p for p in problems if p]


def _cross_problems(cfg: TrainConfig) -> list[str]:
    """Checks that involve two keys."""
    r, o = cfg.run, cfg.optim
    out = []
    if r.benchmark and r.benchmark_warmup >= r.benchmark_steps:
        out.append(
            f"run.benchmark_warmup={r.benchmark_warmup} leaves none of run.benchmark_steps={r.benchmark_steps} to "
            f"time; set run.benchmark_warmup below run.benchmark_steps"
        )
    ms = list(o.milestones)
    if ms and (any(not 0 < m < 1 for m in ms) or ms != sorted(ms)):
        out.append(f"optim.milestones={tuple(ms)}: fractions of the run in (0, 1), increasing; e.g. (0.7,0.9)")
    if isinstance(o.loss_scale, str) and o.loss_scale != "dynamic":
        out.append(f"optim.loss_scale={o.loss_scale!r}: give dynamic or a number > 0")
    elif not isinstance(o.loss_scale, str) and not o.loss_scale > 0:
        out.append(f"optim.loss_scale={o.loss_scale}: give dynamic or a number > 0")
    bad_mults = {k: v for k, v in o.lr_mults.items() if not (math.isfinite(v) and v >= 0)}
    if bad_mults:
        out.append(f"optim.lr_mults={bad_mults}: multipliers must be finite and >= 0")
    if not 0 < o.warmup_ratio <= 1:
        out.append(f"optim.warmup_ratio={o.warmup_ratio}: must be within (0, 1]; e.g. optim.warmup_ratio=0.333")
    return out


def check_ranges(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first out-of-range value (shared sections: ranges and choices; every
    section, the model's included: finite numbers, probabilities in [0, 1], fixed-length tuples)."""
    problems = []
    for section in SECTIONS:
        problems += _section_problems(section, getattr(cfg, section))
    problems += _cross_problems(cfg)
    if problems:
        raise ConfigError(problems[0])
