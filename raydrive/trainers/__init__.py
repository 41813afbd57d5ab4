"""The registry of trainable models. Adding a model: one module that registers its ModelSpec, and
one line in `_load_builtin`."""

from __future__ import annotations

import dataclasses

from raydrive.spec import ModelSpec

_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a model (for specs registered by tests)."""
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    from raydrive.trainers import bevdepth, sparse4d, sparsedrive, streampetr  # noqa: F401


def get_spec(name: str) -> ModelSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_model(name: str, preset: str = "full", assets: dict | None = None, **overrides):
    """The model as a plain nn.Module (random init; assets such as anchors zero unless given as
    {asset name: path}), e.g. for notebooks. `overrides` are fields of the model's config."""
    spec = get_spec(name)
    cfg = spec.config(preset).model
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {name} config fields {unknown}; known: {sorted(fields)}")
    return spec.build_model(dataclasses.replace(cfg, **overrides), assets or {})
