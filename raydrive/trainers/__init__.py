"""Registry of trainable models. Adding a model: one module with a TrainSpec, one line below."""

from __future__ import annotations

import dataclasses

from raydrive.trainers.spec import TrainSpec

_REGISTRY: dict[str, TrainSpec] = {}


def register(spec: TrainSpec) -> TrainSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    from raydrive.trainers import sparse4d  # noqa: F401


def get_spec(name: str) -> TrainSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def model_config(name: str, preset: str = "full", **overrides):
    spec = get_spec(name)
    if preset not in spec.presets:
        raise KeyError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(spec.presets)}")
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {name} config fields {unknown}; known: {sorted(fields)}")
    return spec.config_cls(**{**spec.presets[preset], **overrides})


def build_model(name: str, preset: str = "full", anchors=None, **overrides):
    """The model as an nn.Module (random init; anchors zero unless given), e.g. for notebooks."""
    spec = get_spec(name)
    return spec.build(model_config(name, preset, **overrides), anchors)
