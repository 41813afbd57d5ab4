"""nuScenes tracking evaluation (AMOTA, AMOTP, ...) through the devkit's `TrackingEval`.

Predictions are per sample token, as for detection (`raydrive/eval/detection.py`): `boxes` (N, 9) or
(N, 7), `scores` (N,), `labels` (N,) indexing CLASSES, plus `instance_ids` (N,) tracking ids that stay
the same for one object across a scene's frames, and optionally `cls_scores` (N,), the class score
before the centerness factor. As upstream's `nuscenes_3d_dataset.py` (`_format_bbox(tracking=True)`
with `output_to_nusc_box(threshold=...)`), a box is kept when its `cls_scores` (else `scores`) reach
`threshold` (0.2) and its class is one of the devkit's 7 tracking classes (barrier, traffic cone and
construction vehicle are dropped); `tracking_score` is `scores` and `tracking_id` the id as a string.
Boxes with a negative id (no id assigned) are dropped too. The devkit filters boxes by class range
itself, which covers upstream's own range filter (the same ranges for these classes).

Needs `motmetrics` (the devkit imports it for tracking; 1.4.0 is the version devkit 1.2.0 supports).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np

from raydrive.data.constants import CLASSES
from raydrive.data.infos import DataError
from raydrive.eval.detection import _quiet, eval_set_for, to_submission

TRACKING_CONFIG = "tracking_nips_2019"
TRACKING_THRESHOLD = 0.2  # upstream's eval_mode tracking_threshold
HEADLINE = ("amota", "amotp", "recall", "motar", "gt", "mota", "motp", "mt", "ml", "faf")
COUNTS = ("tp", "fp", "fn", "ids", "frag", "tid", "lgd")


def tracking_names() -> tuple[str, ...]:
    """The devkit's tracking classes (a subset of CLASSES)."""
    from nuscenes.eval.common.config import config_factory

    return tuple(config_factory(TRACKING_CONFIG).tracking_names)


def _kept(pred: dict, names: tuple[str, ...], threshold: float) -> dict:
    """The boxes of one frame that enter the tracking submission, best score first."""
    scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
    gate = np.asarray(pred.get("cls_scores", scores), dtype=np.float64).reshape(-1)
    labels = np.asarray(pred["labels"], dtype=np.int64).reshape(-1)
    ids = np.asarray(pred["instance_ids"], dtype=np.int64).reshape(-1)
    keep = (gate >= threshold) & (ids >= 0) & np.isin([CLASSES[i] for i in labels], names)
    order = np.nonzero(keep)[0]
    order = order[np.argsort(-scores[order], kind="stable")]
    return {
        "boxes": np.asarray(pred["boxes"])[order],
        "scores": scores[order],
        "labels": labels[order],
        "ids": ids[order],
    }


def to_tracking_submission(
    predictions: dict[str, dict],
    records: list[dict],
    threshold: float = TRACKING_THRESHOLD,
    max_per_sample: int = 500,
    frame: str = "lidar",
) -> dict:
    """Submission dict for the devkit's tracking eval; every record gets an entry (possibly empty).

    The boxes go through detection's `to_submission` for the frame change; it orders a frame's boxes
    by score, so it is handed each box's rank as its score (our order, ties included) and the real
    scores, names and ids are put back per entry afterwards.
    """
    names = tracking_names()
    kept = {token: _kept(pred, names, threshold) for token, pred in predictions.items()}
    ranked = {
        token: {"boxes": k["boxes"], "labels": k["labels"], "scores": -np.arange(len(k["scores"]), dtype=np.float64)}
        for token, k in kept.items()
    }
    detection = to_submission(ranked, records, max_per_sample=max_per_sample, frame=frame)
    results = {}
    for token, entries in detection["results"].items():
        k = kept.get(token)
        results[token] = [
            {
                "sample_token": token,
                "translation": e["translation"],
                "size": e["size"],
                "rotation": e["rotation"],
                "velocity": e["velocity"],
                "tracking_name": e["detection_name"],
                "tracking_score": float(k["scores"][j]),
                "tracking_id": str(int(k["ids"][j])),
            }
            for j, e in enumerate(entries)
        ]
    return {"meta": detection["meta"], "results": results}


@contextlib.contextmanager
def _reuse_nusc(nusc):
    """`TrackingEval` loads its own NuScenes; hand it an already loaded one instead (trainval takes
    about a minute and several GB to load)."""
    if nusc is None:
        yield
        return
    from unittest import mock

    from nuscenes.eval.tracking import evaluate as tracking_evaluate

    with mock.patch.object(tracking_evaluate, "NuScenes", lambda **_: nusc):
        yield


def evaluate_tracking_file(
    results_path: str | Path,
    dataroot: str,
    version: str,
    eval_set: str | None = None,
    output_dir: str | None = None,
    verbose: bool = False,
    nusc=None,
) -> dict:
    """Score a tracking submission JSON with the devkit; returns a flat metrics dict."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.tracking.evaluate import TrackingEval

    if not Path(results_path).is_file():
        raise DataError(f"results file {results_path} does not exist")
    output_dir = output_dir or tempfile.mkdtemp(prefix="raydrive-track-eval-")
    with _quiet(not verbose), _reuse_nusc(nusc):  # the devkit prints its own tables
        evaluator = TrackingEval(
            config=config_factory(TRACKING_CONFIG),
            result_path=str(results_path),
            eval_set=eval_set or eval_set_for(version, "val"),
            output_dir=output_dir,
            nusc_version=version,
            nusc_dataroot=str(dataroot),
            verbose=verbose,
        )
        summary = evaluator.main(render_curves=False)
    return flatten_tracking_summary(summary)


def evaluate_tracking(
    predictions: dict[str, dict],
    records: list[dict],
    dataroot: str,
    version: str,
    split: str = "val",
    output_dir: str | None = None,
    nusc=None,
    frame: str = "lidar",
    threshold: float = TRACKING_THRESHOLD,
) -> dict:
    """Predictions -> tracking submission JSON (written to output_dir) -> devkit metrics."""
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="raydrive-track-eval-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results_nusc_tracking.json"
    submission = to_tracking_submission(predictions, records, threshold=threshold, frame=frame)
    if not any(submission["results"].values()):
        return no_tracks()  # the devkit cannot score an empty submission ("Invalid box type: None")
    path.write_text(json.dumps(submission))
    return evaluate_tracking_file(path, dataroot, version, eval_set_for(version, split), str(output_dir), nusc=nusc)


def no_tracks() -> dict:
    """The metrics of a submission without a single box above the threshold (e.g. an untrained model):
    nothing tracked, AMOTA 0, the error metrics at the devkit's worst values."""
    worst = {"amota": 0.0, "amotp": 2.0, "recall": 0.0, "motar": 0.0, "gt": float("nan"), "mota": 0.0, "motp": 2.0}
    metrics = {k: worst.get(k, 0.0) for k in HEADLINE + COUNTS}
    metrics["per_class_amota"] = {name: 0.0 for name in tracking_names()}
    return metrics


def flatten_tracking_summary(summary: dict) -> dict:
    """The devkit's summary as floats: the headline metrics, the counts, and `per_class_amota`."""
    metrics = {key: float(summary[key]) for key in HEADLINE + COUNTS}
    metrics["per_class_amota"] = {name: float(v) for name, v in summary["label_metrics"]["amota"].items()}
    return metrics


def format_tracking_table(metrics: dict) -> str:
    lines = ["  ".join(f"{k.upper()}: {metrics[k]:.4f}" for k in ("amota", "amotp", "recall", "motar", "mota"))]
    lines.append("  ".join(f"{k.upper()}: {int(metrics[k])}" for k in ("ids", "frag", "tp", "fp", "fn")))
    lines += [f"{name:<12}{value:>8.3f}" for name, value in metrics["per_class_amota"].items()]
    return "\n".join(lines)
