"""`python -m raydrive.train MODEL [--flags] [section.key=value ...]`: the driver side of a run.

It resolves the config (the model's typed preset + flags + overrides), makes sure prepared data and
the model's assets exist (the embedded synthetic set when nothing is given), connects to the Ray
cluster it runs on (RAY_ADDRESS, or the one `ray job submit` started it on) or starts a local one,
asks the accelerator layer what to request, and runs Ray Train's TorchTrainer with the model's train
loop, once per stage. Re-running with the same --name and --storage-path resumes from the latest
checkpoint (a staged run skips the stages it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from raydrive.config import ConfigError, TrainConfig, apply_overrides, batching, check_ranges
from raydrive.data.infos import DataError
from raydrive.errors import RunFailed, failure_line, failure_traceback

DONE_FILE = "raydrive_done.json"  # written into a run folder when its stage finished


def storage_root(storage_path: str | None) -> Path:
    """Where run folders go: `--storage-path`, or `<cache>/runs`."""
    from raydrive.data.synth import default_cache_dir

    return Path(storage_path or default_cache_dir() / "runs").resolve()


def default_name(model: str, preset: str, benchmark: bool) -> str:
    return f"{model}-{preset}" + ("-benchmark" if benchmark else "")


def build_parser() -> argparse.ArgumentParser:
    from raydrive.trainers import get_spec, list_models

    models = "\n".join(f"  {m:<12} {get_spec(m).description}" for m in list_models())
    p = argparse.ArgumentParser(
        prog="python -m raydrive.train",
        description=f"{__doc__}\nmodels:\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=list_models())
    p.add_argument(
        "--preset",
        default=None,
        help="a preset of the model (e.g. full = the upstream config, small = CPU-sized); default: the "
        "model's embedded preset on the embedded synthetic set, its full preset otherwise",
    )
    p.add_argument("--dataroot", help="nuScenes tree (default: the embedded synthetic set)")
    p.add_argument("--prepared", help="output of `raydrive prepare` (default: DATAROOT/raydrive-prepared)")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--global-batch", type=int, help="samples per optimizer step, kept for any worker count")
    p.add_argument("--batch-size", type=int, help="per worker and micro-batch (the rest is gradient accumulation)")
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
    p.add_argument(
        "--load-from",
        help="weights to start from: an upstream .pth, a raydrive checkpoint or a run folder (its newest complete "
        "checkpoint); for a staged preset, the first stage that runs starts from them",
    )
    p.add_argument(
        "--stage",
        type=int,
        default=1,
        help="start a staged preset at this stage (1-based), e.g. `sparsedrive --stage 2 --load-from CKPT`; "
        "without --load-from, from the earlier stage's final checkpoint under the same --name",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let --load-from unpickle objects other than tensors and numpy arrays (old pickled checkpoints; "
        "this can run code from the file)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the val evaluation after training")
    p.add_argument(
        "--show-config", action="store_true", help="print the resolved config (every key) and exit, without Ray"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output (workers, Ray Train, Ray Data) on the console too; it always goes to "
        "<run folder>/ray.log",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def _flags(args) -> dict[str, dict]:
    run = dict(
        num_workers=args.num_workers,
        global_batch=args.global_batch,
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
        trust_checkpoint=args.trust_checkpoint or None,
        benchmark=args.benchmark or None,
        evaluate=False if args.no_eval else None,
    )
    data = dict(dataroot=args.dataroot, prepared=args.prepared)
    return {"run": run, "data": data}


def chosen_preset(args) -> str:
    from raydrive.trainers import get_spec

    spec = get_spec(args.model)
    embedded = args.dataroot is None and args.prepared is None
    return args.preset or (spec.embedded_preset if embedded else spec.default_preset)


def resolve_config(args, preset: str | None = None) -> TrainConfig:
    """One preset's config with the flags and overrides applied (validated before Ray starts)."""
    from raydrive.trainers import get_spec

    spec = get_spec(args.model)
    preset = preset or chosen_preset(args)
    if preset in spec.stages:
        raise ConfigError(f"preset {preset!r} of {args.model} is staged {spec.stages[preset]}: use resolve_stages")
    try:
        cfg = spec.config(preset)
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    for section, values in _flags(args).items():
        values = {k: v for k, v in values.items() if v is not None}
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    cfg = apply_overrides(cfg, args.overrides)
    check_ranges(cfg)
    batching(cfg.run)  # a global batch that cannot be split is an error now, not on the workers
    return cfg


def resolve_stages(args) -> list[TrainConfig]:
    """The configs of every stage the chosen preset trains, named `<name>` (one stage) or
    `<name>-<stage preset>`."""
    from raydrive.trainers import get_spec

    spec = get_spec(args.model)
    preset = chosen_preset(args)
    stages = spec.stage_presets(preset)
    if not 1 <= args.stage <= len(stages):
        raise ConfigError(
            f"--stage {args.stage}: preset {preset!r} of {args.model} has stages 1-{len(stages)} {stages}"
        )
    base = args.name or default_name(args.model, preset, args.benchmark)
    cfgs = []
    for stage in stages[args.stage - 1 :]:
        cfg = resolve_config(args, stage)
        cfg.run = dataclasses.replace(cfg.run, name=base if len(stages) == 1 else f"{base}-{stage}")
        if cfgs:  # --load-from is where the first stage that runs starts; later ones follow their preset
            cfg.run = dataclasses.replace(cfg.run, load_from=spec.config(stage).run.load_from)
        cfgs.append(cfg)
    return cfgs


def resolve_data(cfg: TrainConfig) -> None:
    """Absolute data paths; the embedded set is synthesised and prepared on first use; the model's
    assets are made if the prepared folder lacks them."""
    from raydrive.data.assets import ensure_assets
    from raydrive.data.prepare import MANIFEST, PrepareConfig, prepare, verify_prepared
    from raydrive.trainers import get_spec

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
            assets = get_spec(cfg.model_name).assets  # only this model's (SparseDrive's fields take long)
            prepare(PrepareConfig(out=str(prepared), dataroot=str(dataroot), version=version, assets=assets))
    verify_prepared(prepared)
    ensure_assets(prepared, get_spec(cfg.model_name).assets)
    cfg.data = dataclasses.replace(d, dataroot=str(dataroot) if dataroot else None, prepared=str(prepared))
    check_load_from(cfg)


def check_load_from(cfg: TrainConfig) -> None:
    """`--load-from` exists, is complete, loads without running code (or is trusted) and fits the model,
    before Ray starts."""
    from raydrive.engine import checkpoint as ckpt
    from raydrive.launch.checks import check_load_from_fits
    from raydrive.safe_pickle import checkpoint_globals

    given = cfg.run.load_from
    if not given or given.startswith("stage:"):
        return
    folder = Path(given) if Path(given).is_dir() else None
    if folder is not None and not (folder / ckpt.MODEL_FILE).is_file():  # a run folder: its newest complete one
        from raydrive.launch.evaluate import find_checkpoint

        folder = find_checkpoint(folder, flag="--load-from")
        print(f"[raydrive] --load-from {given}: its newest complete checkpoint, {folder.name}", flush=True)
        cfg.run = dataclasses.replace(cfg.run, load_from=str(folder))
    path = folder / ckpt.MODEL_FILE if folder else Path(given)
    if not path.is_file():
        raise ConfigError(
            f"--load-from {given}: no such checkpoint file; give an upstream .pth, a checkpoint folder or a run folder"
        )
    if folder is not None and (folder / ckpt.META_FILE).is_file():
        try:
            ckpt.verify(folder)
        except ckpt.BrokenCheckpoint as e:
            raise ConfigError(
                f"--load-from {given}: incomplete checkpoint ({e}); give a complete one (its run folder "
                f"lists them: raydrive eval picks the newest complete)"
            ) from None
    if not cfg.run.trust_checkpoint:
        checkpoint_globals(path)
    check_load_from_fits(cfg, path)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--env {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        env[key.strip()] = value
    return env


def _schedule(cfg: TrainConfig) -> tuple[int, int, int]:
    """(train frames, optimizer steps per epoch, total steps) as the workers will count them."""
    from raydrive.data.prepare import load_manifest

    frames = load_manifest(cfg.data.prepared)["splits"].get("train", {}).get("frames", 0)
    per_epoch = max(1, frames // batching(cfg.run).global_batch)
    r = cfg.run
    return frames, per_epoch, r.benchmark_steps if r.benchmark else (r.max_steps or r.epochs * per_epoch)


def schedule_line(cfg: TrainConfig) -> str:
    """World size, per-worker batch, accumulation, global batch, steps per epoch and total steps."""
    b = batching(cfg.run)
    frames, per_epoch, total = _schedule(cfg)
    return (
        f"[raydrive] {b.world_size} worker(s) x batch {b.batch_size} x {b.accum_steps} accumulation step(s) = "
        f"global batch {b.global_batch}; {per_epoch} steps per epoch ({frames} train frames), {total} steps in all"
    )


def run(cfg: TrainConfig, env: dict[str, str] | None = None, verbose: bool = False):
    """One stage through Ray Train's TorchTrainer; returns Ray's Result. Raises RunFailed (one line) when
    the workers fail, RunInterrupted on Ctrl-C, ConfigError when the cluster cannot run it. Ray's own
    output goes to `<run folder>/ray.log` (and the console too when `verbose`)."""
    from raydrive.launch.checks import check_storage
    from raydrive.launch.console import RAY_LOG, RayOutput

    r = cfg.run
    name = r.name or default_name(cfg.model_name, cfg.preset, r.benchmark)
    storage = str(storage_root(r.storage_path))
    check_storage(storage)
    with RayOutput(Path(storage) / name / RAY_LOG, verbose) as ray_output:
        return _run(cfg, env, name, storage, ray_output)


def _run(cfg: TrainConfig, env: dict[str, str] | None, name: str, storage: str, ray_output):
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from raydrive import accel
    from raydrive.launch import runcard
    from raydrive.launch.checks import check_resources
    from raydrive.launch.cluster import connect_ray
    from raydrive.launch.console import RAY_LOG, ProgressConsole
    from raydrive.launch.resume import prepare_resume
    from raydrive.launch.trainer import RaydriveTrainer
    from raydrive.trainers import get_spec

    spec = get_spec(cfg.model_name)
    r = cfg.run
    connect_ray()
    ray_output.quiet_loggers()
    ray_output.capture_workers()
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = accel.plan(
        ray.cluster_resources(),
        accelerator=r.accelerator,
        backend=r.backend,
        precision=r.precision,
        cpus_per_worker=r.cpus_per_worker,
        env_overrides=env,
    )
    check_resources(cfg, plan.resources_per_worker)
    cfg.run = dataclasses.replace(r, name=name, storage_path=storage)
    print(
        f"[raydrive] {cfg.model_name} ({cfg.preset}) on {r.num_workers} {plan.kind} worker(s), backend {plan.backend} "
        f"({plan.reason}), precision {plan.precision}",
        flush=True,
    )
    print(schedule_line(cfg), flush=True)
    run_dir = Path(storage) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    ray_output.open_log()
    resume_from = prepare_resume(run_dir)
    (run_dir / "raydrive_config.yaml").write_text(cfg.to_yaml())
    print(config_summary(cfg, spec.config(cfg.preset), run_dir / "raydrive_config.yaml"), flush=True)
    total = _schedule(cfg)[2]
    card = runcard.start_card(cfg, spec.config(cfg.preset), total)
    runcard.write_card(run_dir, card)
    print(f"[raydrive] run folder: {run_dir} (run_card.json, {RAY_LOG}; TensorBoard: tensorboard --logdir {storage})")

    console = ProgressConsole(name, total)
    loop_config = {
        "config": cfg.to_dict(),
        "accelerator": plan.kind,
        "precision": plan.precision,
        "progress": console.board,
    }
    trainer = RaydriveTrainer(
        spec.train_loop,
        train_loop_config={**loop_config, "resume_from": resume_from},
        torch_config=TorchConfig(backend=plan.backend),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources_per_worker,
            placement_strategy=r.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
            worker_runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0", **plan.env}},
        ),
    )
    try:
        with console:
            result = trainer.fit()
    except BaseException as e:  # Ray Train raises (rather than returns) failures once retries are used up; Ctrl-C
        _stopped(cfg, run_dir, card, e, trainer.interrupted)
    _write_card(run_dir, runcard.end_card(card, status(cfg, result), result, spec.build_evaluator(cfg).headline))
    from raydrive.viz.curves import pictures_after_training  # curves.png; says where the pictures are

    pictures_after_training(run_dir)
    return result


HIDDEN_IN_SUMMARY = ("data.dataroot", "data.prepared", "run.name", "run.storage_path")  # printed elsewhere


def config_summary(cfg: TrainConfig, preset_cfg: TrainConfig, path: Path) -> str:
    """One line: the preset and what differs from it (the whole config is in the run folder)."""
    from raydrive.config import config_diff

    diff = config_diff(preset_cfg, cfg)
    shown = ", ".join(f"{k}={v['value']}" for k, v in diff.items() if k not in HIDDEN_IN_SUMMARY)
    return f"[raydrive] config: preset {cfg.preset}" + (f" with {shown}" if shown else "") + f" (all of it: {path})"


def _write_card(run_dir: Path, card: dict) -> None:
    """The run card, unless the storage cannot take it (a full disk must not hide the run's own error)."""
    from raydrive.launch import runcard

    try:
        runcard.write_card(run_dir, card)
    except OSError as e:
        print(f"[raydrive] could not update {run_dir / runcard.RUN_CARD}: {e.strerror or e}", flush=True)


def _stopped(cfg: TrainConfig, run_dir: Path, card: dict, error: BaseException, interrupted: bool):
    """Record how fit() ended in the run card and raise what the driver reports: RunInterrupted after
    Ctrl-C (saying where it resumes), else RunFailed with the failure's one line."""
    from raydrive.errors import RunInterrupted
    from raydrive.launch import runcard
    from raydrive.launch.resume import newest_complete

    if interrupted or isinstance(error, KeyboardInterrupt):
        newest = newest_complete(run_dir, report=lambda _: None)
        where = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint was written yet"
        _write_card(run_dir, runcard.end_card(card, "paused", error="interrupted (Ctrl-C)"))
        raise RunInterrupted(
            f"stopped by Ctrl-C; {where}; run the same command (--name {cfg.run.name} --storage-path "
            f"{cfg.run.storage_path}) again to resume"
        ) from None
    line = failure_line(error)
    details = failure_traceback(error)
    if details:  # an unexpected worker error: its traceback, whole, before the driver's last line
        print(f"[raydrive] the run failed with:\n{details}", file=sys.stderr, flush=True)
    _write_card(run_dir, runcard.end_card(card, "failed", error=line))
    raise RunFailed(line) from error


def status(cfg: TrainConfig, result) -> str:
    """The run card's status of a stage that Ray Train returned: failed, finished or paused."""
    if result.error is not None:
        return "failed"
    if finished(result) or cfg.run.benchmark:  # a benchmark's report carries no checkpoint, so no metrics
        return "finished"
    return "paused"


def finished(result) -> bool:
    """Did the stage run to its last step (not paused, not failed)?"""
    return result.error is None and bool((result.metrics or {}).get("finished"))


def run_stages(cfgs: list[TrainConfig], env: dict[str, str] | None = None, verbose: bool = False) -> list:
    """Run the stages in order; a later stage's `run.load_from = "stage:<preset>"` is the final
    checkpoint of that earlier stage. Stages that finished before (their run folder holds DONE_FILE)
    are skipped, so a re-run continues in the stage it stopped in. A `--benchmark` times every stage on
    its own: a later stage starts from fresh weights (timing needs none) and nothing is marked finished."""
    results = []
    for cfg in cfgs:
        storage = storage_root(cfg.run.storage_path)
        done = storage / cfg.run.name / DONE_FILE
        if cfg.run.benchmark:
            if (cfg.run.load_from or "").startswith("stage:"):
                cfg.run = dataclasses.replace(cfg.run, load_from=None)
            result = run(cfg, env, verbose)
            results.append((cfg, result))
            if result.error:
                break
            continue
        if len(cfgs) > 1 and done.is_file():
            print(f"[raydrive] stage {cfg.preset} finished before ({json.loads(done.read_text())['checkpoint']})")
            continue
        load_from = cfg.run.load_from or ""
        if load_from.startswith("stage:"):
            cfg.run = dataclasses.replace(cfg.run, load_from=_stage_checkpoint(cfg, storage, load_from[6:]))
        result = run(cfg, env, verbose)
        results.append((cfg, result))
        if not finished(result):
            break
        path = result.checkpoint.path if result.checkpoint is not None else None
        done.write_text(json.dumps({"checkpoint": path, "step": result.metrics.get("step")}, indent=2))
    return results


def _stage_checkpoint(cfg: TrainConfig, storage: Path, stage: str) -> str:
    """The final checkpoint of the earlier `stage` of `cfg`'s run (named `<base>-<stage preset>`)."""
    suffix = f"-{cfg.preset}"
    done = storage / f"{cfg.run.name.removesuffix(suffix)}-{stage}" / DONE_FILE
    if not cfg.run.name.endswith(suffix) or not done.is_file():
        raise ConfigError(
            f"run.load_from=stage:{stage}: stage {stage} has not finished in this run; run the staged preset "
            f"(with the same --name and --storage-path), or give --load-from CHECKPOINT"
        )
    path = json.loads(done.read_text())["checkpoint"]
    from raydrive.engine import checkpoint as ckpt

    try:
        ckpt.verify(Path(path))
    except ckpt.BrokenCheckpoint as e:
        raise ConfigError(
            f"run.load_from=stage:{stage}: its final checkpoint {path} is incomplete ({e}); delete {done} to "
            f"train stage {stage} again"
        ) from None
    return path


def report(cfg: TrainConfig, result) -> None:
    from raydrive.trainers import get_spec

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
    evaluator = get_spec(cfg.model_name).build_evaluator(cfg)
    if "eval_metrics" in m:
        print("\n" + evaluator.format(m["eval_metrics"]))
        if all(f"{k}_before" in m for k in evaluator.headline):
            print(
                "\n[raydrive] val before training: "
                + "  ".join(f"{k} {m[k + '_before']:.4f}" for k in evaluator.headline)
            )
        print("[raydrive] val after training:  " + "  ".join(f"{k} {m[k]:.4f}" for k in evaluator.headline))
    if result.checkpoint is not None:
        print(f"[raydrive] checkpoint: {result.checkpoint.path}")


def _report_last(message: str, code: int) -> int:
    """Print the driver's final line after Ray's own output has stopped (Ray forwards worker logs from a
    background thread, which would otherwise print after it)."""
    from raydrive.launch.cluster import disconnect_ray

    disconnect_ray()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfgs = resolve_stages(args)
        env = parse_env(args.env)
        if args.show_config:
            print("\n".join(cfg.to_yaml() for cfg in cfgs), end="")
            return 0
        for cfg in cfgs:
            resolve_data(cfg)
        for cfg, result in run_stages(cfgs, env, args.verbose):
            report(cfg, result)
            if result.error:
                return _report_last(f"raydrive train: error: {failure_line(result.error)}", 1)
    except (ConfigError, DataError, KeyError) as e:
        return _report_last(f"raydrive train: error: {e.args[0] if isinstance(e, KeyError) else e}", 2)
    except RunFailed as e:
        return _report_last(f"raydrive train: error: {e}", 1)
    except KeyboardInterrupt as e:
        detail = str(e) or "stopped by Ctrl-C before training started; run the same command again to start"
        return _report_last(f"raydrive train: interrupted: {detail}", 130)
    return 0
