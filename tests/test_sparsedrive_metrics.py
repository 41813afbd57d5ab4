"""SparseDrive metrics: map Chamfer AP, planning L2 / collision, and tracking through the real devkit."""

from __future__ import annotations

import numpy as np
import pytest

from raydrive.data.constants import CLASSES
from raydrive.data.sparsedrive_fields import MAP_CLASSES, map_annos_from_columns
from raydrive.eval.map_ap import average_precision, chamfer_matrix, map_ap, resample
from raydrive.eval.planning import agent_boxes_at, planning_gt, planning_metrics, trajectory_yaw
from raydrive.eval.tracking import evaluate_tracking, to_tracking_submission, tracking_names

# ---------------------------------------------------------------- map AP


def _as_predictions(annos: dict, shift=(0.0, 0.0)) -> dict:
    vectors = [np.asarray(line) + shift for label in sorted(annos) for line in annos[label]]
    labels = [label for label in sorted(annos) for _ in annos[label]]
    return {"vectors": vectors, "scores": np.ones(len(vectors)), "labels": np.array(labels)}


def test_map_ground_truth_as_predictions_scores_one(records):
    gts = [map_annos_from_columns(r) for r in records["val"]]
    assert all(len(g[label]) for g in gts[:1] for label in range(len(MAP_CLASSES)))  # every class is present
    metrics = map_ap([_as_predictions(g) for g in gts], gts)
    assert metrics["map_mAP"] == pytest.approx(1.0)
    for name in MAP_CLASSES:
        assert [metrics[f"{name}_AP@{t}"] for t in (0.5, 1.0, 1.5)] == pytest.approx([1.0] * 3)
        assert metrics[f"{name}_num_preds"] == metrics[f"{name}_num_gts"] > 0


def _straight_lines_frame() -> dict:
    """One line per class, all along y (so an x shift moves every point exactly that far)."""
    return {label: [np.array([[3.0 * label, -10.0], [3.0 * label, 0.0], [3.0 * label, 12.0]])] for label in range(3)}


def test_map_thresholds_follow_the_chamfer_distance():
    gt = _straight_lines_frame()
    lines = resample(gt[0][0])
    assert chamfer_matrix(lines[None] + [0.7, 0.0], lines[None])[0, 0] == pytest.approx(0.7)
    near = map_ap([_as_predictions(gt, (0.7, 0.0))], [gt])
    assert [near[f"divider_AP@{t}"] for t in (0.5, 1.0, 1.5)] == pytest.approx([0.0, 1.0, 1.0])
    # the classes sit 3 m apart, so a 1.6 m shift meets no other line either
    far = map_ap([_as_predictions(gt, (1.6, 0.0))], [gt])
    assert all(far[f"{name}_AP@{t}"] == 0.0 for name in MAP_CLASSES for t in (0.5, 1.0, 1.5))
    assert far["map_mAP"] == 0.0


def test_map_matching_by_score():
    """Two predictions on one GT line: the second is a false positive; a far line scored above the
    true one halves the precision at full recall."""
    gt = {0: [], 1: [np.array([[0.0, -10.0], [0.0, 10.0]])], 2: []}
    on = np.array([[0.0, -10.0], [0.0, 10.0]])
    off = on + [10.0, 0.0]
    dup = map_ap([{"vectors": [on, on], "scores": np.array([0.9, 0.8]), "labels": np.array([1, 1])}], [gt])
    assert dup["divider_AP@0.5"] == pytest.approx(1.0)
    worse = map_ap([{"vectors": [on, off], "scores": np.array([0.8, 0.9]), "labels": np.array([1, 1])}], [gt])
    assert worse["divider_AP@0.5"] == pytest.approx(0.5)
    assert average_precision(np.array([False, True]), np.array([0.9, 0.8]), num_gt=2) == pytest.approx(0.25)


# ---------------------------------------------------------------- planning


def _straight_frame(agents: list[tuple] | None = None) -> dict:
    """Ego drives 2 m per step along +y; `agents` are (x, y, length, width, yaw, per-step offset, mask)."""
    agents = agents or []
    boxes = np.array([[x, y, 0.0, length, width, 1.5, yaw] for x, y, length, width, yaw, _, _ in agents]).reshape(-1, 7)
    offsets = np.array([np.tile(off, (12, 1)) for *_, off, _ in agents]).reshape(-1, 12, 2)
    masks = np.array([mask for *_, mask in agents]).reshape(-1, 12)
    return {
        "gt_ego_fut_trajs": np.tile([0.0, 2.0], (6, 1)),
        "gt_ego_fut_masks": np.ones(6),
        "gt_boxes": boxes,
        "gt_agent_fut_trajs": offsets,
        "gt_agent_fut_masks": masks,
    }


def test_planning_ground_truth_scores_zero_on_real_records(records):
    frames = [planning_gt(r) for r in records["val"]]
    # the synthetic scenes are too short for a full 3 s future: upstream skips every frame
    assert planning_metrics([np.cumsum(f["gt_ego_fut_trajs"], 0) for f in frames], frames)["num_samples"] == 0
    for f in frames:
        f["gt_ego_fut_masks"] = np.ones(6)
    plans = [np.cumsum(f["gt_ego_fut_trajs"], 0) for f in frames]
    metrics = planning_metrics(plans, frames)
    assert metrics["num_samples"] == len(frames)
    keys = ("1s", "2s", "3s", "avg")
    assert [metrics[f"L2_{k}"] for k in keys] == pytest.approx([0.0] * 4, abs=1e-6)  # float32 offsets
    assert [metrics[f"collision_{k}"] for k in keys] == [0.0] * 4
    assert sum(len(boxes) for f in frames for boxes in agent_boxes_at(f)) > 20  # agents were checked


def test_planning_l2_of_shifted_plans():
    frame = _straight_frame()
    gt = np.cumsum(frame["gt_ego_fut_trajs"], 0)
    moved = planning_metrics([gt + [1.0, 0.0]], [frame])
    assert [moved[f"L2_{k}"] for k in ("1s", "2s", "3s", "avg")] == pytest.approx([1.0] * 4)
    # every offset 1 m off: step t is t metres off; running means at 1/2/3 s are 1.5, 2.5, 3.5
    drift = planning_metrics([np.cumsum(frame["gt_ego_fut_trajs"] + [1.0, 0.0], 0)], [frame])
    assert [drift[f"L2_{k}"] for k in ("1s", "2s", "3s", "avg")] == pytest.approx([1.5, 2.5, 3.5, 2.5])
    incomplete = dict(frame, gt_ego_fut_masks=np.array([1, 1, 1, 1, 1, 0]))
    assert planning_metrics([gt + 5.0, gt + [1.0, 0.0]], [incomplete, frame])["L2_avg"] == pytest.approx(1.0)


def test_planning_collision_through_an_agent_box():
    ones = np.ones(12)
    truck = (5.0, 9.0, 12.0, 2.0, np.pi / 2, (0.0, 0.0), ones)  # parked on the right: x 4..6, y 3..15
    walker = (0.0, 2.0, 0.6, 0.6, 0.0, (0.0, 0.0), np.r_[1.0, np.zeros(11)])  # in the GT path at step 1 only
    frame = _straight_frame([truck, walker])
    gt = np.cumsum(frame["gt_ego_fut_trajs"], 0)
    plan = np.array([[0.0, 2.0], [0.0, 4.0], [0.0, 6.0], [5.0, 8.0], [5.0, 10.0], [5.0, 12.0]])
    metrics = planning_metrics([plan], [frame])
    # steps 4-6 hit the truck: per-step [0, 0, 0, 1, 1, 1] -> running means 0, 1/4, 1/2 at 1/2/3 s; the
    # walker at step 1 is hit by the GT trajectory too, so it does not count for the plan
    assert [metrics[f"collision_{k}"] for k in ("1s", "2s", "3s", "avg")] == pytest.approx([0.0, 0.25, 0.5, 0.25])
    assert metrics["gt_collision_1s"] == pytest.approx(0.5)
    assert planning_metrics([gt], [frame])["collision_avg"] == 0.0
    assert trajectory_yaw(gt) == pytest.approx(np.full(6, np.pi / 2))


def test_agents_move_along_their_offsets():
    mover = (-20.0, 0.0, 4.0, 2.0, 0.0, (4.0, 0.0), np.r_[np.ones(3), np.zeros(9)])
    frame = _straight_frame([mover])
    steps = agent_boxes_at(frame)
    assert [len(s) for s in steps] == [1, 1, 1, 0, 0, 0]
    assert steps[2][0, :2] == pytest.approx([-8.0, 0.0])
    # a car crossing the ego's path reaches x = 0, y = 6 at step 3, where the GT ego is then
    crosser = (-12.0, 6.0, 4.0, 2.0, 0.0, (4.0, 0.0), np.ones(12))
    frame = _straight_frame([crosser])
    assert planning_metrics([np.cumsum(frame["gt_ego_fut_trajs"], 0)], [frame])["gt_collision_3s"] > 0


# ---------------------------------------------------------------- tracking


def _gt_tracks(records: list[dict]) -> dict:
    preds = {}
    for r in records:
        keep = np.isin(r["gt_names"], CLASSES) & r["valid_flag"]
        preds[r["token"]] = {
            "boxes": np.concatenate([r["gt_boxes"][keep], np.nan_to_num(r["gt_velocity"][keep])], axis=1),
            "scores": np.ones(keep.sum()),
            "labels": np.array([CLASSES.index(n) for n in r["gt_names"][keep]], dtype=np.int64),
            "instance_ids": np.asarray(r["instance_inds"])[keep],
        }
    return preds


def test_tracking_submission_keeps_tracking_classes_above_threshold(records):
    preds = _gt_tracks(records["val"])
    token = records["val"][0]["token"]
    n = len(preds[token]["scores"])
    preds[token]["cls_scores"] = np.where(np.arange(n) % 2 == 0, 0.9, 0.1)
    sub = to_tracking_submission(preds, records["val"])
    assert set(sub["results"]) == {r["token"] for r in records["val"]}
    entries = sub["results"][token]
    names, ids = preds[token]["labels"], preds[token]["instance_ids"]
    wanted = {str(ids[i]) for i in range(0, n, 2) if CLASSES[names[i]] in tracking_names()}
    assert {e["tracking_id"] for e in entries} == wanted
    assert set(entries[0]) == {
        "sample_token",
        "translation",
        "size",
        "rotation",
        "velocity",
        "tracking_name",
        "tracking_score",
        "tracking_id",
    }
    for e in entries:  # each entry carries its own box: the id's GT box, moved to the global frame
        i = int(np.nonzero(ids == int(e["tracking_id"]))[0][0])
        assert e["tracking_name"] == CLASSES[names[i]]
        assert e["size"] == pytest.approx(preds[token]["boxes"][i, [4, 3, 5]])


def test_tracking_ground_truth_scores_perfectly(records, synth_root, nusc, tmp_path):
    preds = _gt_tracks(records["val"])
    metrics = evaluate_tracking(
        preds, records["val"], str(synth_root), "v1.0-mini", output_dir=str(tmp_path), nusc=nusc
    )
    assert metrics["amota"] >= 0.99 and metrics["amotp"] < 0.01 and metrics["ids"] == 0
    assert (tmp_path / "metrics_summary.json").is_file()
    # ids that change every frame: identity switches, lower AMOTA
    for k, token in enumerate(preds):
        preds[token]["instance_ids"] = preds[token]["instance_ids"] + 1000 * k
    broken = evaluate_tracking(preds, records["val"], str(synth_root), "v1.0-mini", nusc=nusc)
    assert broken["ids"] > 0 and broken["amota"] < metrics["amota"] - 0.2
