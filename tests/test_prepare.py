"""`raydrive prepare`: records match the devkit, files are complete, bad input gets a clear error."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydrive.data.constants import CAMERAS, CLASSES
from raydrive.data.depth_gt import depth_file, read_depth_gt
from raydrive.data.infos import DataError, build_infos
from raydrive.data.parquet import read_split, sha256_file
from raydrive.data.pkl_formats import records_from_pkl
from raydrive.data.prepare import PrepareConfig, load_manifest, prepare


def test_manifest_counts_and_hashes(prepared, records):
    m = load_manifest(prepared)
    assert m["version"] == "v1.0-mini" and m["classes"] == list(CLASSES) and m["cameras"] == list(CAMERAS)
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["frames"] == len(records[split]) > 0
        assert info["boxes"] == sum(len(r["gt_boxes"]) for r in records[split])
        for f in info["files"]:
            path = prepared / "infos" / split / f["path"]
            assert sha256_file(path) == f["sha256"] and pq.read_metadata(path).num_rows == f["rows"]
    assert m["depth_gt"]["files"] == 6 * sum(len(v) for v in records.values())
    schema = pq.read_schema(next((prepared / "infos" / "train").glob("*.parquet")))
    assert (
        str(schema.field("cam_intrinsic").type)
        == "extension<arrow.fixed_shape_tensor[value_type=double, shape=[6,3,3]]>"
    )


def test_records_match_devkit(nusc, records):
    for rec in records["val"][::4]:
        _, boxes, _ = nusc.get_sample_data(rec["lidar_sample_data_token"])
        assert len(boxes) == len(rec["gt_boxes"])
        for box, mine, token in zip(boxes, rec["gt_boxes"], rec["ann_tokens"]):
            assert box.token == token
            np.testing.assert_allclose(mine[:3], box.center, atol=1e-6)
            np.testing.assert_allclose(mine[3:6], box.wlh[[1, 0, 2]], atol=1e-6)
            assert abs(np.angle(np.exp(1j * (mine[6] - box.orientation.yaw_pitch_roll[0])))) < 1e-6
        # timestamp order, sweeps empty exactly on a scene's first frame
        assert (len(rec["sweeps"]) == 0) == (rec["frame_idx"] == 0)
    ts = [r["timestamp"] for r in records["train"]]
    assert ts == sorted(ts)


def test_parquet_roundtrip_equals_fresh_conversion(nusc, records):
    fresh = build_infos(nusc, "v1.0-mini", show_progress=False)["train"]
    assert [r["token"] for r in fresh] == [r["token"] for r in records["train"]]
    a, b = fresh[3], records["train"][3]
    for key in ("gt_boxes", "gt_velocity", "num_lidar_pts", "instance_inds", "ann2d_bbox", "ann2d_center"):
        np.testing.assert_allclose(a[key], b[key], equal_nan=True)
    for cam in CAMERAS:
        for key in ("sensor2lidar_rotation", "sensor2lidar_translation", "cam_intrinsic"):
            np.testing.assert_allclose(a["cams"][cam][key], b["cams"][cam][key])
    assert list(a["gt_names"]) == list(b["gt_names"]) and len(a["sweeps"]) == len(b["sweeps"])


def test_depth_gt_matches_devkit_projection(nusc, prepared, records):
    """Our lidar -> ego -> global -> ego(t_cam) -> camera chain equals the devkit's own."""
    from nuscenes.nuscenes import NuScenesExplorer

    explorer = NuScenesExplorer(nusc)
    rec = records["val"][2]
    for cam in ("CAM_FRONT", "CAM_BACK_LEFT"):
        uvd = read_depth_gt(depth_file(prepared / "depth_gt", rec["cams"][cam]["data_path"]))
        pts, depth, _ = explorer.map_pointcloud_to_image(
            rec["lidar_sample_data_token"], rec["cams"][cam]["sample_data_token"], min_dist=0.0
        )
        assert len(uvd) == pts.shape[1] > 100
        np.testing.assert_allclose(uvd[:, 0], pts[0], atol=0.05)  # the devkit works in float32
        np.testing.assert_allclose(uvd[:, 2], depth, atol=0.01)


def test_anchors(prepared, records):
    anchors = np.load(prepared / "anchors" / "nuscenes_kmeans900.npy")
    assert anchors.shape == (900, 11) and anchors.dtype == np.float32
    assert np.all(anchors[:, 6] == 0) and np.all(anchors[:, 7] == 1) and np.all(anchors[:, 8:] == 0)
    assert np.linalg.norm(anchors[:, :3], axis=1).max() <= 56
    boxes = np.concatenate([r["gt_boxes"] for r in records["train"]])
    np.testing.assert_allclose(
        anchors[0, 3:6], np.log(boxes[np.linalg.norm(boxes[:, :3], axis=1) <= 55, 3:6].mean(0)), rtol=1e-5
    )


@pytest.mark.parametrize(
    "fmt,name",
    [
        ("sparse4d", "nuscenes_infos_val.pkl"),
        ("streampetr", "nuscenes2d_temporal_infos_val.pkl"),
        ("bevdepth", "nuscenes_infos_val.pkl"),
    ],
)
def test_pkl_layouts_read_back(prepared, records, synth_root, fmt, name):
    path = prepared / "pkl" / fmt / name
    payload = pickle.loads(path.read_bytes())
    if fmt == "bevdepth":
        assert isinstance(payload, list) and set(payload[0]["cam_infos"]) == set(CAMERAS)
    else:
        assert payload["metadata"]["version"] == "v1.0-mini"
        assert list(payload["infos"][0]["cams"]) == list(CAMERAS)
    back, detected, _ = records_from_pkl(path, str(synth_root))
    assert detected == fmt
    for a, b in zip(records["val"], back):
        assert a["token"] == b["token"] and a["lidar_path"] == b["lidar_path"]
        np.testing.assert_allclose(a["gt_boxes"], b["gt_boxes"], atol=1e-6)
        np.testing.assert_allclose(
            a["cams"]["CAM_FRONT"]["sensor2lidar_translation"],
            b["cams"]["CAM_FRONT"]["sensor2lidar_translation"],
            atol=1e-6,
        )
        assert a["frame_idx"] == b["frame_idx"]
    assert len({r["scene_token"] for r in back}) == len({r["scene_token"] for r in records["val"]})


def test_prepare_from_pkl(prepared, records, synth_root, tmp_path):
    from raydrive.cli import main

    pkl = prepared / "pkl" / "sparse4d" / "nuscenes_infos_train.pkl"
    assert main(["prepare", "--from-pkl", str(pkl), "--dataroot", str(synth_root), "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["source"]["format"] == "sparse4d" and m["splits"]["train"]["frames"] == len(records["train"])
    assert (tmp_path / "anchors" / "nuscenes_kmeans900.npy").is_file()
    back = read_split(tmp_path / "infos" / "train")
    assert back.column("token").to_pylist() == [r["token"] for r in records["train"]]


# ---- bad input -------------------------------------------------------------------------------


@pytest.fixture
def broken_root(synth_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    return root


def test_missing_image_names_the_file(broken_root, tmp_path):
    victim = sorted((broken_root / "samples" / "CAM_BACK").glob("*.jpg"))[2]
    victim.unlink()
    with pytest.raises(DataError, match=f"missing image .*{victim.name}"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), dataroot=str(broken_root), show_progress=False))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_lidar_names_the_file(broken_root, tmp_path):
    victim = sorted((broken_root / "samples" / "LIDAR_TOP").glob("*.bin"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=f"missing lidar file .*{victim.name}"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), dataroot=str(broken_root), show_progress=False))


def test_unknown_class_names_the_class(broken_root, tmp_path):
    cats = json.loads((broken_root / "v1.0-mini" / "category.json").read_text())
    cats[0]["name"] = "vehicle.spaceship"
    (broken_root / "v1.0-mini" / "category.json").write_text(json.dumps(cats))
    with pytest.raises(DataError, match="unknown class name 'vehicle.spaceship'"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), dataroot=str(broken_root), show_progress=False))


def test_empty_split_is_an_error(tmp_path):
    from raydrive.data.synth import SynthConfig, synthesize

    root = synthesize(
        SynthConfig(
            out=str(tmp_path / "r"),
            scenes=2,
            samples_per_scene=2,
            image_width=160,
            image_height=90,
            show_progress=False,
        )
    )
    scenes = json.loads((root / "v1.0-mini" / "scene.json").read_text())
    for s in scenes:
        s["name"] = "scene-0061"  # both scenes claim a train name: the val split is empty
    (root / "v1.0-mini" / "scene.json").write_text(json.dumps(scenes))
    with pytest.raises(DataError, match="split 'val' of v1.0-mini is empty"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), dataroot=str(root), show_progress=False))


def test_corrupt_and_truncated_pkl(prepared, tmp_path):
    good = (prepared / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl").read_bytes()
    (tmp_path / "trunc_val.pkl").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk_val.pkl").write_bytes(b"this is not a pickle")
    for name in ("trunc_val.pkl", "junk_val.pkl"):
        with pytest.raises(DataError, match=f"{name} is corrupt or truncated"):
            records_from_pkl(tmp_path / name)
    with pytest.raises(DataError, match="does not exist"):
        records_from_pkl(tmp_path / "nope.pkl")


def test_wrong_camera_count_and_unknown_class_in_pkl(prepared, tmp_path):
    payload = pickle.loads((prepared / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl").read_bytes())
    del payload["infos"][1]["cams"]["CAM_BACK"]
    (tmp_path / "five_val.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match="record 1 .* has 5 cameras"):
        records_from_pkl(tmp_path / "five_val.pkl")
    payload = pickle.loads((prepared / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl").read_bytes())
    payload["infos"][0]["gt_names"][0] = "ufo"
    (tmp_path / "ufo_val.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match="unknown class name 'ufo' in record 0"):
        records_from_pkl(tmp_path / "ufo_val.pkl")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from raydrive.cli import main

    assert main(["prepare", "--dataroot", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no v1.0-mini tables under" in capsys.readouterr().err
