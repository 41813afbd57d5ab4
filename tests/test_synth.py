"""The synthetic tree is a real nuScenes v1.0-mini tree, and its sensors agree with its annotations."""

from __future__ import annotations

import json

import numpy as np
from nuscenes.utils.splits import create_splits_scenes
from PIL import Image

from raydrive.data import geometry as geo
from raydrive.data.constants import CAMERAS, CATEGORY_TO_CLASS, CLASSES, LIDAR, attribute_for
from raydrive.data.synth import CLASS_COLOR

TABLES = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)


def test_devkit_loads_all_tables_and_splits(nusc, synth_root):
    for t in TABLES:
        assert (synth_root / "v1.0-mini" / f"{t}.json").is_file()
        assert len(getattr(nusc, t)) > 0, t
    splits = create_splits_scenes()
    names = {s["name"] for s in nusc.scene}
    assert names & set(splits["mini_train"]) and names & set(splits["mini_val"])
    assert names <= set(splits["mini_train"]) | set(splits["mini_val"])
    for m in nusc.map:
        assert (synth_root / m["filename"]).is_file()
        assert m["mask"].mask().shape == (200, 200)


def test_links_and_files(nusc, synth_root):
    for scene in nusc.scene:
        tokens, tok = [], scene["first_sample_token"]
        while tok:
            sample = nusc.get("sample", tok)
            assert set(sample["data"]) == set(CAMERAS) | {LIDAR}
            for sd_token in sample["data"].values():
                sd = nusc.get("sample_data", sd_token)
                assert (synth_root / sd["filename"]).is_file()
            tokens.append(tok)
            tok = sample["next"]
        assert len(tokens) == scene["nbr_samples"] and tokens[-1] == scene["last_sample_token"]
    for ann in nusc.sample_annotation:
        if ann["next"]:
            assert nusc.get("sample_annotation", ann["next"])["prev"] == ann["token"]
    for sd in nusc.sample_data:
        if sd["next"]:
            assert nusc.get("sample_data", sd["next"])["prev"] == sd["token"]


def test_classes_attributes_and_motion(nusc):
    names = {CATEGORY_TO_CLASS[c["name"]] for c in nusc.category}
    assert names == set(CLASSES)
    speeds = []
    for ann in nusc.sample_annotation:
        cls = CATEGORY_TO_CLASS[ann["category_name"]]
        v = nusc.box_velocity(ann["token"])
        speed = float(np.hypot(v[0], v[1]))
        speeds.append(speed)
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        expected = attribute_for(cls, speed)
        assert attrs == ([expected] if expected else []), (cls, speed, attrs)
        assert ann["visibility_token"] in {"1", "2", "3", "4"}
    speeds = np.array(speeds)
    assert (speeds > 1.0).mean() > 0.1 and (speeds < 0.01).mean() > 0.1  # some move, some stand


def test_num_lidar_pts_counts_points_on_each_box(nusc, synth_root):
    sample = nusc.sample[len(nusc.sample) // 2]
    sd = nusc.get("sample_data", sample["data"][LIDAR])
    pts = np.fromfile(synth_root / sd["filename"], dtype=np.float32).reshape(-1, 5)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    l2g = geo.transform(np.array(pose["rotation"]), pose["translation"]) @ geo.transform(
        np.array(cs["rotation"]), cs["translation"]
    )
    pts_g = geo.apply(l2g, pts[:, :3].astype(np.float64))
    assert np.abs(pts_g[pts[:, 3] < 20, 2]).max() < 1e-3  # low-intensity points lie on the ground
    anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    yaws = np.array([np.arctan2(*geo.quat_to_matrix(a["rotation"])[[1, 0], 0]) for a in anns])
    lwh = np.array([[a["size"][1], a["size"][0], a["size"][2]] for a in anns])
    # object returns (high intensity) lie on a box surface: a 1 cm larger box holds each exactly once
    inside = geo.points_in_boxes(pts_g[pts[:, 3] >= 20], np.array([a["translation"] for a in anns]), lwh + 0.02, yaws)
    assert (inside.sum(1) == 1).all()
    counts = inside.sum(0)
    assert sum(a["num_lidar_pts"] for a in anns) > 100
    for a, c in zip(anns, counts):
        assert c == a["num_lidar_pts"], (a["category_name"], c, a["num_lidar_pts"])


def test_objects_are_drawn_with_the_true_projection(nusc, synth_root):
    """A visible box centre projected with the devkit's own calibration lands on that class's colour."""
    hits, on_object, total = 0, 0, 0
    for sample in nusc.sample[::3]:
        for cam in CAMERAS:
            sd = nusc.get("sample_data", sample["data"][cam])
            img = np.asarray(Image.open(synth_root / sd["filename"]).convert("HSV")).astype(float)
            _, boxes, k = nusc.get_sample_data(sd["token"])
            assert k[0, 2] < sd["width"] and k[1, 2] < sd["height"]
            for box in boxes:
                if box.center[2] < 1 or np.linalg.norm(box.center) > 50:
                    continue
                u, v = (k @ box.center)[:2] / box.center[2]
                if not (2 <= u < sd["width"] - 2 and 2 <= v < sd["height"] - 2):
                    continue
                total += 1
                h, s, _ = img[int(v), int(u)]
                cls = CATEGORY_TO_CLASS[box.name]
                want = np.asarray(Image.new("RGB", (1, 1), CLASS_COLOR[cls]).convert("HSV")).astype(float)[0, 0, 0]
                on_object += s > 100  # the ground and sky are nearly grey
                hits += s > 100 and min(abs(h - want), 256 - abs(h - want)) < 12
    assert total > 50
    assert on_object == total
    assert hits / total > 0.6, (hits, total)  # the rest are covered by a nearer object of another class


def test_synth_cli_and_bad_sizes(tmp_path):
    import pytest

    from raydrive.cli import main
    from raydrive.data.synth import SynthConfig

    assert (
        main(
            [
                "synth",
                str(tmp_path / "t"),
                "--scenes",
                "2",
                "--samples-per-scene",
                "2",
                "--width",
                "320",
                "--height",
                "180",
            ]
        )
        == 0
    )
    scenes = json.loads((tmp_path / "t" / "v1.0-mini" / "scene.json").read_text())
    assert len(scenes) == 2
    with pytest.raises(ValueError, match="--scenes"):
        SynthConfig(out=str(tmp_path), scenes=1)
    with pytest.raises(ValueError, match="too many"):
        from raydrive.data.synth import synthesize

        synthesize(SynthConfig(out=str(tmp_path / "x"), scenes=11, show_progress=False))
