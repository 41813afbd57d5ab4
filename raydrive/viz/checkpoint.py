"""`raydrive viz MODEL --checkpoint DIR`: pictures of a checkpoint's predictions, in this process.

The model runs on the frames to draw, and for a model with temporal state (lane sampling) on the frames
of their scene before them, in time order with the state reset at the scene's start, as in evaluation:
through the model's own frame mapper, without Ray. The box frame of its predictions is its evaluator's
(`frame`). By default the fixed frames that training draws after each evaluation; with `--scene` that
scene's frames in order, with track trails where the model predicts `instance_ids`, and an animated GIF.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from raydrive.viz.render import Options, Tracks, pick_frames, render_frame, scene_frames, write_gif


def predict_frames(spec, cfg, model, split: str, chunks: list[list[int]]) -> Iterator[tuple[str, dict]]:
    """(token, outputs) for every frame of `chunks` (lists of row indices of the split's table, each a
    sequence in time order that starts with a state reset), in order."""
    import torch

    from raydrive.data.lanes import eval_plan
    from raydrive.data.pipeline import arrow_to_numpy_batch, collate, map_block
    from raydrive.engine.loop import build_pipeline

    pipeline = build_pipeline(spec, cfg, split, False, 1)
    rows = pipeline._with_plan(eval_plan([np.asarray(c, dtype=np.int64) for c in chunks], 0, 1), epoch=0)
    model.eval()
    model.reset_state()
    with torch.no_grad():
        for i in range(rows.num_rows):
            batch = collate(map_block(arrow_to_numpy_batch(rows.slice(i, 1)), pipeline.mapper), pipeline.mapper)
            if batch["seq_start"].any():
                model.reset_state(batch["seq_start"])
            yield batch["token"][0], model.predict(batch)[0]


def viz_checkpoint(
    model: str | None,
    checkpoint: str,
    out: str | None = None,
    scene: str | None = None,
    frames: int | None = None,
    gif: bool = False,
    split: str = "val",
    prepared: str | None = None,
    dataroot: str | None = None,
    opts: Options | None = None,
    log=print,
) -> list[Path]:
    """Render a checkpoint's pictures; returns the files written. `frames`: how many fixed frames (one
    per scene, default 3), or with `scene` its first `frames` frames (default all)."""
    from raydrive.config import ConfigError
    from raydrive.data.parquet import read_split, table_to_records
    from raydrive.data.prepare import load_manifest
    from raydrive.engine.loop import load_model
    from raydrive.launch.evaluate import checkpoint_config, local_device
    from raydrive.spec import Lanes
    from raydrive.viz.curves import write_curves

    opts = opts or Options()
    spec, cfg = checkpoint_config(model, checkpoint, prepared, dataroot, command="viz")
    path = Path(cfg.run.load_from)
    step = json.loads((path / "meta.json").read_text()).get("step")
    manifest = load_manifest(cfg.data.prepared)
    if split not in manifest["splits"]:
        raise ConfigError(f"--split {split}: {cfg.data.prepared} has the splits {sorted(manifest['splits'])}")
    records = table_to_records(read_split(Path(cfg.data.prepared) / "infos" / split))
    if scene is not None:
        chosen = scene_frames(records, scene)
        if not chosen:
            names = sorted({r["scene_name"] for r in records})
            raise ConfigError(f"--scene {scene}: no such scene in the {split} split; its scenes: {', '.join(names)}")
        chosen = chosen[: frames or len(chosen)]
    else:
        chosen = pick_frames(records, frames or 3)
    out_dir = Path(out) if out else path.parent / "pictures" / f"viz_step_{step}"
    dataroot_ = cfg.data.dataroot or manifest["dataroot"]
    frame = getattr(spec.build_evaluator(cfg), "frame", "lidar")

    index = {r["token"]: i for i, r in enumerate(records)}
    by_token = {r["token"]: r for r in records}
    temporal = isinstance(spec.sampling, Lanes)
    if scene is not None:
        chunks = [[index[r["token"]] for r in chosen]]
    elif temporal:  # run each scene from its start up to the frame drawn
        chunks = [
            [index[r["token"]] for r in scene_frames(records, c["scene_token"]) if r["timestamp"] <= c["timestamp"]]
            for c in chosen
        ]
    else:
        chunks = [[index[c["token"]]] for c in chosen]
    wanted = {r["token"] for r in chosen}

    log(f"[raydrive] viz: {spec.name} checkpoint {path} (step {step}), {len(chosen)} frame(s) of {split}")
    net = load_model(spec, cfg, local_device())
    tag = f"{spec.name} step {step}"
    tracks = Tracks() if scene is not None else None
    written, pictures = [], []
    for token, outputs in predict_frames(spec, cfg, net, split, chunks):
        if token not in wanted:
            continue
        pics = render_frame(by_token[token], outputs, frame, dataroot_, tag, tracks=tracks, opts=opts)
        written += pics.save(out_dir)
        if scene is not None or gif:
            pictures.append(pics)
    if pictures:
        name = chosen[0]["scene_name"] if scene is not None else "frames"
        written.append(write_gif(pictures, out_dir / f"{name}.gif", opts.panel_height))
    curves = write_curves(path.parent, out_dir / "curves.png")
    if curves is not None:
        written.append(curves)
    names = ", ".join(p.name for p in written[:6]) + (" ..." if len(written) > 6 else "")
    log(f"[raydrive] viz: {len(written)} file(s) in {out_dir}: {names}")
    return written
