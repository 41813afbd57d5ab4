"""nuScenes detection evaluation through the real devkit.

Predictions are boxes per sample token: `boxes` (N, 9) as x, y, z (centre), l, w, h, yaw, vx, vy
(or (N, 7) without velocity), `scores` (N,), `labels` (N,) indexing CLASSES, in the model's box frame:
the key-frame lidar frame (Sparse4D, StreamPETR) or the ego frame given by the element-wise mean of the
six cameras' ego poses (BEVDepth's `frame="mean_cam_ego"`). They become a submission JSON in the
global frame (attributes by the usual speed rule), which the devkit's `DetectionEval` scores.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from raydrive.data import geometry as geo
from raydrive.data.constants import CLASSES, VERSION_SPLITS, attribute_for
from raydrive.data.infos import DataError

TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")


FRAMES = ("lidar", "mean_cam_ego")


def box_frame_to_global(rec: dict, frame: str) -> np.ndarray:
    """4x4 from the predictions' box frame to global."""
    if frame == "lidar":
        return geo.lidar_to_global(rec)
    if frame == "mean_cam_ego":  # BEVDepth `get_gt` / `_format_bbox`: quaternion components averaged
        cams = list(rec["cams"].values())
        return geo.mean_pose([c["ego2global_rotation"] for c in cams], [c["ego2global_translation"] for c in cams])
    raise ValueError(f"unknown box frame {frame!r}; expected one of {FRAMES}")


def to_submission(
    predictions: dict[str, dict], records: list[dict], max_per_sample: int = 500, frame: str = "lidar"
) -> dict:
    """Submission dict for the devkit. Every record gets an entry, with an empty list if it has none."""
    results = {}
    for rec in records:
        token = rec["token"]
        pred = predictions.get(token)
        entries = []
        if pred is not None and len(pred["scores"]):
            boxes = np.asarray(pred["boxes"], dtype=np.float64)
            scores = np.asarray(pred["scores"], dtype=np.float64)
            labels = np.asarray(pred["labels"], dtype=np.int64)
            if boxes.ndim != 2 or boxes.shape[1] not in (7, 9):
                raise DataError(f"predictions for sample {token}: boxes must be (N, 7) or (N, 9), got {boxes.shape}")
            order = np.argsort(-scores)[:max_per_sample]
            m = box_frame_to_global(rec, frame)
            centers = geo.apply(m, boxes[order, :3])
            vel = np.zeros((len(order), 3))
            if boxes.shape[1] == 9:
                vel[:, :2] = boxes[order, 7:9]
            vel = vel @ m[:3, :3].T
            for j, i in enumerate(order):
                name = CLASSES[labels[i]]
                rot = m[:3, :3] @ geo.rot_z(boxes[i, 6])
                speed = math.hypot(vel[j, 0], vel[j, 1])
                entries.append(
                    {
                        "sample_token": token,
                        "translation": centers[j].tolist(),
                        "size": boxes[i, [4, 3, 5]].tolist(),  # devkit order: w, l, h
                        "rotation": geo.matrix_to_quat(rot).tolist(),
                        "velocity": vel[j, :2].tolist(),
                        "detection_name": name,
                        "detection_score": float(scores[i]),
                        "attribute_name": attribute_for(name, speed),
                    }
                )
        results[token] = entries
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    return {"meta": meta, "results": results}


def eval_set_for(version: str, split: str) -> str:
    try:
        return VERSION_SPLITS[version][split]
    except KeyError:
        raise DataError(f"no {split!r} split for nuScenes version {version!r}") from None


def evaluate_file(
    results_path: str | os.PathLike,
    dataroot: str,
    version: str,
    eval_set: str | None = None,
    output_dir: str | None = None,
    verbose: bool = False,
    nusc=None,
) -> dict:
    """Score a submission JSON with the devkit; returns a flat metrics dict."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.nuscenes import NuScenes

    results_path = Path(results_path)
    if not results_path.is_file():
        raise DataError(f"results file {results_path} does not exist")
    eval_set = eval_set or eval_set_for(version, "val")
    nusc = nusc or NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    output_dir = output_dir or tempfile.mkdtemp(prefix="raydrive-eval-")
    evaluator = DetectionEval(
        nusc,
        config=config_factory("detection_cvpr_2019"),
        result_path=str(results_path),
        eval_set=eval_set,
        output_dir=output_dir,
        verbose=verbose,
    )
    with _quiet(not verbose):  # the devkit prints its own table
        summary = evaluator.main(plot_examples=0, render_curves=False)
    return flatten_summary(summary)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence prints; Ray Train workers patch builtins.print, so redirecting stdout is not enough."""
    if not enabled:
        yield
        return
    original = builtins.print
    builtins.print = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = original


def evaluate(
    predictions: dict[str, dict],
    records: list[dict],
    dataroot: str,
    version: str,
    split: str = "val",
    output_dir: str | None = None,
    nusc=None,
    frame: str = "lidar",
) -> dict:
    """Predictions -> submission JSON (written to output_dir) -> devkit metrics."""
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="raydrive-eval-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results_nusc.json"
    path.write_text(json.dumps(to_submission(predictions, records, frame=frame)))
    return evaluate_file(path, dataroot, version, eval_set_for(version, split), str(output_dir), nusc=nusc)


def flatten_summary(summary: dict) -> dict:
    metrics = {"mAP": float(summary["mean_ap"]), "NDS": float(summary["nd_score"])}
    short = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}
    for name, value in summary["tp_errors"].items():
        metrics[short.get(name, name)] = float(value)
    metrics["per_class_AP"] = {k: float(v) for k, v in summary["mean_dist_aps"].items()}
    metrics["per_class_tp_errors"] = {
        c: {k: float(v) for k, v in errs.items()} for c, errs in summary["label_tp_errors"].items()
    }
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"mAP: {metrics['mAP']:.4f}    NDS: {metrics['NDS']:.4f}"]
    lines.append("  ".join(f"{k}: {metrics[k]:.4f}" for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE") if k in metrics))
    lines.append(f"{'class':<22}{'AP':>7}" + "".join(f"{m.replace('_err', ''):>8}" for m in TP_METRICS))
    for cls in CLASSES:
        ap = metrics["per_class_AP"].get(cls, float("nan"))
        errs = metrics["per_class_tp_errors"].get(cls, {})
        lines.append(f"{cls:<22}{ap:>7.3f}" + "".join(f"{errs.get(m, float('nan')):>8.3f}" for m in TP_METRICS))
    return "\n".join(lines)


class NuScenesDetectionEvaluator:
    """The evaluator seam (`raydrive.spec.Evaluator`) for box detectors: each rank keeps its frames'
    boxes by sample token; rank 0 scores all of them with the devkit's `DetectionEval` on the prepared
    split's records. `frame` is the predictions' box frame (see `box_frame_to_global`)."""

    headline = ("mAP", "NDS")

    def __init__(self, prepared: str, dataroot: str | None = None, split: str = "val", frame: str = "lidar"):
        if frame not in FRAMES:
            raise ValueError(f"unknown box frame {frame!r}; expected one of {FRAMES}")
        self.prepared, self.dataroot, self.split, self.frame = prepared, dataroot, split, frame
        self.predictions: dict[str, dict] = {}

    def process(self, batch: dict, outputs: list[dict]) -> None:
        for token, out in zip(batch["token"], outputs):
            self.predictions[token] = {k: np.asarray(out[k]) for k in ("boxes", "scores", "labels")}

    def state(self) -> dict[str, dict]:
        return self.predictions

    def evaluate(self, states: list[dict[str, dict]]) -> dict:
        from raydrive.data.parquet import read_split, table_to_records
        from raydrive.data.prepare import load_manifest

        predictions = {k: v for part in states for k, v in part.items()}
        manifest = load_manifest(self.prepared)
        records = table_to_records(read_split(Path(self.prepared) / "infos" / self.split))
        out_dir = tempfile.mkdtemp(prefix="raydrive-eval-")
        dataroot = self.dataroot or manifest["dataroot"]
        return evaluate(
            predictions, records, dataroot, manifest["version"], self.split, output_dir=out_dir, frame=self.frame
        )

    def format(self, metrics: dict) -> str:
        return format_table(metrics)

    def pictures(self, states: list[dict[str, dict]], out_dir: Path, tag: str) -> list[Path]:
        """Rank 0, after `evaluate`: the BEV view and the camera grid of the split's fixed frames (the
        middle frame of its first three scenes; `raydrive/viz/`) into `out_dir`."""
        from raydrive.data.parquet import read_split, table_to_records
        from raydrive.data.prepare import load_manifest
        from raydrive.viz.render import pick_frames, write_pictures

        predictions = {k: v for part in states for k, v in part.items()}
        records = pick_frames(table_to_records(read_split(Path(self.prepared) / "infos" / self.split)))
        dataroot = self.dataroot or load_manifest(self.prepared)["dataroot"]
        return write_pictures(records, predictions, self.frame, dataroot, Path(out_dir), tag)
