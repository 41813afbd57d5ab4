"""SparseDrive's four k-means assets: upstream's shapes and fixed slots, each recipe against hand-made
records with a known answer, and the registered steps made only on request."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from raydrive.data import kmeans
from raydrive.data import sparsedrive_fields as sf
from raydrive.data.assets import SPARSEDRIVE_ASSETS, ensure_assets, get_asset, models_assets
from raydrive.data.constants import CLASSES
from raydrive.data.infos import DataError
from raydrive.trainers import get_spec


def _record(boxes=(), names=(), agent_trajs=None, agent_masks=None, ego=None, cmd=2, lines=None) -> dict:
    """A minimal record with what the recipes read."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    n = len(boxes)
    rec = {"gt_boxes": boxes, "gt_names": np.array(list(names), dtype=object), "location": "x"}
    rec.update(sf.empty_future_columns(n))
    rec.update(sf.map_columns(lines or {}), has_map_annos=True, has_futures=True)
    if agent_trajs is not None:
        rec["gt_agent_fut_trajs"] = np.asarray(agent_trajs, np.float32)
        rec["gt_agent_fut_masks"] = np.asarray(agent_masks, np.float32)
    if ego is not None:
        rec["gt_ego_fut_trajs"] = np.asarray(ego, np.float32)
        rec["gt_ego_fut_masks"] = np.ones(sf.EGO_FUT_STEPS, np.float32)
        rec["gt_ego_fut_cmd"] = np.eye(3, dtype=np.float32)[cmd]
    return rec


def test_registered_under_upstream_names_and_made_for_sparsedrive(prepared):
    paths = {name: get_asset(name).path for name in SPARSEDRIVE_ASSETS}
    assert paths == {
        "sparsedrive_det_900": "kmeans/kmeans_det_900.npy",
        "sparsedrive_map_100": "kmeans/kmeans_map_100.npy",
        "sparsedrive_motion_6": "kmeans/kmeans_motion_6.npy",
        "sparsedrive_plan_6": "kmeans/kmeans_plan_6.npy",
    }
    assert set(SPARSEDRIVE_ASSETS) <= set(models_assets()), "the sparsedrive model names them"
    assert set(get_spec("sparsedrive").assets) == set(SPARSEDRIVE_ASSETS)
    assert not set(SPARSEDRIVE_ASSETS) & set(get_spec("sparse4d").assets), "prepare --for sparse4d skips them"
    assert (prepared / "kmeans").is_dir(), "a default prepare makes every registered model's assets"


def test_steps_on_the_prepared_train_split(prepared, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("depth_gt", "pkl", "kmeans"))  # made again
    with pytest.warns(UserWarning, match="no train sample has a full 12-step future"):  # the 6-frame scenes
        paths = ensure_assets(copy, SPARSEDRIVE_ASSETS)
    shapes = {name: np.load(path).shape for name, path in paths.items()}
    assert shapes == {
        "sparsedrive_det_900": (900, 11),
        "sparsedrive_map_100": (100, 20, 2),
        "sparsedrive_motion_6": (10, 6, 12, 2),
        "sparsedrive_plan_6": (3, 6, 6, 2),
    }
    manifest = json.loads((copy / "manifest.json").read_text())["assets"]
    assert {n: tuple(manifest[n]["shape"]) for n in SPARSEDRIVE_ASSETS} == shapes

    det = np.load(paths["sparsedrive_det_900"])
    np.testing.assert_array_equal(det[:, 3:], np.tile([1, 1, 1, 1, 0, 0, 0, 0], (900, 1)))
    assert np.all(np.linalg.norm(det[:, :2], axis=1) < 55 + 2)  # centres (plus jitter on a small set)

    lines = np.load(paths["sparsedrive_map_100"])
    np.testing.assert_allclose(lines[:, :, 0], lines[:, :1, 0].repeat(20, axis=1))
    np.testing.assert_allclose(lines[:, -1, 1] - lines[:, 0, 1], 8.0)
    assert np.all(np.abs(lines.mean(axis=1)) <= [15 + 2, 30 + 2])  # means of polylines in the 30 x 60 m patch

    plan = np.load(paths["sparsedrive_plan_6"])
    assert np.all(plan[..., 1] > 0), "the synthetic ego drives forward (lidar +y)"


def test_det_clusters_box_centres_within_55_m_bev():
    centres = [[10.0, 5.0, -1.0], [-20.0, 30.0, 0.5], [0.0, -40.0, 1.0]]
    boxes = [[*c, 4.0, 2.0, 1.5, 0.3] for c in centres] * 3 + [[50.0, 23.0, 0.0, 1, 1, 1, 0]]  # 55.03 m: out
    got = kmeans.det_anchors([_record(boxes, ["car"] * len(boxes))], k=3)
    order = np.argsort(got[:, 0])
    np.testing.assert_allclose(got[order, :3], np.array(centres)[np.argsort([c[0] for c in centres])], atol=1e-9)
    np.testing.assert_array_equal(got[:, 3:], np.tile(kmeans.DET_OTHER_SLOTS, (3, 1)))


def test_map_anchors_are_vertical_segments_through_polyline_means():
    square = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]])
    lines = {0: [square], 1: [np.array([[5.0, -10.0], [5.0, 10.0]])]}
    got = kmeans.map_anchors([_record(lines=lines)], k=2)
    got = got[np.argsort(got[:, 0, 0])]
    np.testing.assert_allclose(got[:, :, 0], [[1.0] * 20, [5.0] * 20])
    np.testing.assert_allclose(got[0, :, 1], 1.0 + np.linspace(-4, 4, 20))
    np.testing.assert_allclose(got[1, :, 1], np.linspace(-4, 4, 20))


def test_motion_anchors_are_agent_frame_futures_per_class():
    """Cars driving 1 m per step along their heading (any yaw) cluster at (k, 0) in their own frame;
    a pedestrian walking to its left at (0, k); other classes take the pooled clusters."""
    steps = sf.AGENT_FUT_STEPS
    boxes, names, trajs = [], [], []
    for i, yaw in enumerate(np.linspace(-3, 3, 7)):
        boxes.append([5.0 * i, 3.0, 0, 4, 2, 1.5, yaw])
        names.append("car")
        trajs.append(np.tile([math.cos(yaw), math.sin(yaw)], (steps, 1)))
    for i, yaw in enumerate(np.linspace(-2, 2, 6)):
        boxes.append([-5.0 * i, -3.0, 0, 0.5, 0.5, 1.8, yaw])
        names.append("pedestrian")
        trajs.append(np.tile([-math.sin(yaw), math.cos(yaw)], (steps, 1)) * 0.5)
    boxes.append([80.0, 0, 0, 4, 2, 1.5, 0.0])  # beyond 55 m: left out
    names.append("car")
    trajs.append(np.full((steps, 2), 9.0))
    rec = _record(boxes, names, np.array(trajs), np.ones((len(boxes), steps)))
    got = kmeans.motion_anchors([rec], k=6)
    assert got.shape == (len(CLASSES), 6, steps, 2)
    along = np.stack([np.arange(1, steps + 1), np.zeros(steps)], axis=-1)
    np.testing.assert_allclose(got[CLASSES.index("car")], np.tile(along, (6, 1, 1)), atol=1e-6)
    np.testing.assert_allclose(got[CLASSES.index("pedestrian")], np.tile(along[:, ::-1] * 0.5, (6, 1, 1)), atol=1e-6)
    pooled = got[CLASSES.index("bus")]
    np.testing.assert_array_equal(got[CLASSES.index("truck")], pooled)


def test_motion_falls_back_to_partial_futures_at_constant_velocity():
    steps = sf.AGENT_FUT_STEPS
    masks = np.zeros((1, steps))
    masks[0, :8] = 1
    trajs = np.zeros((1, steps, 2))
    trajs[0, :8] = [0.0, 1.0]  # yaw pi/2: forward is lidar +y
    rec = _record([[1.0, 2.0, 0, 4, 2, 1.5, math.pi / 2]], ["car"], trajs, masks)
    with pytest.warns(UserWarning, match="constant velocity"):
        got = kmeans.motion_anchors([rec], k=6)
    # one distinct future: the first centre is it (x forward in the agent frame), the rest jittered copies
    np.testing.assert_allclose(got[0, 0], np.stack([np.arange(1, steps + 1), np.zeros(steps)], -1), atol=1e-9)
    with pytest.raises(DataError, match="no train sample has a future step"):
        kmeans.motion_anchors([_record([[1.0, 2.0, 0, 4, 2, 1.5, 0.0]], ["car"], trajs, 0 * masks)], k=6)


def test_plan_anchors_per_command_keep_the_command_rule():
    rng = np.random.default_rng(0)
    records = []
    for cmd, lateral in ((0, 1.0), (1, -1.0), (2, 0.0)):
        for _ in range(10):
            step = [lateral * rng.uniform(0.4, 0.8), rng.uniform(1, 3)]
            records.append(_record(ego=np.tile(step, (sf.EGO_FUT_STEPS, 1)), cmd=cmd))
    partial = _record(ego=np.ones((6, 2)) * 50, cmd=0)
    partial["gt_ego_fut_masks"][3:] = 0  # not a full future: left out
    got = kmeans.plan_anchors([*records, partial], k=6)
    assert got.shape == (3, 6, 6, 2)
    final_x = got[:, :, -1, 0]
    assert np.all(final_x[0] >= 2) and np.all(final_x[1] <= -2) and np.all(np.abs(final_x[2]) < 2)
    np.testing.assert_allclose(np.diff(got, axis=2)[..., 0], got[:, :, :1, 0].repeat(5, axis=2), atol=1e-9)


def test_fit_centres_pads_a_small_set_deterministically():
    points = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    a, b = kmeans.fit_centres(points, 5, seed=3), kmeans.fit_centres(points, 5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 2)
    assert {tuple(p) for p in np.round(a[:2], 9)} == {(0.0, 0.0), (1.0, 1.0)}


def test_a_prepare_for_other_models_skips_the_fields_and_training_sparsedrive_names_the_fix(
    synth_root, tmp_path, capsys
):
    from raydrive.data.parquet import read_split, table_to_records
    from raydrive.data.prepare import PrepareConfig, prepare

    out = tmp_path / "prepared"
    cfg = PrepareConfig(out=str(out), dataroot=str(synth_root), depth_gt=False, assets=get_spec("sparse4d").assets)
    manifest = prepare(cfg)
    assert manifest["sparsedrive"]["skipped"] and "warning" not in capsys.readouterr().out
    records = table_to_records(read_split(out / "infos" / "train"))
    assert not any(r["has_map_annos"] or r["has_futures"] for r in records)
    with pytest.raises(sf.MissingSparseDriveData, match="prepare --for sparsedrive"):
        ensure_assets(out, SPARSEDRIVE_ASSETS)
    assert not (out / "kmeans").exists(), "no asset file the manifest does not list"
