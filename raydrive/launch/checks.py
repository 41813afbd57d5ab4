"""Checks the driver runs before it starts workers, so that what can be known there fails in seconds
with one line (the key, file or resource and the fix) instead of on the workers after Ray starts:
`--load-from` fits the model, the storage path is writable, the cluster can host the workers and
still run the Ray Data decode tasks."""

from __future__ import annotations

import uuid
from pathlib import Path

from raydrive.config import ConfigError, TrainConfig, batching

# ---- --load-from ---------------------------------------------------------------------------------------------


def _meta_mode():
    """A torch function mode that allocates new parameters and buffers on the meta device (no memory,
    no init cost) while `torch.tensor(data)` stays on the CPU, so that inits which read a value work."""
    import torch
    from torch.overrides import TorchFunctionMode

    constructors = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint}
    constructors |= {torch.arange, torch.linspace, torch.eye, torch.empty_strided, torch.normal}

    class Meta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in constructors and kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    return Meta()


def _built(spec, model_cfg):
    """The model (no assets), built mostly on the meta device (a full-size network in a fraction of a
    second), on the CPU where its code needs real tensors."""
    try:
        with _meta_mode():
            return spec.build_model(model_cfg, {})
    except Exception:  # e.g. an init that computes with its parameters' values
        return spec.build_model(model_cfg, {})


def _shapes(spec, model_cfg) -> dict[str, tuple]:
    """The state dict's key -> shape of the model."""
    return {k: tuple(v.shape) for k, v in _built(spec, model_cfg).state_dict().items()}


def _mismatch(expected: dict[str, tuple], given: dict[str, tuple]) -> tuple[list, list, list]:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {given[k]} vs {expected[k]}" for k in expected if k in given and given[k] != expected[k]]
    return missing, unexpected, shapes


def fitting_presets(spec, given: dict[str, tuple]) -> list[str]:
    """The model's presets whose network has exactly these keys and shapes."""
    fits = []
    for preset in spec.presets:
        if not any(_mismatch(_shapes(spec, spec.config(preset).model), given)):
            fits.append(preset)
    return fits


def _checkpoint_meta(path: Path) -> dict | None:
    """meta.json of a raydrive checkpoint (the folder or its model.pt), None for other files."""
    import json

    from raydrive.engine.checkpoint import META_FILE

    meta = (path if path.is_dir() else path.parent) / META_FILE
    try:
        return json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        return None


def check_load_from_fits(cfg: TrainConfig, path: Path) -> None:
    """`--load-from` holds weights of this model and preset (keys and shapes); otherwise say which
    model or preset they fit. Reads the file without running code unless --trust-checkpoint."""
    from raydrive.engine import checkpoint as ckpt
    from raydrive.trainers import get_spec

    given_as = cfg.run.load_from
    meta = _checkpoint_meta(path)
    if meta is not None and meta.get("model") not in (None, cfg.model_name):
        raise ConfigError(
            f"--load-from {given_as}: a {meta['model']} checkpoint, not {cfg.model_name}; train {meta['model']} "
            f"with it, or give a {cfg.model_name} checkpoint"
        )
    try:
        state = ckpt.load_weights(path, cfg.run.trust_checkpoint)
    except ConfigError:
        raise
    except Exception as e:  # a truncated or foreign file: torch's own error, in one line
        raise ConfigError(
            f"--load-from {given_as}: cannot be read ({type(e).__name__}: {e}); give a complete .pth"
        ) from None
    given = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    spec = get_spec(cfg.model_name)
    model = _built(spec, cfg.model)
    missing, unexpected, shapes = _mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, given)
    # keys a --load-from may lack: the model's `fresh_on_load` prefixes (SparseDrive stage 2's planner,
    # which starts fresh from stage 1's weights)
    fresh = tuple(getattr(model, "fresh_on_load", ()))
    missing = [k for k in missing if not (fresh and k.startswith(fresh))]
    if not (missing or unexpected or shapes):
        return
    fits = fitting_presets(spec, given)
    if fits:
        hint = f"it fits --preset {' or --preset '.join(fits)}"
    elif meta is not None:
        hint = f"it was trained as {meta.get('model')} {meta.get('preset')} with other model.* values (its meta.json)"
    else:
        hint = f"it fits no preset of {cfg.model_name} ({', '.join(spec.presets)})"
    what = []
    if missing:
        what.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        what.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        what.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    raise ConfigError(f"--load-from {given_as} does not fit {cfg.model_name} ({cfg.preset}): {', '.join(what)}; {hint}")


# ---- storage -------------------------------------------------------------------------------------------------


def check_storage(storage: str) -> None:
    """The storage path can take a file: a probe file is written (and removed) in it or, while it does
    not exist yet, in its nearest existing parent, so that nothing is created before the run starts.
    Object storage is checked by Ray itself."""
    if "://" in storage:
        return
    root = Path(storage)
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    problem = None if existing.is_dir() else f"{existing} is a file"
    if problem is None:
        probe = existing / f".raydrive-write-test-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise ConfigError(
            f"--storage-path {storage} is not writable ({problem}); fix its permissions or free space, or pass "
            f"another --storage-path"
        )


# ---- resources -----------------------------------------------------------------------------------------------


def _fits(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers of `per_worker` resources one node can host."""
    counts = [int(node.get(k, 0) // v + 1e-9) for k, v in per_worker.items() if v > 0]
    return min(counts) if counts else 0


def resource_problem(cfg: TrainConfig, per_worker: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster (alive nodes' total resources) cannot run this: too few workers fit on its nodes,
    or the workers leave no CPU for the Ray Data tasks that decode their frames. None when it can."""
    workers = batching(cfg.run).world_size
    hosted = sum(_fits(n, per_worker) for n in nodes)
    need = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    have = "; ".join(", ".join(f"{n.get(k, 0):g} {k}" for k in per_worker) for n in nodes) or "no live nodes"
    if hosted < workers:
        return (
            f"--num-workers {workers} workers x ({need}) do not fit the cluster's nodes ({have}): it can host "
            f"{hosted}; use --num-workers {max(hosted, 1)} or a smaller --cpus-per-worker, or add nodes (on an "
            f"autoscaling cluster pass run.wait_for_resources=true)"
        )
    cpus = sum(n.get("CPU", 0) for n in nodes)
    left = cpus - workers * per_worker.get("CPU", 0)
    task = cfg.data.cpus_per_task
    if left + 1e-9 < task * workers:
        most = (cpus - task * workers) / workers
        fix = f"--cpus-per-worker {most:g} or less" if most > 0 else "fewer workers"
        return (
            f"{workers} worker(s) x {per_worker.get('CPU', 0):g} CPU leave {max(left, 0):g} of the cluster's "
            f"{cpus:g} CPUs for the Ray Data decode tasks, which need data.cpus_per_task={task:g} each (one per "
            f"worker at least), so no step would ever run; use {fix}, or lower data.cpus_per_task"
        )
    return None


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: TrainConfig, per_worker: dict[str, float]) -> None:
    problem = resource_problem(cfg, per_worker, alive_nodes())
    if problem is None:
        return
    if cfg.run.wait_for_resources:
        print(f"[raydrive] waiting for resources: {problem}", flush=True)
        return
    raise ConfigError(problem)
