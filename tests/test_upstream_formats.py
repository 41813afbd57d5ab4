"""Fidelity to upstream Sparse4D's tools: k-means anchors over every box, the info pkl's sweep type,
point-count dtypes, and data paths joined with the dataroot exactly as the user typed it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from raydrive.data.anchors import kmeans_anchors
from raydrive.data.constants import CAMERAS, CLASSES, KNOWN_CATEGORIES
from raydrive.data.infos import class_name
from raydrive.data.pkl_formats import records_from_pkl
from raydrive.data.prepare import PrepareConfig, prepare

# ---- k-means anchors (Sparse4D tools/anchor_generator.py) --------------------------------------


def _rec(boxes, names):
    return {"gt_boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 7), "gt_names": np.array(names, dtype=object)}


def test_non_detection_categories_keep_their_raw_name():
    """What infos.py writes to gt_names for a category outside the ten classes: its nuScenes name."""
    for cat in sorted(KNOWN_CATEGORIES):
        name = class_name(cat, "test")
        assert name in CLASSES or name == cat
    assert class_name("movable_object.debris", "test") == "movable_object.debris"
    assert class_name("animal", "test") == "animal"


def test_anchor_sizes_are_the_log_mean_over_all_boxes_in_range(records):
    base = records["train"]
    extra = _rec(
        [
            [3.0, -4.0, 0.2, 0.3, 0.4, 0.5, 0.0],  # debris, in range: counts
            [-10.0, 20.0, 0.1, 0.6, 0.7, 0.4, 1.0],  # animal, in range: counts
            [80.0, 0.0, 0.0, 9.0, 9.0, 9.0, 0.0],  # debris, 80 m away: out of range, ignored
        ],
        ["movable_object.debris", "animal", "movable_object.debris"],
    )
    before = kmeans_anchors(base, num_anchors=32)
    after = kmeans_anchors([*base, extra], num_anchors=32)

    # upstream rule: log of the mean (l, w, h) of every gt_boxes row within 55 m, whatever its name
    boxes = np.concatenate([r["gt_boxes"] for r in base] + [extra["gt_boxes"]])
    in_range = boxes[np.linalg.norm(boxes[:, :3], axis=1) <= 55.0]
    expected = np.log(in_range[:, 3:6].mean(0))
    np.testing.assert_allclose(after[:, 3:6], np.broadcast_to(expected, (32, 3)), rtol=1e-6)
    # ... which is not the detection-only mean: the extra boxes moved the size columns
    det = np.concatenate([r["gt_boxes"][np.isin(r["gt_names"], CLASSES)] for r in base])
    det = det[np.linalg.norm(det[:, :3], axis=1) <= 55.0]
    np.testing.assert_allclose(before[0, 3:6], np.log(det[:, 3:6].mean(0)), rtol=1e-6)
    assert np.abs(after[0, 3:6] - before[0, 3:6]).max() > 1e-3


def test_centres_of_non_detection_boxes_are_clustered():
    """With as many anchors as distinct centres, every in-range centre is an anchor: the debris and
    animal boxes are among them, the far one is not."""
    recs = [
        _rec([[1.0, 2.0, 0.0, 4.5, 1.9, 1.6, 0.0], [-5.0, 7.0, 0.5, 0.5, 0.6, 1.7, 0.0]], ["car", "pedestrian"]),
        _rec(
            [[30.0, -25.0, 0.3, 0.4, 0.4, 0.4, 0.0], [-40.0, -10.0, 0.0, 0.8, 0.5, 0.6, 0.0]],
            ["movable_object.debris", "animal"],
        ),
        _rec([[70.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]], ["static_object.bicycle_rack"]),
    ]
    anchors = kmeans_anchors(recs, num_anchors=4)
    got = sorted(map(tuple, np.round(anchors[:, :3], 4)))
    want = sorted([(1.0, 2.0, 0.0), (-5.0, 7.0, 0.5), (30.0, -25.0, 0.3), (-40.0, -10.0, 0.0)])
    np.testing.assert_allclose(got, want, atol=1e-4)
    # tiny sets still fill all rows (fewer distinct centres than anchors)
    assert kmeans_anchors(recs, num_anchors=10).shape == (10, 11)


def test_prepare_counts_non_detection_boxes_in_the_anchors(synth_root, tmp_path):
    """End to end: a tree whose first category is `animal` keeps those boxes under that raw name, and
    the prepared anchors' size columns are the log-mean over them too."""
    from raydrive.data.parquet import read_split, table_to_records

    root = tmp_path / "root"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("sweeps"))
    cats = json.loads((root / "v1.0-mini" / "category.json").read_text())
    cats[0]["name"] = "animal"
    (root / "v1.0-mini" / "category.json").write_text(json.dumps(cats))
    out = tmp_path / "o"
    prepare(PrepareConfig(out=str(out), dataroot=str(root), depth_gt=False, show_progress=False))
    train = table_to_records(read_split(out / "infos" / "train"))
    names = np.concatenate([r["gt_names"] for r in train])
    assert (names == "animal").any() and np.isin(names, CLASSES).any()
    boxes = np.concatenate([r["gt_boxes"] for r in train])
    in_range = boxes[np.linalg.norm(boxes[:, :3], axis=1) <= 55.0]
    anchors = np.load(out / "anchors" / "nuscenes_kmeans900.npy")
    np.testing.assert_allclose(anchors[0, 3:6], np.log(in_range[:, 3:6].mean(0)), rtol=1e-5)
    det = in_range[np.isin(names[np.linalg.norm(boxes[:, :3], axis=1) <= 55.0], CLASSES)]
    assert not np.allclose(anchors[0, 3:6], np.log(det[:, 3:6].mean(0)), rtol=1e-5)


# ---- the Sparse4D / StreamPETR info pkl (Sparse4D tools/nuscenes_converter.py) -----------------


@pytest.mark.parametrize(
    "fmt,name", [("sparse4d", "nuscenes_infos_val.pkl"), ("streampetr", "nuscenes2d_temporal_infos_val.pkl")]
)
def test_pkl_sweep_type_and_point_count_dtypes(prepared, records, fmt, name):
    infos = pickle.loads((prepared / "pkl" / fmt / name).read_bytes())["infos"]
    assert any(info["sweeps"] for info in infos)
    for info, rec in zip(infos, records["val"]):
        assert all(s["type"] == "lidar" for s in info["sweeps"])  # obtain_sensor2top(..., "lidar")
        assert [info["cams"][c]["type"] for c in CAMERAS] == list(CAMERAS)  # cameras: their channel
        for key in ("num_lidar_pts", "num_radar_pts"):
            assert info[key].dtype == np.int64  # np.array of Python ints
            np.testing.assert_array_equal(info[key], rec[key])


def test_pkl_reader_reads_old_and_new_files(prepared, synth_root, tmp_path):
    """A pkl written before the fix (LIDAR_TOP sweeps, int32 counts) reads back like a new one."""
    new = prepared / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl"
    payload = pickle.loads(new.read_bytes())
    for info in payload["infos"]:
        for s in info["sweeps"]:
            s["type"] = "LIDAR_TOP"
        info["num_lidar_pts"] = info["num_lidar_pts"].astype(np.int32)
        info["num_radar_pts"] = info["num_radar_pts"].astype(np.int32)
    old = tmp_path / "old_infos_val.pkl"
    old.write_bytes(pickle.dumps(payload))
    a, _, _ = records_from_pkl(new, str(synth_root))
    b, _, _ = records_from_pkl(old, str(synth_root))
    for ra, rb in zip(a, b):
        assert ra["token"] == rb["token"] and len(ra["sweeps"]) == len(rb["sweeps"])
        assert [s["type"] for s in ra["sweeps"]] == [s["type"] for s in rb["sweeps"]]
        assert [s["data_path"] for s in ra["sweeps"]] == [s["data_path"] for s in rb["sweeps"]]
        for key in ("num_lidar_pts", "num_radar_pts", "valid_flag"):
            np.testing.assert_array_equal(ra[key], rb[key])


# ---- data paths: the dataroot as given ---------------------------------------------------------


def _paths(info: dict) -> list[str]:
    return (
        [info["lidar_path"]]
        + [info["cams"][c]["data_path"] for c in CAMERAS]
        + [s["data_path"] for s in info["sweeps"]]
    )


def _canonical_paths(rec: dict) -> list[str]:
    return (
        [rec["lidar_path"]] + [rec["cams"][c]["data_path"] for c in CAMERAS] + [s["data_path"] for s in rec["sweeps"]]
    )


def _prepare_pkls(dataroot: str, out: Path) -> None:
    prepare(
        PrepareConfig(
            out=str(out),
            dataroot=dataroot,
            depth_gt=False,
            assets=(),
            show_progress=False,
            pkl_formats=["sparse4d", "streampetr"],
        )
    )


def test_relative_dataroot_writes_relative_paths(synth_root, records, tmp_path, monkeypatch):
    from raydrive.cli import main

    monkeypatch.chdir(synth_root.parent)
    root = f"./{synth_root.name}"  # as a user would type it, ./ included
    out = tmp_path / "rel"
    _prepare_pkls(root, out)
    for fmt, name in (("sparse4d", "nuscenes_infos_val.pkl"), ("streampetr", "nuscenes2d_temporal_infos_val.pkl")):
        infos = pickle.loads((out / "pkl" / fmt / name).read_bytes())["infos"]
        for info, rec in zip(infos, records["val"]):
            paths = _paths(info)
            # os.path.join(dataroot, filename), the root untouched, as the devkit builds it upstream
            assert paths == [os.path.join(root, p) for p in _canonical_paths(rec)]
            assert all(not os.path.isabs(p) and Path(p).is_file() for p in paths)

    # reading it back strips the root in whatever form it is given
    pkl = out / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl"
    for given in (root, synth_root.name, str(synth_root)):
        back, _, _ = records_from_pkl(pkl, given)
        assert [_canonical_paths(r) for r in back] == [_canonical_paths(r) for r in records["val"]]

    # --from-pkl on the written pkl gives the same records (depth GT finds the files through the paths)
    again = tmp_path / "again"
    assert main(["prepare", "--from-pkl", str(pkl), "--dataroot", root, "--out", str(again), "--no-assets"]) == 0
    from raydrive.data.parquet import read_split, table_to_records

    back = table_to_records(read_split(again / "infos" / "val"))
    assert [r["token"] for r in back] == [r["token"] for r in records["val"]]
    assert [_canonical_paths(r) for r in back] == [_canonical_paths(r) for r in records["val"]]
    for a, b in zip(back, records["val"]):
        np.testing.assert_allclose(a["gt_boxes"], b["gt_boxes"], atol=1e-6)
    m = json.loads((again / "manifest.json").read_text())
    assert m["depth_gt"]["files"] == 6 * len(records["val"])


def test_absolute_dataroot_writes_absolute_paths(prepared, synth_root, records):
    """The session's `prepared` fixture used an absolute --dataroot."""
    for fmt, name in (("sparse4d", "nuscenes_infos_val.pkl"), ("streampetr", "nuscenes2d_temporal_infos_val.pkl")):
        infos = pickle.loads((prepared / "pkl" / fmt / name).read_bytes())["infos"]
        for info, rec in zip(infos, records["val"]):
            paths = _paths(info)
            assert paths == [os.path.join(str(synth_root), p) for p in _canonical_paths(rec)]
            assert all(os.path.isabs(p) and Path(p).is_file() for p in paths)
