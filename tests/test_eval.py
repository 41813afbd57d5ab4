"""Evaluation through the real devkit: ground truth scores ~1, random boxes ~0."""

from __future__ import annotations

import json

import numpy as np

from raydrive.data.constants import CLASSES
from raydrive.eval.detection import evaluate, format_table, to_submission


def gt_predictions(records):
    preds = {}
    for r in records:
        keep = np.isin(r["gt_names"], CLASSES) & r["valid_flag"]
        preds[r["token"]] = dict(
            boxes=np.concatenate([r["gt_boxes"][keep], np.nan_to_num(r["gt_velocity"][keep])], axis=1),
            scores=np.ones(keep.sum()),
            labels=np.array([CLASSES.index(n) for n in r["gt_names"][keep]], dtype=np.int64),
        )
    return preds


def test_ground_truth_scores_perfectly(records, synth_root, nusc, tmp_path):
    metrics = evaluate(
        gt_predictions(records["val"]),
        records["val"],
        str(synth_root),
        "v1.0-mini",
        "val",
        output_dir=str(tmp_path),
        nusc=nusc,
    )
    assert metrics["mAP"] >= 0.99 and metrics["NDS"] >= 0.99, format_table(metrics)
    assert set(metrics["per_class_AP"]) == set(CLASSES)
    assert all(metrics[k] < 0.01 for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"))
    assert (tmp_path / "results_nusc.json").is_file()


def test_random_boxes_score_near_zero(records, synth_root, nusc):
    rng = np.random.default_rng(0)
    preds = {}
    for r in records["val"]:
        n = 40
        boxes = np.concatenate(
            [
                rng.uniform(-50, 50, (n, 2)),
                rng.uniform(-2, 1, (n, 1)),
                rng.uniform(0.5, 5, (n, 3)),
                rng.uniform(-3, 3, (n, 1)),
                rng.normal(0, 2, (n, 2)),
            ],
            axis=1,
        )
        preds[r["token"]] = dict(boxes=boxes, scores=rng.uniform(size=n), labels=rng.integers(0, 10, n))
    metrics = evaluate(preds, records["val"], str(synth_root), "v1.0-mini", "val", nusc=nusc)
    assert metrics["mAP"] < 0.02 and metrics["NDS"] < 0.1


def test_submission_format_and_cli(records, synth_root, tmp_path, capsys):
    from raydrive.cli import main

    sub = to_submission(gt_predictions(records["val"]), records["val"])
    assert set(sub["results"]) == {r["token"] for r in records["val"]}
    entry = next(e for v in sub["results"].values() for e in v)
    assert set(entry) == {
        "sample_token",
        "translation",
        "size",
        "rotation",
        "velocity",
        "detection_name",
        "detection_score",
        "attribute_name",
    }
    path = tmp_path / "results_nusc.json"
    path.write_text(json.dumps(sub))
    assert main(["eval", "--dataroot", str(synth_root), "--results", str(path), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mAP: 1.0000" in out and "NDS: 1.0000" in out
    assert json.loads((tmp_path / "raydrive_metrics.json").read_text())["mAP"] >= 0.99
