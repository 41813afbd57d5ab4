"""`raydrive eval MODEL --checkpoint DIR`: score a checkpoint on the val split in this process, with
the model's own evaluator (Ray Data decodes on a local or joined Ray)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

from raydrive.config import ConfigError, TrainConfig


def find_checkpoint(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A complete checkpoint folder, or a run folder's newest complete checkpoint (broken ones, such as a
    copy cut short by a full disk, are reported on stderr and skipped); errors name `flag`."""
    from raydrive.engine import checkpoint as ckpt
    from raydrive.launch.resume import newest_complete

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: no such folder; pass a checkpoint_* folder or a run folder")
    if not (path / ckpt.META_FILE).is_file() and not (path / ckpt.COMPLETE_FILE).is_file():
        found = newest_complete(path, report=lambda m: print(f"[raydrive] {m}", file=sys.stderr, flush=True))
        if found is None:
            raise ConfigError(
                f"{flag} {path} holds no complete raydrive checkpoint; pass a checkpoint_* folder or the run folder "
                f"<storage-path>/<name> of a run that wrote one"
            )
        return found
    try:
        ckpt.verify(path)
    except ckpt.BrokenCheckpoint as e:
        raise ConfigError(
            f"{flag} {path} is incomplete ({e}); pass its run folder to use its newest complete checkpoint"
        ) from None
    return path


def local_device() -> torch.device:
    """The accelerator this process can drive (outside Ray Train workers)."""
    from raydrive import accel

    kind = accel.local_kind()
    if kind == "npu":
        import torch_npu  # noqa: F401 (registers the npu device)

        torch.npu.set_device(0)
        return torch.device("npu:0")
    return torch.device("cuda:0" if kind == "cuda" else "cpu")


def checkpoint_config(
    model: str | None,
    checkpoint: str,
    prepared: str | None = None,
    dataroot: str | None = None,
    command: str = "eval",
) -> tuple[object, TrainConfig]:
    """(spec, config) of a checkpoint (or a run folder's newest), its run.load_from set to it and its data
    paths overridden where given; the model name, if given, must be the checkpoint's."""
    from raydrive.data.prepare import verify_prepared
    from raydrive.trainers import get_spec

    if model is not None:
        try:
            get_spec(model)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    path = find_checkpoint(checkpoint)
    meta = json.loads((path / "meta.json").read_text())
    if model is not None and model != meta["model"]:
        raise ConfigError(
            f"{path} is a {meta['model']} checkpoint, not {model}: run `raydrive {command} {meta['model']} ...`"
        )
    spec = get_spec(meta["model"])
    cfg = TrainConfig.from_dict(meta["config"], spec.config_cls, spec.mapper_cls)
    cfg.run = dataclasses.replace(cfg.run, load_from=str(path))
    if prepared or dataroot:
        cfg.data = dataclasses.replace(
            cfg.data, prepared=prepared or cfg.data.prepared, dataroot=dataroot or cfg.data.dataroot
        )
    verify_prepared(cfg.data.prepared)
    return spec, cfg


def evaluate_checkpoint(
    model: str | None, checkpoint: str, prepared: str | None = None, dataroot: str | None = None
) -> tuple[dict, object]:
    """(metrics, evaluator) of a raydrive checkpoint on the val split."""
    from raydrive.engine.evaluate import evaluate
    from raydrive.engine.loop import build_pipeline, load_model
    from raydrive.launch.cluster import connect_ray

    spec, cfg = checkpoint_config(model, checkpoint, prepared, dataroot)
    connect_ray()
    net = load_model(spec, cfg, local_device())
    evaluator = spec.build_evaluator(cfg)
    pipeline = build_pipeline(spec, cfg, "val", False, 1)
    return evaluate(net, evaluator, pipeline, 0, 1, contextlib.nullcontext), evaluator
