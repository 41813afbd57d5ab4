"""`python -m raydrive.train MODEL [--flags] [section.key=value ...]`: the driver side of a run.

It resolves the config (model preset + per-model defaults + flags + overrides), makes sure prepared
data exists (the embedded synthetic set when nothing is given), connects to the Ray cluster it runs
on (RAY_ADDRESS, or the one `ray job submit` started it on) or starts a local one, asks the
accelerator layer what to request, and runs Ray Train's TorchTrainer with the model's train loop.
Re-running with the same --name and --storage-path resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from raydrive.config import ConfigError, DataSection, OptimSection, RunSection, TrainConfig, apply_overrides


def build_parser() -> argparse.ArgumentParser:
    from raydrive.trainers import list_models

    p = argparse.ArgumentParser(
        prog="python -m raydrive.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", choices=list_models())
    p.add_argument(
        "--preset",
        default=None,
        help="full (upstream config) or small (CPU-sized); default: small "
        "on the embedded synthetic set, full otherwise",
    )
    p.add_argument("--dataroot", help="nuScenes tree (default: the embedded synthetic set)")
    p.add_argument("--prepared", help="output of `raydrive prepare` (default: DATAROOT/raydrive-prepared)")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--storage-path", help="where checkpoints go; shared storage (NFS, S3) on multi-node clusters")
    p.add_argument("--name", help="run name; the same name and storage path resume a run")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--accelerator", choices=["auto", "npu", "cuda", "cpu"])
    p.add_argument("--backend", choices=["hccl", "nccl", "gloo"])
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="worker environment variable (repeatable), e.g. HCCL_CONNECT_TIMEOUT=3600; wins over defaults",
    )
    p.add_argument(
        "--benchmark", action="store_true", help="run a fixed number of steps and print the performance table"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--load-from", help="weights to start from: an upstream .pth or a raydrive checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the val evaluation after training")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def resolve_config(args) -> TrainConfig:
    from raydrive.trainers import get_spec, model_config

    spec = get_spec(args.model)
    embedded = args.dataroot is None and args.prepared is None
    preset = args.preset or ("small" if embedded else "full")
    if preset not in spec.presets:
        raise ConfigError(f"model {args.model} has no preset {preset!r} (presets: {', '.join(spec.presets)})")
    defaults = spec.defaults.get(preset, {})
    cfg = TrainConfig(
        args.model,
        preset,
        RunSection(**defaults.get("run", {})),
        DataSection(**defaults.get("data", {})),
        OptimSection(**defaults.get("optim", {})),
        model_config(args.model, preset),
    )
    flags = {
        "run": dict(
            num_workers=args.num_workers,
            batch_size=args.batch_size,
            epochs=args.epochs,
            max_steps=args.max_steps,
            storage_path=args.storage_path,
            name=args.name,
            max_failures=args.max_failures,
            precision=args.precision,
            accelerator=args.accelerator,
            backend=args.backend,
            cpus_per_worker=args.cpus_per_worker,
            seed=args.seed,
            load_from=args.load_from,
            benchmark=args.benchmark or None,
            evaluate=False if args.no_eval else None,
        ),
        "data": dict(dataroot=args.dataroot, prepared=args.prepared),
    }
    for section, values in flags.items():
        values = {k: v for k, v in values.items() if v is not None}
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return apply_overrides(cfg, args.overrides)


def resolve_data(cfg: TrainConfig) -> None:
    """Absolute data paths; the embedded set is synthesised and prepared on first use."""
    from raydrive.data.prepare import MANIFEST, PrepareConfig, prepare

    d = cfg.data
    if d.dataroot is None and d.prepared is None:
        from raydrive.data.default import ensure_default_data

        dataroot, prepared = ensure_default_data()
    else:
        dataroot = Path(d.dataroot).resolve() if d.dataroot else None
        prepared = Path(d.prepared).resolve() if d.prepared else dataroot / "raydrive-prepared"
        if not (prepared / MANIFEST).is_file():
            if dataroot is None:
                raise ConfigError(f"--prepared {prepared} has no {MANIFEST}; run `raydrive prepare` or give --dataroot")
            version = next((v for v in ("v1.0-trainval", "v1.0-mini") if (dataroot / v).is_dir()), "v1.0-mini")
            prepare(PrepareConfig(out=str(prepared), dataroot=str(dataroot), version=version))
    cfg.data = dataclasses.replace(d, dataroot=str(dataroot) if dataroot else None, prepared=str(prepared))


def _local_cluster_address() -> str | None:
    """The address of a cluster started with `ray start` on this machine, if it is alive."""
    import socket

    marker = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        address = marker.read_text().strip().splitlines()[0]
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError, IndexError):
        return None


def connect_ray():
    """Join the cluster this runs on (RAY_ADDRESS, which `ray job submit` sets, or a live `ray start`
    cluster on this machine), else start a local Ray with more logical CPUs than cores (on a small
    machine, workers holding whole CPUs would starve Ray Data's tasks)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS") or _local_cluster_address()
    if address:
        ray.init(address=address, log_to_driver=True)
        print(f"[raydrive] connected to the Ray cluster at {address}", flush=True)
    else:
        cpus = max(4, 2 * (os.cpu_count() or 1))
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}},
        )
        print(f"[raydrive] started a local Ray instance ({cpus} logical CPUs on {os.cpu_count()} cores)", flush=True)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--env {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        env[key.strip()] = value
    return env


def run(cfg: TrainConfig, env: dict[str, str] | None = None):
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydrive import accel
    from raydrive.data.synth import default_cache_dir
    from raydrive.engine.loop import train_loop

    connect_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    r = cfg.run
    plan = accel.plan(
        ray.cluster_resources(),
        accelerator=r.accelerator,
        backend=r.backend,
        precision=r.precision,
        cpus_per_worker=r.cpus_per_worker,
        env_overrides=env,
    )
    name = r.name or f"{cfg.model_name}-{cfg.preset}" + ("-benchmark" if r.benchmark else "")
    storage = str(Path(r.storage_path or default_cache_dir() / "runs").resolve())
    cfg.run = dataclasses.replace(r, name=name, storage_path=storage)
    print(
        f"[raydrive] {cfg.model_name} ({cfg.preset}) on {r.num_workers} {plan.kind} worker(s), backend {plan.backend} "
        f"({plan.reason}), precision {plan.precision}",
        flush=True,
    )
    print("[raydrive] resolved config:\n" + cfg.to_yaml(), flush=True)
    run_dir = Path(storage) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "raydrive_config.yaml").write_text(cfg.to_yaml())

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "accelerator": plan.kind, "precision": plan.precision},
        torch_config=TorchConfig(backend=plan.backend),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=plan.use_gpu, resources_per_worker=plan.resources_per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
            worker_runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0", **plan.env}},
        ),
    )
    result = trainer.fit()
    return result


def report(cfg: TrainConfig, result) -> None:
    m = result.metrics or {}
    if cfg.run.benchmark:
        path = Path(cfg.run.storage_path) / cfg.run.name / "benchmark.json"
        m = json.loads(path.read_text()) if path.is_file() else m
        print("\n| model | preset | workers | global batch | mean step time (s) | FPS (samples/s) |")
        print("|---|---|---|---|---|---|")
        print(
            f"| {cfg.model_name} | {cfg.preset} | {cfg.run.num_workers} | {m.get('global_batch')} | "
            f"{m.get('mean_step_time_s', float('nan')):.3f} | {m.get('fps', float('nan')):.2f} |"
        )
        print(
            f"(mean over {m.get('steps_timed')} steps after {cfg.run.benchmark_warmup} warm-up steps; "
            f"one sample = one 6-camera frame)"
        )
        return
    if "mAP" in m:
        from raydrive.eval.detection import format_table

        print("\n" + format_table(m["eval_metrics"]))
        if m.get("mAP_before") is not None:
            print(f"\n[raydrive] val before training: mAP {m['mAP_before']:.4f}  NDS {m['NDS_before']:.4f}")
        print(f"[raydrive] val after training:  mAP {m['mAP']:.4f}  NDS {m['NDS']:.4f}")
    if result.checkpoint is not None:
        print(f"[raydrive] checkpoint: {result.checkpoint.path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = resolve_config(args)
        env = parse_env(args.env)
        resolve_data(cfg)
    except (ConfigError, KeyError) as e:
        print(f"raydrive train: error: {e}", file=sys.stderr)
        return 2
    result = run(cfg, env)
    report(cfg, result)
    if result.error:
        print(f"raydrive train: the run failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def evaluate_checkpoint(checkpoint: str, prepared: str | None = None, dataroot: str | None = None) -> dict:
    """Score a raydrive checkpoint on the val split in this process (Ray Data runs on a local Ray)."""
    import json

    import torch

    from raydrive import accel
    from raydrive.engine import checkpoint as ckpt
    from raydrive.engine.loop import build_model, config_from_dict, evaluate_on_workers
    from raydrive.trainers import get_spec

    path = Path(checkpoint)
    if path.is_dir() and not (path / ckpt.META_FILE).is_file():  # a run folder: take its latest checkpoint
        found = sorted(p for p in path.glob("checkpoint_*") if (p / ckpt.META_FILE).is_file())
        path = found[-1] if found else path
    meta_file = path / ckpt.META_FILE
    if not meta_file.is_file():
        raise ConfigError(
            f"{path} is not a raydrive checkpoint (no {ckpt.META_FILE}); pass a checkpoint_* folder "
            f"or the run folder <storage-path>/<name>"
        )
    cfg = config_from_dict(json.loads(meta_file.read_text())["config"])
    cfg.run = dataclasses.replace(cfg.run, load_from=str(path))
    if prepared or dataroot:
        cfg.data = dataclasses.replace(
            cfg.data, prepared=prepared or cfg.data.prepared, dataroot=dataroot or cfg.data.dataroot
        )
    spec = get_spec(cfg.model_name)
    connect_ray()
    kind = accel.local_kind()
    device = torch.device("cuda" if kind == "cuda" else "cpu")
    model = build_model(cfg, spec, device)
    return evaluate_on_workers(model, cfg, spec, 0, 1, None)
