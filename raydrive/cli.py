"""`raydrive synth | prepare | train | eval | viz | doctor | runs`: one console script."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raydrive.data.infos import DataError


def _synth(args) -> int:
    from raydrive.data.synth import SynthConfig, synthesize

    out = synthesize(
        SynthConfig(
            out=args.out,
            scenes=args.scenes,
            samples_per_scene=args.samples_per_scene,
            seed=args.seed,
            image_width=args.width,
            image_height=args.height,
        )
    )
    print(f"synthetic nuScenes v1.0-mini written to {out}")
    return 0


def _prepare(args) -> int:
    from raydrive.data.prepare import PrepareConfig, prepare

    if args.dataroot is None and args.from_pkl is None:
        from raydrive.data.default import ensure_default_data

        dataroot, prepared = ensure_default_data()
        print(f"embedded default: synthetic nuScenes at {dataroot}, prepared at {prepared}")
        if args.out is None and not args.pkl_format:
            _summary(json.loads((prepared / "manifest.json").read_text()), prepared)
            return 0
        args.dataroot = str(dataroot)
    out = args.out or str(Path(args.dataroot or ".") / "raydrive-prepared")
    manifest = prepare(
        PrepareConfig(
            out=out,
            dataroot=args.dataroot,
            version=args.version,
            from_pkl=args.from_pkl,
            split=args.split,
            pkl_formats=args.pkl_format or [],
            depth_gt=not args.no_depth_gt,
            assets=_assets_for(args),
        )
    )
    _summary(manifest, Path(out).resolve())
    return 0


def _assets_for(args) -> tuple[str, ...] | None:
    """The prepared assets to make: none, those of the --for models, or (None) all registered ones."""
    if args.no_assets:
        return ()
    if not args.models:
        return None
    from raydrive.config import ConfigError
    from raydrive.trainers import get_spec

    try:
        return tuple(dict.fromkeys(a for m in args.models for a in get_spec(m).assets))
    except KeyError as e:
        raise ConfigError(f"--for: {e.args[0]}") from None


def _summary(manifest: dict, out: Path) -> None:
    for split, info in manifest["splits"].items():
        print(f"{split:>6}: {info['frames']} frames, {info['scenes']} scenes, {info['boxes']} boxes")
    if "depth_gt" in manifest:
        print(f"depth gt: {manifest['depth_gt']['files']} files")
    for name, asset in manifest.get("assets", {}).items():
        print(f"{name}: {asset['path']} {tuple(asset['shape'])}")
    for p in manifest.get("pkl", []):
        print(f"pkl ({p['format']}): {p['path']}")
    print(f"manifest: {out / 'manifest.json'}")


def _eval(args) -> int:
    from raydrive.eval import check_submission
    from raydrive.eval.detection import eval_set_for, evaluate_file, format_table

    if args.model is not None:
        from raydrive.config import ConfigError
        from raydrive.trainers import get_spec

        try:
            get_spec(args.model)
        except KeyError as e:
            raise ConfigError(f"{e.args[0]}; give one of them (or none: the checkpoint names its model)") from None
    if args.checkpoint:
        from raydrive.launch.evaluate import evaluate_checkpoint

        metrics, evaluator = evaluate_checkpoint(args.model, args.checkpoint, args.prepared, args.dataroot)
        table = evaluator.format(metrics)
    elif args.results and args.dataroot:
        eval_set = args.eval_set or eval_set_for(args.version, "val")
        check_submission(args.results, args.dataroot, args.version, eval_set)
        metrics = evaluate_file(args.results, args.dataroot, args.version, eval_set, args.output_dir)
        table = format_table(metrics)
    else:
        raise DataError("give --checkpoint CKPT (with a model name), or --dataroot D and --results FILE")
    print(table)
    if args.output_dir:
        (Path(args.output_dir) / "raydrive_metrics.json").write_text(json.dumps(metrics, indent=2))
    return 0


def _viz(args) -> int:
    from raydrive.viz.checkpoint import viz_checkpoint
    from raydrive.viz.render import Options

    a = args
    opts = Options(score_thresh=a.score_thresh)
    viz_checkpoint(a.model, a.checkpoint, a.out, a.scene, a.frames, a.gif, a.split, a.prepared, a.dataroot, opts)
    return 0


def _doctor(args) -> int:
    from raydrive.doctor import main as doctor_main

    return doctor_main(args.storage_path, args.prepared)


def runs_table(storage: Path) -> list[list[str]]:
    """One row per run card under `storage` (oldest first): name, model, preset, status, step/total, last
    checkpoint (relative to the storage path when under it), headline metrics."""
    from raydrive.launch.runcard import RUN_CARD, read_card

    cards = [c for c in (read_card(p.parent) for p in sorted(storage.glob(f"*/{RUN_CARD}"))) if c]
    rows = []
    for c in sorted(cards, key=lambda c: (c.get("started_at") or "", c.get("name") or "")):
        ckpt = c.get("last_checkpoint") or "-"
        if ckpt != "-" and Path(ckpt).is_relative_to(storage):
            ckpt = str(Path(ckpt).relative_to(storage))
        step = "-" if c.get("step") is None else str(c["step"])
        total = "-" if c.get("total_steps") is None else str(c["total_steps"])
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in (c.get("metrics") or {}).items()) or "-"
        row = [c.get("name"), c.get("model"), c.get("preset"), c.get("status"), f"{step}/{total}", ckpt, metrics]
        rows.append([str(x) if x is not None else "-" for x in row])
    return rows


def _runs(args) -> int:
    from raydrive.launch.train import storage_root

    storage = storage_root(args.storage_path)
    rows = runs_table(storage)
    if not rows:
        print(f"no runs with a run card under {storage}")
        return 0
    header = ["name", "model", "preset", "status", "step", "last checkpoint", "metrics"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"({len(rows)} run(s) under {storage}; `tensorboard --logdir {storage}` plots them)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydrive", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic nuScenes v1.0-mini tree")
    s.add_argument("out")
    s.add_argument("--scenes", type=int, default=10)
    s.add_argument("--samples-per-scene", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=1600)
    s.add_argument("--height", type=int, default=900)
    s.set_defaults(func=_synth)

    s = sub.add_parser(
        "prepare",
        help="nuScenes tree or upstream info pkl -> parquet, depth GT, the models' assets",
        description="With neither --dataroot nor --from-pkl: prepare the embedded synthetic default.",
    )
    s.add_argument("--dataroot", help="nuScenes tree (with --from-pkl: the prefix to strip from its paths)")
    s.add_argument("--version", default="v1.0-mini", choices=["v1.0-mini", "v1.0-trainval", "v1.0-test"])
    s.add_argument("--out", help="output folder (default: DATAROOT/raydrive-prepared)")
    s.add_argument("--from-pkl", help="read an upstream info pkl (Sparse4D, StreamPETR or BEVDepth layout)")
    s.add_argument("--split", choices=["train", "val", "test"], help="with --from-pkl: the split it holds")
    s.add_argument(
        "--pkl-format",
        action="append",
        choices=["sparse4d", "streampetr", "bevdepth"],
        help="also write the upstream pkl layout (repeatable)",
    )
    s.add_argument("--no-depth-gt", action="store_true", help="skip the depth ground truth")
    s.add_argument(
        "--for",
        dest="models",
        action="append",
        metavar="MODEL",
        help="make the assets of this model (repeatable; default: of every registered model); SparseDrive's "
        "info fields are computed only when sparsedrive is among them",
    )
    s.add_argument("--no-assets", action="store_true", help="make no model assets (e.g. k-means anchors)")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train", help="train a model on Ray (same as python -m raydrive.train)", add_help=False)
    s.set_defaults(func=None)

    s = sub.add_parser("doctor", help="check the cluster, accelerators, storage and data that train would use")
    s.add_argument("--storage-path", help="the --storage-path you will train with (default: the cache's runs/)")
    s.add_argument("--prepared", help="the prepared data you will train with (default: the embedded set)")
    s.set_defaults(func=_doctor)

    s = sub.add_parser(
        "runs",
        help="list the runs under a storage path, from their run cards",
        description="One line per run folder holding a run_card.json: name, model, preset, status, step/total, "
        "last checkpoint, headline metrics. Status is what the driver recorded: finished, paused (stopped at "
        "run.stop_at_step; the same --name continues it), failed, or running, which means that no end was "
        "recorded: the run is going on, or its driver was killed.",
    )
    s.add_argument("--storage-path", help="the --storage-path the runs were trained with (default: the cache's runs/)")
    s.set_defaults(func=_runs)

    s = sub.add_parser("eval", help="score a checkpoint, or a nuScenes detection submission, with the devkit")
    s.add_argument("model", nargs="?", help="with --checkpoint: the model (e.g. sparse4d)")
    s.add_argument(
        "--checkpoint",
        help="a raydrive checkpoint folder (or a run folder: its latest checkpoint); "
        "decodes the val split and scores it",
    )
    s.add_argument("--prepared", help="with --checkpoint: prepared data (default: the run's)")
    s.add_argument("--dataroot")
    s.add_argument("--version", default="v1.0-mini")
    s.add_argument("--results", help="results_nusc.json")
    s.add_argument("--eval-set", help="devkit split (default: the version's val split)")
    s.add_argument("--output-dir")
    s.set_defaults(func=_eval)

    s = sub.add_parser(
        "viz",
        help="draw a checkpoint's predictions: BEV views, camera images with boxes, a scene as a GIF",
        description="Pictures of a checkpoint's predictions on val frames, as training draws them after each "
        "evaluation: per frame a BEV view (<scene>_<frame>_bev.png) and the six cameras with projected boxes "
        "(<scene>_<frame>_cams.png); the run's training curves (curves.png) when its folder holds TensorBoard "
        "files. Default: the middle frame of the first three val scenes; --scene: that scene's frames in order "
        "and an animated GIF.",
    )
    s.add_argument("model", nargs="?", help="the checkpoint's model (e.g. sparse4d); checked against it")
    s.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    s.add_argument("--scene", help="draw this scene's frames in order (name, e.g. scene-0103, or token) and a GIF")
    s.add_argument("--out", help="output folder (default: <run folder>/pictures/viz_step_<N>)")
    s.add_argument("--frames", type=int, help="how many fixed frames (default 3); with --scene: its first N")
    s.add_argument("--gif", action="store_true", help="also write a GIF of the frames drawn (always with --scene)")
    s.add_argument("--score-thresh", type=float, default=0.3, help="draw predictions scoring at least this")
    s.add_argument("--split", default="val", help="the prepared split to draw from (default: val)")
    s.add_argument("--prepared", help="prepared data (default: the run's)")
    s.add_argument("--dataroot", help="nuScenes tree with the images (default: the run's)")
    s.set_defaults(func=_viz)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        from raydrive.launch.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    from raydrive.config import ConfigError

    try:
        return args.func(args)
    except (DataError, ConfigError) as e:
        return _last(f"raydrive {args.command}: error: {e}", 2)
    except BaseException as e:
        if not _from_interrupt(e):
            raise
        kept = "; --out was left as it was" if args.command == "prepare" else ""
        return _last(f"raydrive {args.command}: interrupted{kept}", 130)


def _from_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, also when it landed inside a module import and arrives wrapped in another error.

    (A SIGINT during `import sklearn` surfaces as `RuntimeError: Error calling __set_name__ ...` with
    the KeyboardInterrupt as its cause.)
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _last(message: str, code: int) -> int:
    """The command's final line, after any Ray connection it made is closed (no Ray output follows)."""
    from raydrive.launch.cluster import disconnect_ray

    disconnect_ray()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
