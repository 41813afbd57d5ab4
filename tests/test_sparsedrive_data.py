"""SparseDrive's data: the synthetic map expansion and CAN bus, and the converter extras per key frame."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from shapely import ops
from shapely.geometry import LineString, Polygon, box

from raydrive.data import geometry as geo
from raydrive.data import sparsedrive_fields as sf
from raydrive.data import synth_map as sm
from raydrive.data.infos import DataError, frame_record
from raydrive.data.synth import LIDAR_MOUNT, LIDAR_YAW

HALF_X, HALF_Y = 15.0, 30.0  # the 30 x 60 m lidar-frame patch


@pytest.fixture(scope="module")
def maps(synth_root):
    return sf.load_maps(synth_root)


def _location(nusc, sample: dict) -> str:
    scene = nusc.get("scene", sample["scene_token"])
    return nusc.get("log", scene["log_token"])["location"]


def _info(nusc, sample: dict) -> dict:
    scene = nusc.get("scene", sample["scene_token"])
    return frame_record(nusc, sample, scene, _location(nusc, sample), 0)


def _ego_pose(nusc, sample: dict) -> dict:
    return nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])


def _lidar_pose(xy, yaw: float) -> np.ndarray:
    ego = geo.transform(geo.rot_z(yaw), [xy[0], xy[1], 0.0])
    return ego @ geo.transform(geo.rot_z(LIDAR_YAW), LIDAR_MOUNT)


# ---------------------------------------------------------------- the synthetic map


def test_map_loads_for_every_log_location(nusc, maps):
    locations = {log["location"] for log in nusc.log}
    assert locations <= set(maps), "NuScenesMap must load every location the logs name"
    for m in maps.values():
        assert m.version == sm.MAP_VERSION
        assert m.lane and m.road_segment and m.lane_divider and m.road_divider and m.ped_crossing
        tok = m.lane[0]["token"]
        assert m.get_arcline_path(tok) and set(m.get_outgoing_lane_ids(tok)) | set(m.get_incoming_lane_ids(tok))


def test_ego_drives_inside_its_lane_and_objects_mostly_on_road(nusc, maps):
    on_road = total = 0
    for sample in nusc.sample:
        m = maps[_location(nusc, sample)]
        x, y = _ego_pose(nusc, sample)["translation"][:2]
        layers = m.layers_on_point(x, y, ["drivable_area", "road_segment", "lane"])
        assert all(layers.values()), f"ego off the road at sample {sample['token']}: {layers}"
        # centred in a 3.5 m lane: the nearest divider is half a lane away
        dividers = [m.explorer.extract_line(r["line_token"]) for r in m.lane_divider + m.road_divider]
        nearest = min(line.distance(LineString([(x, y), (x + 1e-9, y)])) for line in dividers)
        assert nearest == pytest.approx(sm.LANE_WIDTH / 2, abs=0.02)
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            on_road += bool(m.record_on_point(*ann["translation"][:2], "road_segment"))
            total += 1
    assert on_road / total > 0.5


def test_frames_see_dividers_and_boundaries_on_both_sides(nusc, maps):
    for sample in nusc.sample:
        info = _info(nusc, sample)
        annos = sf.map_annos(maps[info["location"]], geo.lidar_to_global(info))
        assert len(annos[1]) >= 4
        sides = {np.sign(np.median(line[:, 0])) for line in annos[2]}
        assert sides == {-1.0, 1.0}, "road boundaries left and right of the ego"
        for lines in annos.values():
            for line in lines:
                assert np.all(np.abs(line[:, 0]) <= HALF_X + 1e-6) and np.all(np.abs(line[:, 1]) <= HALF_Y + 1e-6)


# ---------------------------------------------------------------- map_annos, checked two independent ways


def test_map_annos_on_a_straight_road_equal_the_closed_form(tmp_path):
    """Hand-picked pose on a straight road: every polyline follows from the road layout by hand."""
    road = sm.Road(key="t", x0=100.0, y0=200.0, yaw0=0.3, curvature=0.0, s_min=-80.0, s_max=80.0, crossing_phase=12.0)
    sm.write_map_expansion(tmp_path, "boston-seaport", [road])
    (nusc_map,) = sf.load_maps(tmp_path, ["boston-seaport"]).values()
    s_ego = 5.0
    annos = sf.map_annos(nusc_map, _lidar_pose(road.point([s_ego])[0], road.yaw0))
    s_lidar = s_ego + LIDAR_MOUNT[0]  # lidar x = ego right, lidar y = ego forward: (s, d) -> (-d, s - s_lidar)

    # dividers: the 6 inner lane edges, across the whole 60 m, in the road's direction
    edges = -sm.HALF_ROAD + sm.LANE_WIDTH * np.arange(1, sm.NUM_LANES)
    got = sorted(annos[1], key=lambda line: line[0, 0])
    assert len(got) == len(edges)
    for line, d in zip(got, sorted(-edges)):
        np.testing.assert_allclose(line[:, 0], d, atol=1e-6)
        np.testing.assert_allclose(line[[0, -1], 1], [-HALF_Y, HALF_Y], atol=1e-6)
        assert np.all(np.diff(line[:, 1]) > 0)

    # boundaries: the road edges 0.2 m inside the patch, drivable area on their right (clockwise)
    right, left = sorted(annos[2], key=lambda line: -line[0, 0])
    np.testing.assert_allclose(right[[0, -1]], [[12.25, 29.8], [12.25, -29.8]], atol=1e-6)
    np.testing.assert_allclose(left[[0, -1]], [[-12.25, -29.8], [-12.25, 29.8]], atol=1e-6)
    for line in (right, left):
        np.testing.assert_allclose(line[:, 0], line[0, 0], atol=1e-6)

    # the crossing at s = 12 (the one at -38 and at 62 are outside): a closed counter-clockwise box
    (ring,) = annos[0]
    lo, hi = 12.0 - sm.CROSSING_DEPTH / 2 - s_lidar, 12.0 + sm.CROSSING_DEPTH / 2 - s_lidar
    np.testing.assert_allclose(ring[0], ring[-1])
    corners = {tuple(np.round(p, 6)) for p in ring[:-1]}
    assert corners == {(x, y) for x in (-12.25, 12.25) for y in (round(lo, 6), round(hi, 6))}
    assert Polygon(ring).exterior.is_ccw


def _independent_annos(map_json: dict, lidar2global: np.ndarray) -> dict:
    """The spec's patch logic written without the devkit: map nodes into the lidar frame, clip by the box."""
    nodes = {n["token"]: (n["x"], n["y"]) for n in map_json["node"]}
    inv = np.linalg.inv(lidar2global)

    def local(tokens):
        xy = np.array([nodes[t] for t in tokens])
        return geo.apply(inv, np.c_[xy, np.zeros(len(xy))])[:, :2]

    lines = {r["token"]: r["node_tokens"] for r in map_json["line"]}
    polys = {r["token"]: r["exterior_node_tokens"] for r in map_json["polygon"]}
    patch = box(-HALF_X, -HALF_Y, HALF_X, HALF_Y)
    inset = box(-HALF_X + 0.2, -HALF_Y + 0.2, HALF_X - 0.2, HALF_Y - 0.2)

    def parts(geom):
        return [g for g in getattr(geom, "geoms", [geom]) if not g.is_empty and g.geom_type == "LineString"]

    dividers = []
    for r in map_json["lane_divider"] + map_json["road_divider"]:
        dividers += parts(LineString(local(lines[r["line_token"]])).intersection(patch))
    crossings = []
    for r in map_json["ped_crossing"]:
        clipped = Polygon(local(polys[r["polygon_token"]])).intersection(patch)
        for p in getattr(clipped, "geoms", [clipped]):
            if p.geom_type == "Polygon" and not p.is_empty:
                ring = p.exterior if p.exterior.is_ccw else p.exterior.reverse()
                crossings.append(LineString(ring.coords))
    drivable = ops.unary_union(
        [Polygon(local(polys[r["polygon_token"]])) for r in map_json["road_segment"] + map_json["lane"]]
    ).intersection(patch)
    boundaries = []
    for p in getattr(drivable, "geoms", [drivable]):
        ring = p.exterior if not p.exterior.is_ccw else p.exterior.reverse()
        boundaries += parts(ops.linemerge(parts(ring.intersection(inset))))
    return {0: crossings, 1: dividers, 2: boundaries}


def _same_polylines(got: list[np.ndarray], want: list[LineString]) -> None:
    assert len(got) == len(want)
    unmatched = list(want)
    for line in got:
        g = LineString(line)
        dists = [g.hausdorff_distance(w) for w in unmatched]
        k = int(np.argmin(dists))
        assert dists[k] < 1e-6
        w = np.asarray(unmatched.pop(k).coords)
        if not np.allclose(w[0], w[-1]):  # open lines also run the same way
            np.testing.assert_allclose(line[[0, -1]], w[[0, -1]], atol=1e-6)


def test_map_annos_on_curved_synthetic_roads_equal_an_independent_clip(nusc, synth_root, maps):
    checked = 0
    for sample in nusc.sample[::2]:
        info = _info(nusc, sample)
        lidar2global = geo.lidar_to_global(info)
        got = sf.map_annos(maps[info["location"]], lidar2global)
        map_json = json.loads((synth_root / "maps" / "expansion" / f"{info['location']}.json").read_text())
        want = _independent_annos(map_json, lidar2global)
        for label in range(3):
            _same_polylines(got[label], want[label])
        checked += bool(got[0])
    assert checked, "at least one checked frame sees a crossing"


def test_map_columns_round_trip(nusc, maps):
    info = _info(nusc, nusc.sample[0])
    annos = sf.map_annos(maps[info["location"]], geo.lidar_to_global(info))
    back = sf.map_annos_from_columns(sf.map_columns(annos))
    assert set(back) == {0, 1, 2}
    for label in annos:
        assert len(back[label]) == len(annos[label])
        for a, b in zip(annos[label], back[label]):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- futures and command


def _future_lidar_poses(start_xy, yaw0: float, speed: float, yaw_rate: float, steps: int) -> list[np.ndarray]:
    poses = []
    for k in range(1, steps + 1):
        t = 0.5 * k
        if abs(yaw_rate) < 1e-12:
            xy = np.array(start_xy) + speed * t * np.array([math.cos(yaw0), math.sin(yaw0)])
        else:
            r = speed / yaw_rate
            h = yaw0 + yaw_rate * t
            xy = np.array(start_xy) + r * np.array([math.sin(h) - math.sin(yaw0), math.cos(yaw0) - math.cos(h)])
        poses.append(_lidar_pose(xy, yaw0 + yaw_rate * t))
    return poses


def test_ego_futures_straight_and_turning():
    start, yaw0 = (50.0, -20.0), 0.7
    now = _lidar_pose(start, yaw0)
    offsets, masks, cmd = sf.ego_future_offsets(now, _future_lidar_poses(start, yaw0, 5.0, 0.0, 6))
    np.testing.assert_allclose(offsets, np.tile([0.0, 2.5], (6, 1)), atol=1e-5)
    np.testing.assert_array_equal(masks, np.ones(6))
    np.testing.assert_array_equal(cmd, [0, 0, 1])

    for rate, want in ((-0.4, [1, 0, 0]), (0.4, [0, 1, 0])):  # negative yaw rate turns right
        offsets, masks, cmd = sf.ego_future_offsets(now, _future_lidar_poses(start, yaw0, 5.0, rate, 6))
        np.testing.assert_array_equal(cmd, want)
        final = offsets.sum(0)
        assert math.copysign(1, final[0]) == (1 if rate < 0 else -1) and abs(final[0]) > sf.COMMAND_THRESHOLD
        radius = math.hypot(5.0 / 0.4, LIDAR_MOUNT[0])  # the lidar, ahead of the ego origin, runs a wider circle
        np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), 2 * radius * math.sin(0.1), rtol=1e-5)

    # the scene ends after two steps: the rest repeats the last pose
    offsets, masks, cmd = sf.ego_future_offsets(now, _future_lidar_poses(start, yaw0, 5.0, -0.4, 2))
    np.testing.assert_array_equal(masks, [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(offsets[2:], 0)
    np.testing.assert_array_equal(cmd, [0, 0, 1])


def test_driving_command_threshold():
    np.testing.assert_array_equal(sf.driving_command(np.array([2.0, 9.0])), [1, 0, 0])
    np.testing.assert_array_equal(sf.driving_command(np.array([1.99, 9.0])), [0, 0, 1])
    np.testing.assert_array_equal(sf.driving_command(np.array([-2.0, 9.0])), [0, 1, 0])


def test_futures_on_the_synthetic_scenes(nusc, maps):
    for sample in nusc.sample:
        info = _info(nusc, sample)
        fields = sf.sparsedrive_fields(nusc, maps, sample["token"], info)
        inv = np.linalg.inv(geo.lidar_to_global(info))

        # ego: cumulative offsets are the future lidar origins in this lidar frame
        future, cur = [], sample
        while len(future) < sf.EGO_FUT_STEPS and cur["next"]:
            cur = nusc.get("sample", cur["next"])
            future.append(sf._lidar_pose(nusc, cur)[:3, 3])
        n = len(future)
        np.testing.assert_array_equal(fields["gt_ego_fut_masks"], [1] * n + [0] * (sf.EGO_FUT_STEPS - n))
        if n:
            want = geo.apply(inv, np.array(future))[:, :2]
            np.testing.assert_allclose(np.cumsum(fields["gt_ego_fut_trajs"][:n], axis=0), want, atol=1e-4)
            assert np.all(fields["gt_ego_fut_trajs"][:n, 1] > 1.0), "the ego drives forward (lidar +y)"
        np.testing.assert_array_equal(fields["gt_ego_fut_trajs"][n:], 0)
        assert fields["gt_ego_fut_cmd"].sum() == 1

        # agents: cumulative offsets from the box centre are the later annotations in this lidar frame
        trajs, masks = fields["gt_agent_fut_trajs"], fields["gt_agent_fut_masks"]
        assert trajs.shape == (len(info["ann_tokens"]), sf.AGENT_FUT_STEPS, 2)
        for i, token in enumerate(info["ann_tokens"]):
            later, ann = [], nusc.get("sample_annotation", token)
            while ann["next"] and len(later) < sf.AGENT_FUT_STEPS:
                ann = nusc.get("sample_annotation", ann["next"])
                later.append(ann["translation"])
            k = len(later)
            np.testing.assert_array_equal(masks[i], [1] * k + [0] * (sf.AGENT_FUT_STEPS - k))
            np.testing.assert_array_equal(trajs[i, k:], 0)
            if k:
                want = geo.apply(inv, np.array(later))[:, :2]
                got = info["gt_boxes"][i, :2] + np.cumsum(trajs[i, :k], axis=0)
                np.testing.assert_allclose(got, want, atol=1e-4)


def test_ego_status_from_the_synthetic_can_bus(nusc, synth_root, maps):
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus

    can = NuScenesCanBus(dataroot=str(synth_root))
    sample = nusc.sample[1]
    info = _info(nusc, sample)
    fields = sf.sparsedrive_fields(nusc, maps, sample["token"], info, can_bus=can)
    status = fields["ego_status"]
    assert status.shape == (10,) and status.dtype == np.float32
    prev, now = (_ego_pose(nusc, s) for s in (nusc.get("sample", sample["prev"]), sample))
    speed = np.linalg.norm(np.subtract(now["translation"], prev["translation"])) / 0.5
    yaw_rate = (sf._yaw_of_quat(now["rotation"]) - sf._yaw_of_quat(prev["rotation"])) / 0.5
    assert status[6] == pytest.approx(speed, rel=1e-3) and status[7] == 0 and status[8] == 0
    assert status[5] == pytest.approx(yaw_rate, abs=1e-5)
    assert np.sign(status[9]) == np.sign(yaw_rate) and status[1] == pytest.approx(speed * yaw_rate, abs=1e-3)
    np.testing.assert_array_equal(sf.ego_status(None, info["scene_name"], info["timestamp"]), np.zeros(10))
    np.testing.assert_array_equal(sf.ego_status(can, "scene-0999", info["timestamp"]), np.zeros(10))


def test_missing_map_location_is_a_clear_error(nusc):
    sample = nusc.sample[0]
    with pytest.raises(DataError, match="maps/expansion"):
        sf.sparsedrive_fields(nusc, {}, sample["token"], _info(nusc, sample))


# ---------------------------------------------------------------- in `raydrive prepare`


def test_layer_patches_equal_the_devkit_explorer(nusc, maps):
    """Prepare's indexed patch query gives the devkit's `_get_layer_*` geometries, byte for byte."""
    for sample in nusc.sample[::3]:
        info = _info(nusc, sample)
        nusc_map = maps[info["location"]]
        patch_box, angle = sf.patch_of(geo.lidar_to_global(info))
        explorer = nusc_map.explorer
        for layer in ("lane_divider", "road_divider"):
            want = explorer._get_layer_line(patch_box, angle, layer)
            assert [g.wkb for g in sf.layer_in_patch(nusc_map, patch_box, angle, layer)] == [g.wkb for g in want]
        for layer in ("ped_crossing", "road_segment", "lane"):
            want = explorer._get_layer_polygon(patch_box, angle, layer)
            assert [g.wkb for g in sf.layer_in_patch(nusc_map, patch_box, angle, layer)] == [g.wkb for g in want]


def test_prepared_records_carry_the_fields(nusc, synth_root, maps, prepared, records):
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus

    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["sparsedrive"]["missing_map_locations"] == [] and manifest["sparsedrive"]["can_bus"] is True
    can = NuScenesCanBus(dataroot=str(synth_root))
    for rec in records["train"][::5] + records["val"][::5]:  # read back from parquet
        want = sf.sparsedrive_fields(nusc, maps, rec["token"], rec, can_bus=can)
        assert rec["has_map_annos"] is True and rec["has_futures"] is True
        for key, value in want.items():
            if isinstance(value, np.ndarray):
                assert rec[key].dtype == value.dtype and rec[key].shape == value.shape, key
                np.testing.assert_array_equal(rec[key], value, err_msg=key)
        back = sf.map_annos_from_columns(rec)
        assert sum(len(v) for v in back.values()) == len(rec["map_line_label"])


def _tree_without_expansion(synth_root, root):
    """The synthetic tree (linked, not copied) without maps/expansion/ and can_bus/."""
    root.mkdir()
    for entry in synth_root.iterdir():
        if entry.name not in ("maps", "can_bus"):
            (root / entry.name).symlink_to(entry)
    (root / "maps").mkdir()
    for png in (synth_root / "maps").glob("*.png"):
        (root / "maps" / png.name).symlink_to(png)
    return root


def test_missing_map_expansion_degrades_then_fails_where_needed(synth_root, tmp_path, capsys):
    from raydrive.data.assets import SPARSEDRIVE_ASSETS, ensure_assets
    from raydrive.data.parquet import read_split, table_to_records
    from raydrive.data.pkl_formats import write_pkl
    from raydrive.data.prepare import PrepareConfig, prepare

    root = _tree_without_expansion(synth_root, tmp_path / "root")
    out = tmp_path / "prepared"
    with pytest.warns(UserWarning, match="skipping asset sparsedrive_map_100"):  # a prepare for every model
        manifest = prepare(PrepareConfig(out=str(out), dataroot=str(root), show_progress=False, depth_gt=False))
    printed = capsys.readouterr().out
    assert "have no map_annos: no map expansion for" in printed and "ego_status is zero" in printed
    note = manifest["sparsedrive"]
    assert note["map_locations"] == [] and note["can_bus"] is False and note["frames_without_map"] > 0
    recs = table_to_records(read_split(out / "infos" / "train"))
    assert all(not r["has_map_annos"] and len(r["map_points"]) == 0 for r in recs)
    assert all(r["has_futures"] and not r["ego_status"].any() for r in recs)

    # only what needs the map fails, with a named error that says what to install
    with pytest.raises(sf.MissingSparseDriveData, match=r"maps/expansion/<location>\.json"):
        ensure_assets(out, SPARSEDRIVE_ASSETS)
    assert ensure_assets(out, ["sparsedrive_motion_6"])["sparsedrive_motion_6"].is_file()
    with pytest.raises(sf.MissingSparseDriveData, match="map expansion"):
        write_pkl(recs, "sparsedrive", tmp_path / "x.pkl", "v1.0-mini", str(root))


def test_sparsedrive_pkl_round_trip(records, synth_root, tmp_path):
    from raydrive.data.pkl_formats import records_from_pkl, write_pkl
    from raydrive.safe_pickle import load_pickle

    path = tmp_path / "nuscenes_infos_val.pkl"
    write_pkl(records["val"], "sparsedrive", path, "v1.0-mini", str(synth_root))
    with open(path, "rb") as f:
        info = load_pickle(f)["infos"][0]
    # upstream's converter keys and types
    assert set(info["map_annos"]) == {0, 1, 2} and info["map_location"] == records["val"][0]["location"]
    assert all(line.shape[1] == 2 for lines in info["map_annos"].values() for line in lines)
    assert info["gt_agent_fut_trajs"].shape == (len(info["gt_boxes"]), 12, 2)
    assert info["gt_ego_fut_cmd"].dtype == np.float32 and info["ego_status"].shape == (10,)

    back, fmt, _ = records_from_pkl(path, str(synth_root))
    assert fmt == "sparsedrive"
    for a, b in zip(records["val"], back):
        assert a["token"] == b["token"] and b["has_map_annos"] and b["has_futures"]
        for key in ("map_points", "map_line_label", "map_line_num_points", "gt_agent_fut_trajs", "ego_status"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        for key in ("gt_agent_fut_masks", "gt_ego_fut_trajs", "gt_ego_fut_masks", "gt_ego_fut_cmd"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_pkls_without_the_fields_are_flagged(prepared, synth_root):
    from raydrive.data.pkl_formats import records_from_pkl

    for fmt in ("sparse4d", "bevdepth"):
        back, _, _ = records_from_pkl(prepared / "pkl" / fmt / "nuscenes_infos_val.pkl", str(synth_root))
        assert not any(r["has_map_annos"] or r["has_futures"] for r in back)
        assert all(r["gt_agent_fut_trajs"].shape == (len(r["gt_boxes"]), 12, 2) for r in back)
        with pytest.raises(sf.MissingSparseDriveData, match="without SparseDrive's futures"):
            sf.require_sparsedrive_fields(back, "the test", ("has_futures",))


def test_incomplete_sparsedrive_info_is_named(records, synth_root, tmp_path):
    import pickle

    from raydrive.data.pkl_formats import records_from_pkl, write_pkl
    from raydrive.safe_pickle import load_pickle

    path = tmp_path / "nuscenes_infos_val.pkl"
    write_pkl(records["val"][:2], "sparsedrive", path, "v1.0-mini", str(synth_root))
    with open(path, "rb") as f:
        payload = load_pickle(f)
    payload["infos"][1]["gt_agent_fut_trajs"] = payload["infos"][1]["gt_agent_fut_trajs"][:, :5]
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match=r"record 1 .*gt_agent_fut_trajs has shape"):
        records_from_pkl(path, str(synth_root))


def test_default_cache_without_map_expansion_is_rebuilt(tmp_path, monkeypatch):
    """Caches written before the map expansion existed or with other synthesis settings (and prepared
    sets of an older schema) are redone."""
    from raydrive.data import default
    from raydrive.data.parquet import SCHEMA_VERSION

    calls = []

    def fake_synth(cfg):
        root = Path(cfg.out)
        for marker in ("v1.0-mini/sample_data.json", "maps/expansion/boston-seaport.json", "can_bus/x.json"):
            (root / marker).parent.mkdir(parents=True, exist_ok=True)
            (root / marker).write_text("{}")
        calls.append("synth")
        assert cfg.samples_per_scene >= 13, "long enough for one frame's 6 s agent future"

    def fake_prepare(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
        calls.append("prepare")

    monkeypatch.setattr(default, "synthesize", fake_synth)
    monkeypatch.setattr(default, "prepare", fake_prepare)
    dataroot, prepared = default.ensure_default_data(tmp_path, show_progress=False)
    assert calls == ["synth", "prepare"]
    default.ensure_default_data(tmp_path, show_progress=False)
    assert calls == ["synth", "prepare"], "a current cache is reused"

    shutil.rmtree(dataroot / "maps" / "expansion")  # an old cache
    default.ensure_default_data(tmp_path, show_progress=False)
    assert calls[2:] == ["synth", "prepare"] and (dataroot / "maps" / "expansion").is_dir()

    (prepared / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION - 1}))
    default.ensure_default_data(tmp_path, show_progress=False)
    assert calls[4:] == ["prepare"]

    (dataroot / ".complete").write_text("ok\n")  # what a raydrive with 10-frame scenes wrote
    default.ensure_default_data(tmp_path, show_progress=False)
    assert calls[5:] == ["synth", "prepare"]
