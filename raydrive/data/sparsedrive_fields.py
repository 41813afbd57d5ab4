"""SparseDrive's converter extras for one key frame, as upstream's `nuscenes_converter.py` computes them.

- `map_annos`: `{0: ped_crossing, 1: divider, 2: boundary}` lists of (n, 2) polylines in the key-frame
  lidar frame, from a 30 (x) by 60 (y) m patch of the map expansion around the lidar. Dividers are the
  lane and road dividers; crossings are closed counter-clockwise contours (nearly parallel crossings
  whose boxes overlap merged first); boundaries are the contours of the union of road segments and
  lanes, clipped 0.2 m inside the patch, exteriors clockwise (drivable area on their right) and holes
  counter-clockwise. Geometry is what the devkit's `NuScenesMapExplorer` gives, as upstream.
- agent futures: per box 12 steps (6 s at 2 Hz) of xy offsets in the lidar frame (the first from the
  current centre) and a mask, from the annotations that follow the box (the devkit's PredictHelper rule).
- ego futures: 6 steps (3 s) of offsets between the future lidar origins in the current lidar frame and
  a mask; a scene that ends early repeats its last pose (zero offsets, mask 0).
- `gt_ego_fut_cmd`: one-hot right / left / straight from the final future lidar x (x points to the
  ego's right): x >= 2 m right, x <= -2 m left, else straight.
- `ego_status` (10): CAN bus acceleration (3), rotation rate (3), velocity (3) and steering angle at
  the nearest messages; zeros where the scene has no CAN data, as upstream.

`sparsedrive_fields` returns parquet-friendly columns (`map_annos` flattened, see `map_columns`);
`add_sparsedrive_fields` fills them into every record `raydrive prepare` builds.

Missing inputs degrade instead of failing prepare, which also serves the models that need none of this:
a location without a map expansion file gives frames with no polylines and `has_map_annos` False, a
tree without CAN bus gives zero `ego_status` (as upstream), and records read from pkls that lack the
futures carry `has_futures` False. Prepare warns and notes it in the manifest (`sparsedrive`); the steps
that need the fields (SparseDrive's k-means assets, its model) call `require_sparsedrive_fields`, which
raises `MissingSparseDriveData` naming what to install.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shapely import affinity, ops
from shapely.geometry import LinearRing, LineString, MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.strtree import STRtree

from raydrive.data import geometry as geo
from raydrive.data.constants import LIDAR
from raydrive.data.infos import DataError

MAP_CLASSES: tuple[str, ...] = ("ped_crossing", "divider", "boundary")
ROI_SIZE: tuple[float, float] = (30.0, 60.0)  # lidar-frame patch: x (ego's right) by y (ego's forward), metres
BOUNDARY_INSET = 0.2  # boundaries are clipped this far inside the patch, so its edges are no boundary
PARALLEL_TOL = 0.01  # crossings merge when 1 - |cos| of their long sides is below this (about 8 degrees)
AGENT_FUT_STEPS = 12
EGO_FUT_STEPS = 6
FUTURE_BUFFER_S = 0.15  # the devkit's PredictHelper tolerance on the future horizon
COMMAND_THRESHOLD = 2.0  # metres of final lateral offset that make a turn command
COMMANDS: tuple[str, ...] = ("right", "left", "straight")
EGO_STATUS_DIM = 10


# ---------------------------------------------------------------- map


def load_maps(dataroot: str | Path, locations: list[str] | None = None) -> dict:
    """`NuScenesMap` per location that has a map expansion file under `dataroot`."""
    from nuscenes.map_expansion.map_api import NuScenesMap
    from nuscenes.map_expansion.map_api import locations as known

    folder = Path(dataroot) / "maps" / "expansion"
    wanted = locations if locations is not None else list(known)
    return {loc: NuScenesMap(str(dataroot), loc) for loc in wanted if (folder / f"{loc}.json").is_file()}


def split_geoms(geom: BaseGeometry) -> list[BaseGeometry]:
    """The valid non-empty parts of a (multi-)geometry."""
    parts = list(geom.geoms) if hasattr(geom, "geoms") else [geom]
    return [g for g in parts if g.is_valid and not g.is_empty]


def patch_of(lidar2global: np.ndarray, roi_size: tuple[float, float] = ROI_SIZE) -> tuple[tuple, float]:
    """The devkit's patch box (x, y, height = roi y, width = roi x) and its angle in degrees."""
    yaw = math.atan2(lidar2global[1, 0], lidar2global[0, 0])
    x, y = float(lidar2global[0, 3]), float(lidar2global[1, 3])
    return (x, y, roi_size[1], roi_size[0]), math.degrees(yaw)


@dataclass(frozen=True)
class _Layer:
    geoms: list[BaseGeometry]  # record order; only what the devkit keeps (valid polygons, non-empty lines)
    tree: STRtree


_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # NuScenesMap -> {layer: _Layer}


def _layer(nusc_map, name: str) -> _Layer:
    """A layer's geometries, built once per map: the devkit rebuilds every record's shape per query."""
    cache = _LAYERS.setdefault(nusc_map, {})
    if name not in cache:
        records = getattr(nusc_map, name)
        if name in nusc_map.non_geometric_line_layers:
            geoms = [g for g in (nusc_map.extract_line(r["line_token"]) for r in records) if not g.is_empty]
        else:
            geoms = [g for g in (nusc_map.extract_polygon(r["polygon_token"]) for r in records) if g.is_valid]
        cache[name] = _Layer(geoms, STRtree(geoms))
    return cache[name]


def layer_in_patch(nusc_map, patch_box: tuple, angle: float, name: str) -> list[BaseGeometry]:
    """What the devkit's `_get_layer_polygon` / `_get_layer_line` return, in the same order and with
    the same shapely operations, but intersecting only the records whose bounding box meets the patch
    (the others give empty pieces, which the devkit drops): prepare runs this for every key frame."""
    layer = _layer(nusc_map, name)
    patch = nusc_map.explorer.get_patch_coord(patch_box, angle)
    x, y = patch_box[0], patch_box[1]
    out: list[BaseGeometry] = []
    for i in sorted(int(k) for k in layer.tree.query(patch)):
        piece = layer.geoms[i].intersection(patch)
        if piece.is_empty:
            continue
        piece = affinity.rotate(piece, -angle, origin=(x, y), use_radians=False)
        piece = affinity.affine_transform(piece, [1.0, 0.0, 0.0, 1.0, -x, -y])
        if piece.geom_type == "Polygon":
            piece = MultiPolygon([piece])
        out.append(piece)
    return out


def _long_side(poly: Polygon) -> np.ndarray:
    """Longest side of the minimum rotated rectangle: a crossing's direction."""
    corners = np.asarray(poly.minimum_rotated_rectangle.exterior.coords)[:3]
    sides = corners[1:] - corners[:-1]
    return sides[int(np.argmax(np.linalg.norm(sides, axis=1)))]


def merge_parallel_crossings(polys: list[Polygon]) -> list[Polygon]:
    """Union crossings whose boxes overlap a kept one and that run within ~8 degrees of it.

    Real crossings come in pieces; upstream merges them this way before taking contours.
    """
    if not polys:
        return []
    tree = STRtree(polys)
    left = list(range(len(polys)))
    merged: list[BaseGeometry] = []
    for i, poly in enumerate(polys):
        if i not in left:
            continue
        left.remove(i)
        v = _long_side(poly)
        current: BaseGeometry = poly
        for j in sorted(int(k) for k in tree.query(poly)):
            if j not in left:
                continue
            w = _long_side(polys[j])
            cos = float(v @ w) / (np.linalg.norm(v) * np.linalg.norm(w))
            if 1.0 - abs(cos) < PARALLEL_TOL:
                current = current.union(polys[j])
                left.remove(j)
        merged.append(current)
    return [p for g in merged for p in split_geoms(g)]


def crossing_contour(poly: Polygon, local_patch: Polygon) -> LineString | None:
    """A crossing's counter-clockwise exterior inside the patch, as one (closed when whole) polyline."""
    ring = poly.exterior
    if not ring.is_ccw:
        ring = LinearRing(list(ring.coords)[::-1])
    lines = ring.intersection(local_patch)
    if lines.geom_type != "LineString":
        pieces = [g for g in getattr(lines, "geoms", [lines]) if g.geom_type != "Point"]
        lines = ops.linemerge(pieces) if pieces else LineString()
        if lines.geom_type != "LineString":  # pieces that do not join: chained in order
            lines = LineString(np.concatenate([np.asarray(g.coords) for g in lines.geoms], axis=0))
    return None if lines.is_empty else lines


def _ring_in_patch(ring: LinearRing, patch: Polygon, clockwise: bool) -> list[BaseGeometry]:
    if ring.is_ccw == clockwise:
        ring = LinearRing(list(ring.coords)[::-1])
    lines = ring.intersection(patch)
    if lines.geom_type == "MultiLineString":
        lines = ops.linemerge(lines)
    if lines.geom_type not in ("LineString", "MultiLineString"):
        raise ValueError(f"a drivable-area contour clipped to the patch gave a {lines.geom_type}")
    return split_geoms(lines)


def boundary_lines(drivable: list[Polygon], roi_size: tuple[float, float] = ROI_SIZE) -> list[BaseGeometry]:
    """Contours of drivable polygons inside the inset patch: exteriors clockwise, holes counter-clockwise."""
    hx, hy = roi_size[0] / 2 - BOUNDARY_INSET, roi_size[1] / 2 - BOUNDARY_INSET
    inset = box(-hx, -hy, hx, hy)
    out = [g for p in drivable for g in _ring_in_patch(p.exterior, inset, clockwise=True)]
    out += [g for p in drivable for hole in p.interiors for g in _ring_in_patch(hole, inset, clockwise=False)]
    return out


def map_geometries(nusc_map, lidar2global: np.ndarray, roi_size: tuple[float, float] = ROI_SIZE) -> dict:
    """Dividers, crossing contours and boundaries (shapely, lidar frame) around one lidar pose, from the
    devkit's layer patches (`layer_in_patch`)."""
    patch_box, angle = patch_of(lidar2global, roi_size)
    dividers = layer_in_patch(nusc_map, patch_box, angle, "lane_divider")
    dividers += layer_in_patch(nusc_map, patch_box, angle, "road_divider")
    divider_lines = [g for line in dividers for g in split_geoms(line)]

    crossings = [g for p in layer_in_patch(nusc_map, patch_box, angle, "ped_crossing") for g in split_geoms(p)]
    local_patch = box(-roi_size[0] / 2, -roi_size[1] / 2, roi_size[0] / 2, roi_size[1] / 2)
    contours = [crossing_contour(p, local_patch) for p in merge_parallel_crossings(crossings)]

    # SparseDrive takes road segments and lanes as the drivable area, not the devkit's drivable_area layer.
    roads = layer_in_patch(nusc_map, patch_box, angle, "road_segment")
    lanes = layer_in_patch(nusc_map, patch_box, angle, "lane")
    drivable = split_geoms(ops.unary_union([ops.unary_union(roads), ops.unary_union(lanes)]))
    return {
        "ped_crossing": [c for c in contours if c is not None],
        "divider": divider_lines,
        "boundary": boundary_lines(drivable, roi_size),
    }


def map_annos(nusc_map, lidar2global: np.ndarray, roi_size: tuple[float, float] = ROI_SIZE) -> dict:
    """Upstream's `map_annos`: class index -> list of (n, 2) float64 polylines in the lidar frame."""
    geoms = map_geometries(nusc_map, lidar2global, roi_size)
    return {
        label: [np.asarray(g.coords, dtype=np.float64)[:, :2] for g in geoms[c]] for label, c in enumerate(MAP_CLASSES)
    }


def map_columns(annos: dict) -> dict:
    """`map_annos` as flat columns: all points, and per polyline its class and point count."""
    lines = [(label, np.asarray(line, dtype=np.float64)) for label in sorted(annos) for line in annos[label]]
    return {
        "map_points": np.concatenate([p for _, p in lines]).reshape(-1, 2) if lines else np.zeros((0, 2)),
        "map_line_label": np.array([label for label, _ in lines], dtype=np.int8),
        "map_line_num_points": np.array([len(p) for _, p in lines], dtype=np.int32),
    }


def map_annos_from_columns(cols: dict) -> dict:
    """Inverse of `map_columns` (every class present, possibly with no polyline)."""
    points = np.asarray(cols["map_points"], dtype=np.float64).reshape(-1, 2)
    ends = np.cumsum(cols["map_line_num_points"])
    out: dict = {label: [] for label in range(len(MAP_CLASSES))}
    for label, end, n in zip(cols["map_line_label"], ends, cols["map_line_num_points"]):
        out[int(label)].append(points[end - n : end])
    return out


# ---------------------------------------------------------------- futures


def _yaw_of_quat(q) -> float:
    r = geo.quat_to_matrix(np.asarray(q, dtype=np.float64))
    return math.atan2(r[1, 0], r[0, 0])


def _rot2(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def future_annotations(nusc, ann: dict, steps: int) -> list[dict]:
    """The annotations after `ann` within steps/2 s (+0.15 s), at most `steps`: the devkit's rule."""
    horizon = steps / 2 + FUTURE_BUFFER_S
    t0 = nusc.get("sample", ann["sample_token"])["timestamp"]
    out: list[dict] = []
    cur = ann
    while len(out) < steps and cur["next"]:
        cur = nusc.get("sample_annotation", cur["next"])
        elapsed = abs(nusc.get("sample", cur["sample_token"])["timestamp"] - t0) / 1e6
        if elapsed >= horizon:
            break
        out.append(cur)
    return out


def agent_future_offsets(
    center: np.ndarray, yaw_lidar: float, anchor: dict, future: list[dict], steps: int = AGENT_FUT_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, 2) offsets and (steps,) mask of one box's future, in the lidar frame.

    Global positions go through the agent's own frame, as upstream: rotated by the box's lidar yaw
    minus its global yaw, then placed at the box centre.
    """
    trajs, masks = np.zeros((steps, 2)), np.zeros(steps)
    if not future:
        return trajs, masks
    glob = np.array([a["translation"][:2] for a in future], dtype=np.float64)
    rot = _rot2(yaw_lidar - _yaw_of_quat(anchor["rotation"]))
    pts = (glob - np.asarray(anchor["translation"][:2])) @ rot.T + center[:2]
    n = len(pts)
    trajs[0] = pts[0] - center[:2]
    trajs[1:n] = pts[1:] - pts[:-1]
    masks[:n] = 1.0
    return trajs, masks


def agent_futures(nusc, info: dict, steps: int = AGENT_FUT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(N, steps, 2) float32 offsets and (N, steps) float32 masks for the record's boxes."""
    n = len(info["ann_tokens"])
    trajs, masks = np.zeros((n, steps, 2), np.float32), np.zeros((n, steps), np.float32)
    for i, token in enumerate(info["ann_tokens"]):
        ann = nusc.get("sample_annotation", token)
        box3d = np.asarray(info["gt_boxes"][i], dtype=np.float64)
        t, m = agent_future_offsets(box3d[:3], float(box3d[6]), ann, future_annotations(nusc, ann, steps), steps)
        trajs[i], masks[i] = t, m
    return trajs, masks


def driving_command(final_xy: np.ndarray) -> np.ndarray:
    """One-hot (right, left, straight) from the final future lidar position (x to the ego's right)."""
    x = float(final_xy[0])
    idx = 0 if x >= COMMAND_THRESHOLD else 1 if x <= -COMMAND_THRESHOLD else 2
    return np.eye(len(COMMANDS), dtype=np.float32)[idx]


def ego_future_offsets(
    lidar2global: np.ndarray, future_lidar2global: list[np.ndarray], steps: int = EGO_FUT_STEPS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, 2) offsets, (steps,) mask and the command, from the current and next lidar poses.

    Poses past the scene's end repeat the last one; the command reads the last (repeated) position.
    """
    origins = [lidar2global[:3, 3]] + [m[:3, 3] for m in future_lidar2global[:steps]]
    valid = len(origins)
    origins += [origins[-1]] * (steps + 1 - valid)
    local = geo.apply(np.linalg.inv(lidar2global), np.array(origins))
    masks = np.zeros(steps + 1, np.float32)
    masks[:valid] = 1.0
    offsets = (local[1:] - local[:-1])[:, :2].astype(np.float32)
    return offsets, masks[1:], driving_command(local[-1])


def _lidar_pose(nusc, sample: dict) -> np.ndarray:
    sd = nusc.get("sample_data", sample["data"][LIDAR])
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    return geo.transform(pose["rotation"], pose["translation"]) @ geo.transform(cs["rotation"], cs["translation"])


def ego_futures(nusc, sample_token: str, steps: int = EGO_FUT_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ego future offsets, mask and command of a key frame, walking the sample's `next` links."""
    sample = nusc.get("sample", sample_token)
    future: list[np.ndarray] = []
    cur = sample
    while len(future) < steps and cur["next"]:
        cur = nusc.get("sample", cur["next"])
        future.append(_lidar_pose(nusc, cur))
    return ego_future_offsets(_lidar_pose(nusc, sample), future, steps)


# ---------------------------------------------------------------- CAN bus


def nearest_message(utimes: np.ndarray, utime: int) -> int:
    """Index of the message nearest `utime`; a tie goes to the later message, as upstream."""
    i = int(np.searchsorted(utimes, utime))
    if i == len(utimes) or (i > 0 and utime - utimes[i - 1] < utimes[i] - utime):
        i -= 1
    return i


def ego_status(can_bus, scene_name: str, timestamp: int) -> np.ndarray:
    """(10,) float32: CAN acceleration, rotation rate, velocity (ego frame) and steering angle; zeros
    when there is no CAN bus or the scene has no messages."""
    if can_bus is None:
        return np.zeros(EGO_STATUS_DIM, np.float32)
    try:
        pose = can_bus.get_messages(scene_name, "pose", print_warnings=False)
        steer = can_bus.get_messages(scene_name, "steeranglefeedback", print_warnings=False)
        p = pose[nearest_message(np.array([m["utime"] for m in pose]), timestamp)]
        s = steer[nearest_message(np.array([m["utime"] for m in steer]), timestamp)]
        values = [*p["accel"], *p["rotation_rate"], *p["vel"], s["value"]]
    except Exception:  # upstream: any CAN problem (no file, blacklisted scene) gives zeros
        return np.zeros(EGO_STATUS_DIM, np.float32)
    return np.asarray(values, dtype=np.float32)


# ---------------------------------------------------------------- all together


class MissingSparseDriveData(DataError):
    """A step that needs SparseDrive's fields met records prepared without them."""


# what a record has in place of the fields when an input is missing (see the module docstring)
FLAG_FIELDS: tuple[str, ...] = ("has_map_annos", "has_futures")


def empty_map_columns() -> dict:
    """Map columns of a frame whose location has no map expansion."""
    return {**map_columns({}), "has_map_annos": False}


def empty_future_columns(num_boxes: int) -> dict:
    """Future and status columns of a record that carries none (masks zero, straight command)."""
    return {
        "gt_agent_fut_trajs": np.zeros((num_boxes, AGENT_FUT_STEPS, 2), np.float32),
        "gt_agent_fut_masks": np.zeros((num_boxes, AGENT_FUT_STEPS), np.float32),
        "gt_ego_fut_trajs": np.zeros((EGO_FUT_STEPS, 2), np.float32),
        "gt_ego_fut_masks": np.zeros(EGO_FUT_STEPS, np.float32),
        "gt_ego_fut_cmd": driving_command(np.zeros(2)),
        "ego_status": np.zeros(EGO_STATUS_DIM, np.float32),
        "has_futures": False,
    }


def _future_columns(nusc, sample_token: str, info: dict, can_bus) -> dict:
    agent_trajs, agent_masks = agent_futures(nusc, info)
    ego_trajs, ego_masks, command = ego_futures(nusc, sample_token)
    return {
        "gt_agent_fut_trajs": agent_trajs,
        "gt_agent_fut_masks": agent_masks,
        "gt_ego_fut_trajs": ego_trajs,
        "gt_ego_fut_masks": ego_masks,
        "gt_ego_fut_cmd": command,
        "ego_status": ego_status(can_bus, info["scene_name"], int(info["timestamp"])),
        "has_futures": True,
    }


def sparsedrive_fields(nusc, nusc_maps: dict, sample_token: str, info: dict, can_bus=None) -> dict:
    """SparseDrive's extra columns for the canonical record `info` of key frame `sample_token`."""
    location = info["location"]
    if location not in nusc_maps:
        raise DataError(
            f"no map expansion for location {location!r} (sample {sample_token}); SparseDrive needs "
            f"maps/expansion/{location}.json under the dataroot (nuScenes map expansion v1.3)"
        )
    annos = map_annos(nusc_maps[location], geo.lidar_to_global(info))
    return {**map_columns(annos), "has_map_annos": True, **_future_columns(nusc, sample_token, info, can_bus)}


def load_can_bus(dataroot: str | Path):
    """The devkit's `NuScenesCanBus` when the tree has a `can_bus/` folder, else None."""
    if not (Path(dataroot) / "can_bus").is_dir():
        return None
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus

    return NuScenesCanBus(dataroot=str(dataroot))


def add_sparsedrive_fields(nusc, dataroot: str | Path, records: list[dict], show_progress: bool = True) -> dict:
    """Fill SparseDrive's columns into `records` (in place); returns the manifest's `sparsedrive` note.

    A location without a map expansion gives empty map columns, no CAN bus zero `ego_status`: both
    are listed in the note, for prepare to warn about.
    """
    from tqdm import tqdm

    locations = sorted({r["location"] for r in records})
    maps = load_maps(dataroot, locations)
    can_bus = load_can_bus(dataroot)
    for rec in tqdm(records, desc="prepare: sparsedrive fields", unit="frame", disable=not show_progress):
        if rec["location"] in maps:
            rec.update(sparsedrive_fields(nusc, maps, rec["token"], rec, can_bus))
        else:
            rec.update(empty_map_columns())
            rec.update(_future_columns(nusc, rec["token"], rec, can_bus))
    missing = [loc for loc in locations if loc not in maps]
    return {
        "map_locations": sorted(maps),
        "missing_map_locations": missing,
        "frames_without_map": sum(not r["has_map_annos"] for r in records),
        "frames_without_futures": 0,
        "can_bus": can_bus is not None,
    }


def skip_sparsedrive_fields(records: list[dict]) -> dict:
    """Fill the empty columns into `records` (a prepare for models that need none of SparseDrive's
    fields); returns the manifest note that says so, for the error if SparseDrive is trained on it."""
    for rec in records:
        rec.update(empty_map_columns())
        rec.update(empty_future_columns(len(rec["gt_names"])))
    return {
        "skipped": True,
        "map_locations": [],
        "missing_map_locations": [],
        "frames_without_map": len(records),
        "frames_without_futures": len(records),
        "can_bus": None,
    }


def fields_note(records: list[dict]) -> dict:
    """The manifest's `sparsedrive` note for records read from a pkl (no tree to look into)."""
    no_map = sorted({r["location"] or "(unknown)" for r in records if not r.get("has_map_annos", False)})
    return {
        "map_locations": sorted({r["location"] for r in records if r.get("has_map_annos", False)}),
        "missing_map_locations": no_map,
        "frames_without_map": sum(not r.get("has_map_annos", False) for r in records),
        "frames_without_futures": sum(not r.get("has_futures", False) for r in records),
        "can_bus": None,  # a pkl carries ego_status as its converter wrote it
    }


def note_warnings(note: dict) -> list[str]:
    """Prepare's warnings for a `sparsedrive` note: what SparseDrive will lack."""
    out = []
    if note.get("skipped"):
        return out  # not asked for
    if note["frames_without_map"]:
        where = ", ".join(note["missing_map_locations"])
        out.append(
            f"{note['frames_without_map']} frames have no map_annos: no map expansion for {where} "
            f"(maps/expansion/<location>.json, nuScenes map expansion v1.3); SparseDrive cannot train on them"
        )
    if note["frames_without_futures"]:
        out.append(
            f"{note['frames_without_futures']} frames have no future trajectories (their source carries "
            f"none); SparseDrive's motion and planning cannot train on them"
        )
    if note["can_bus"] is False:
        out.append("no can_bus/ folder under the dataroot: ego_status is zero (nuScenes CAN bus expansion)")
    return out


def require_sparsedrive_fields(records: list[dict], what: str, needs: tuple[str, ...] = FLAG_FIELDS) -> None:
    """Raise `MissingSparseDriveData` when a record lacks a field group `what` needs (its flags `needs`)."""
    for flag in needs:
        lacking = [r for r in records if not r.get(flag, False)]
        if not lacking:
            continue
        if flag == "has_map_annos":
            where = sorted({r.get("location") or "(unknown)" for r in lacking})
            fix = (
                f"no map expansion for location(s) {', '.join(where)}: put the nuScenes map expansion v1.3 "
                f"(maps/expansion/<location>.json) under the dataroot and run `raydrive prepare` again"
            )
        else:
            fix = (
                "they were read from an info pkl without SparseDrive's futures: prepare from the nuScenes "
                "tree, or from an info pkl written by SparseDrive's converter"
            )
        raise MissingSparseDriveData(f"{what} needs SparseDrive's fields, but {len(lacking)} frames lack them: {fix}")
