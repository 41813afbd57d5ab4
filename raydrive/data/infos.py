"""Canonical info records: one per key frame, the union of what the upstream converters write.

A record is a plain dict of numpy arrays and strings. Field names follow the upstream converters
(Sparse4D / StreamPETR `tools/*nuscenes_converter.py`, BEVDepth `scripts/gen_info.py`):

- frame: `token`, `timestamp` (us), `scene_token`, `scene_name`, `location`, `frame_idx`, `prev`, `next`
- lidar: `lidar_path` (relative to the dataroot), `lidar2ego_*`, `ego2global_*` (translation, wxyz)
- `cams`: per camera (CAMERAS order) `data_path`, `sample_data_token`, `sensor2ego_*`, `ego2global_*`,
  `timestamp`, `sensor2lidar_rotation` / `_translation` (x_lidar = R x + T), `cam_intrinsic`, `width`, `height`
- `sweeps`: up to `max_sweeps` previous lidar sample_data, nearest first; empty on a scene's first frame
- boxes in the lidar frame: `gt_boxes` (N, 7) x, y, z (centre), l, w, h, yaw; `gt_names`,
  `gt_velocity` (N, 2, NaN where the devkit cannot estimate it), `num_lidar_pts`, `num_radar_pts`,
  `valid_flag`, `instance_inds`
- raw annotations for BEVDepth-style consumers: `ann_tokens`, `instance_tokens`, `ann_category`,
  `ann_attribute`, `ann_visibility`, global `ann_translation`, `ann_size` (wlh), `ann_rotation`, `ann_velocity`
- StreamPETR's per-camera 2D annotations, flattened with a camera index: `ann2d_cam`, `ann2d_gt_index`,
  `ann2d_bbox` (xyxy, hull of the projected corners clipped to the image), `ann2d_label` (converter
  order), `ann2d_center` (u, v), `ann2d_depth`, `ann2d_box3d_cam`, `ann2d_visibility`

- SparseDrive's extras, added by `sparsedrive_fields.add_sparsedrive_fields` after `build_infos`:
  `map_points` / `map_line_label` / `map_line_num_points` (its `map_annos`, flattened),
  `gt_agent_fut_trajs` / `_masks`, `gt_ego_fut_trajs` / `_masks`, `gt_ego_fut_cmd`, `ego_status`, and the
  flags `has_map_annos` / `has_futures` (False where the input lacked them)

The parquet schema carries a version (`parquet.SCHEMA_VERSION`) so that readers can tell.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raydrive.data import geometry as geo
from raydrive.data.constants import CAMERAS, CATEGORY_TO_CLASS, CLASSES, KNOWN_CATEGORIES, LIDAR, split_scene_names

# StreamPETR's converter labels its 2D boxes in this order, unlike the 3D class order. Kept as upstream.
CLASSES_2D: tuple[str, ...] = (
    "car",
    "truck",
    "trailer",
    "bus",
    "construction_vehicle",
    "bicycle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "barrier",
)


class DataError(ValueError):
    """Bad input data: the message names the file or field and how to fix it."""


def class_name(category: str, where: str) -> str:
    """Detection class of a nuScenes category; other known categories keep their raw name."""
    if category in CLASSES:
        return category
    if category in CATEGORY_TO_CLASS:
        return CATEGORY_TO_CLASS[category]
    if category in KNOWN_CATEGORIES:
        return category
    raise DataError(
        f"unknown class name {category!r} in {where}; expected a nuScenes category "
        f"or a detection class (one of {sorted(KNOWN_CATEGORIES | set(CLASSES))})"
    )


def _pose(rec: dict) -> np.ndarray:
    return geo.transform(np.array(rec["rotation"]), rec["translation"])


def _sensor_entry(nusc, sd_token: str, lidar2global_inv: np.ndarray) -> dict:
    """One camera or sweep entry: calibration, pose, and the sensor -> key-frame lidar transform."""
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    sensor2global = _pose(pose) @ _pose(cs)
    s2l = lidar2global_inv @ sensor2global  # sensor -> ego(t_s) -> global -> ego(t_lidar) -> lidar
    return {
        "data_path": sd["filename"],
        "type": sd["channel"],
        "sample_data_token": sd_token,
        "sensor2ego_translation": np.array(cs["translation"], dtype=np.float64),
        "sensor2ego_rotation": np.array(cs["rotation"], dtype=np.float64),
        "ego2global_translation": np.array(pose["translation"], dtype=np.float64),
        "ego2global_rotation": np.array(pose["rotation"], dtype=np.float64),
        "timestamp": int(sd["timestamp"]),
        "sensor2lidar_rotation": s2l[:3, :3],
        "sensor2lidar_translation": s2l[:3, 3],
        "cam_intrinsic": np.array(cs["camera_intrinsic"], dtype=np.float64) if cs["camera_intrinsic"] else None,
        "width": int(sd["width"]),
        "height": int(sd["height"]),
        "sensor2global": sensor2global,
    }


def _box2d(corners_cam: np.ndarray, k: np.ndarray, width: int, height: int):
    """xyxy of the convex hull of the in-front corners, clipped to the image; None if off-image.

    Same rule as the nuScenes 2D export used by StreamPETR's converter (`post_process_coords`).
    """
    front = corners_cam[corners_cam[:, 2] > 0]
    if len(front) == 0:
        return None
    uv = (front @ k.T)[:, :2] / front[:, 2:3]
    lo, hi = uv.min(0), uv.max(0)
    if lo[0] >= 0 and lo[1] >= 0 and hi[0] <= width and hi[1] <= height:
        return np.array([lo[0], lo[1], hi[0], hi[1]])
    from shapely.geometry import MultiPoint, box

    hull = MultiPoint([tuple(p) for p in uv]).convex_hull
    inter = hull.intersection(box(0, 0, width, height))
    if inter.is_empty:
        return None
    x0, y0, x1, y1 = inter.bounds
    return np.array([x0, y0, x1, y1])


def frame_record(nusc, sample: dict, scene: dict, location: str, frame_idx: int, max_sweeps: int = 10) -> dict:
    """The canonical record of one key frame."""
    where = f"sample {sample['token']}"
    missing = [c for c in [*CAMERAS, LIDAR] if c not in sample["data"]]
    if missing:
        raise DataError(
            f"{where} of scene {scene['name']} has {len(sample['data'])} sensors; missing {missing}. "
            f"raydrive needs all 6 cameras {list(CAMERAS)} and {LIDAR}"
        )
    lidar_sd = nusc.get("sample_data", sample["data"][LIDAR])
    lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    lidar_pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    l2e, e2g = _pose(lidar_cs), _pose(lidar_pose)
    lidar2global = e2g @ l2e
    lidar2global_inv = np.linalg.inv(lidar2global)

    rec: dict = {
        "token": sample["token"],
        "timestamp": int(sample["timestamp"]),
        "scene_token": scene["token"],
        "scene_name": scene["name"],
        "location": location,
        "frame_idx": frame_idx,
        "prev": sample["prev"],
        "next": sample["next"],
        "lidar_path": lidar_sd["filename"],
        "lidar_sample_data_token": lidar_sd["token"],
        "lidar2ego_translation": np.array(lidar_cs["translation"], dtype=np.float64),
        "lidar2ego_rotation": np.array(lidar_cs["rotation"], dtype=np.float64),
        "ego2global_translation": np.array(lidar_pose["translation"], dtype=np.float64),
        "ego2global_rotation": np.array(lidar_pose["rotation"], dtype=np.float64),
    }
    cams = {cam: _sensor_entry(nusc, sample["data"][cam], lidar2global_inv) for cam in CAMERAS}
    rec["cams"] = cams

    sweeps, sd = [], lidar_sd
    while len(sweeps) < max_sweeps and sd["prev"]:
        entry = _sensor_entry(nusc, sd["prev"], lidar2global_inv)
        for key in ("cam_intrinsic", "sensor2global", "width", "height"):
            entry.pop(key)
        sweeps.append(entry)
        sd = nusc.get("sample_data", sd["prev"])
    rec["sweeps"] = sweeps

    anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    n = len(anns)
    centers = np.array([a["translation"] for a in anns], dtype=np.float64).reshape(n, 3)
    sizes = np.array([a["size"] for a in anns], dtype=np.float64).reshape(n, 3)
    rots = [geo.quat_to_matrix(a["rotation"]) for a in anns]
    vel_global = np.array([nusc.box_velocity(a["token"]) for a in anns], dtype=np.float64).reshape(n, 3)

    center_lidar = geo.apply(lidar2global_inv, centers)
    yaw = np.array([_yaw(lidar2global_inv[:3, :3] @ r) for r in rots]).reshape(n)
    vel2 = vel_global.copy()
    vel2[:, 2] = 0.0
    vel_lidar = vel2 @ lidar2global_inv[:3, :3].T
    names = [class_name(a["category_name"], f"{where} annotation {a['token']}") for a in anns]
    attr_names = [[nusc.get("attribute", t)["name"] for t in a["attribute_tokens"]] for a in anns]
    rec.update(
        gt_boxes=np.concatenate([center_lidar, sizes[:, [1, 0, 2]], yaw[:, None]], axis=1),
        gt_names=np.array(names, dtype=object),
        gt_velocity=vel_lidar[:, :2],
        num_lidar_pts=np.array([a["num_lidar_pts"] for a in anns], dtype=np.int32),
        num_radar_pts=np.array([a["num_radar_pts"] for a in anns], dtype=np.int32),
        instance_inds=np.array([nusc.getind("instance", a["instance_token"]) for a in anns], dtype=np.int64),
        ann_tokens=np.array([a["token"] for a in anns], dtype=object),
        instance_tokens=np.array([a["instance_token"] for a in anns], dtype=object),
        ann_category=np.array([a["category_name"] for a in anns], dtype=object),
        ann_attribute=np.array([x[0] if x else "" for x in attr_names], dtype=object),
        ann_visibility=np.array([int(a["visibility_token"] or 0) for a in anns], dtype=np.int8),
        ann_translation=centers,
        ann_size=sizes,
        ann_rotation=np.array([a["rotation"] for a in anns], dtype=np.float64).reshape(n, 4),
        ann_velocity=vel_global,
    )
    rec["valid_flag"] = (rec["num_lidar_pts"] + rec["num_radar_pts"]) > 0
    rec.update(_annotations_2d(cams, anns, names, centers, sizes, rots))
    for c in cams.values():
        c.pop("sensor2global")
    return rec


def _yaw(r: np.ndarray) -> float:
    return math.atan2(r[1, 0], r[0, 0])


def _annotations_2d(cams, anns, names, centers, sizes, rots) -> dict:
    """StreamPETR's per-camera 2D boxes, centres and depths (detection classes only)."""
    out = {k: [] for k in ("cam", "gt_index", "bbox", "label", "center", "depth", "box3d_cam", "visibility")}
    for ci, cam in enumerate(CAMERAS):
        c = cams[cam]
        g2c = np.linalg.inv(c["sensor2global"])
        k, w, h = c["cam_intrinsic"], c["width"], c["height"]
        for i, name in enumerate(names):
            if name not in CLASSES_2D:
                continue
            wlh = sizes[i]
            corners = geo.box_corners(centers[i], wlh[[1, 0, 2]], _yaw(rots[i]))[0]
            corners_cam = geo.apply(g2c, corners)
            center_cam = geo.apply(g2c, centers[i][None])[0]
            if center_cam[2] <= 0:
                continue  # upstream drops boxes whose centre is behind the camera
            bbox = _box2d(corners_cam, k, w, h)
            if bbox is None:
                continue
            uvw = k @ center_cam
            yaw_cam = _yaw(g2c[:3, :3] @ rots[i])
            out["cam"].append(ci)
            out["gt_index"].append(i)
            out["bbox"].append(bbox)
            out["label"].append(CLASSES_2D.index(name))
            out["center"].append(uvw[:2] / uvw[2])
            out["depth"].append(center_cam[2])
            # mmdet3d camera box: x, y, z (centre), l, h, w, -yaw about the camera's y axis
            out["box3d_cam"].append([*center_cam, wlh[1], wlh[2], wlh[0], -yaw_cam])
            out["visibility"].append(int(anns[i]["visibility_token"] or 0))
    shapes = {"bbox": 4, "center": 2, "box3d_cam": 7}
    res = {}
    for key, vals in out.items():
        dtype = np.int32 if key in ("gt_index",) else np.int8 if key in ("cam", "label", "visibility") else np.float64
        arr = np.array(vals, dtype=dtype)
        if key in shapes:
            arr = arr.reshape(-1, shapes[key])
        res[f"ann2d_{key}"] = arr
    return res


def build_infos(nusc, version: str, max_sweeps: int = 10, show_progress: bool = True) -> dict[str, list[dict]]:
    """raydrive split -> records in timestamp order, for every split of `version`."""
    scene_by_name = {s["name"]: s for s in nusc.scene}
    result = {}
    for split, names in split_scene_names(version).items():
        scenes = [scene_by_name[n] for n in names if n in scene_by_name]
        if not scenes:
            present = sorted(scene_by_name)
            raise DataError(
                f"split {split!r} of {version} is empty in {nusc.dataroot}: none of its scenes "
                f"({names[:4]}{'...' if len(names) > 4 else ''}) are in the tree, which has {present[:6]}. "
                f"Check --version, or regenerate the synthetic set with both splits (raydrive synth)"
            )
        total = sum(s["nbr_samples"] for s in scenes)
        records = []
        with tqdm(total=total, desc=f"prepare: {split} infos", unit="frame", disable=not show_progress) as bar:
            for scene in scenes:
                log = nusc.get("log", scene["log_token"])
                token, idx = scene["first_sample_token"], 0
                while token:
                    sample = nusc.get("sample", token)
                    records.append(frame_record(nusc, sample, scene, log["location"], idx, max_sweeps))
                    token, idx = sample["next"], idx + 1
                    bar.update(1)
        records.sort(key=lambda r: r["timestamp"])
        result[split] = records
    return result


def check_files(records: list[dict], dataroot: str | os.PathLike, show_progress: bool = False) -> dict:
    """Every image and lidar file a record names must exist, and every image must decode its header
    (with the record's size) and, for JPEG, end with its end-of-image marker: a corrupt file fails here,
    named, rather than in a training worker. Lidar files with NaN coordinates are returned (warned
    about by prepare) as {"lidar_nan": [{"path", "nan_points", "points"}, ...]}."""
    root = Path(dataroot)
    nan_files = []
    for rec in tqdm(records, desc="prepare: check files", unit="frame", disable=not show_progress):
        for c in rec["cams"].values():
            full = resolve_path(root, c["data_path"])
            _missing(full, "image", rec, root)
            check_image(full, int(c.get("width") or 0), int(c.get("height") or 0), rec["token"])
        full = resolve_path(root, rec["lidar_path"])
        _missing(full, "lidar file", rec, root)
        nan = _lidar_nan(full, rec["token"])
        if nan:
            nan_files.append({"path": str(full), **nan})
    return {"lidar_nan": nan_files}


def _missing(full: Path, kind: str, rec: dict, root: Path) -> None:
    if not full.is_file():
        raise DataError(
            f"missing {kind} {full} (sample {rec['token']}); the nuScenes tree at {root} is incomplete: "
            f"extract the blobs that hold it, or point --dataroot at the complete tree"
        )


JPEG_END = b"\xff\xd9"


def check_image(path: Path, width: int, height: int, token: str) -> None:
    """The image's header decodes with the record's size; a JPEG ends with its end-of-image marker
    (a truncated download does not). Reads the header and the last bytes only."""
    from PIL import Image

    fix = "replace it with an intact copy (re-extract its blob) and run prepare again"
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
    except Exception as e:  # PIL raises several types for a file it cannot parse
        raise DataError(f"corrupt image {path} (sample {token}): {type(e).__name__}: {e}; {fix}") from None
    if width and height and size != (width, height):
        raise DataError(
            f"image {path} (sample {token}) is {size[0]}x{size[1]}, its calibration says {width}x{height}; {fix}"
        )
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            tail = f.read().rstrip(b"\x00\r\n\t ")
        if not tail.endswith(JPEG_END):
            raise DataError(f"truncated image {path} (sample {token}): no JPEG end marker; {fix}")


def _lidar_nan(path: Path, token: str) -> dict | None:
    """NaN coordinate count of a nuScenes `.pcd.bin` (float32 x, y, z, intensity, ring), None if none."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 5:
        raise DataError(
            f"lidar file {path} (sample {token}) has {raw.size} floats, not a multiple of 5: it is truncated or "
            f"not a nuScenes .pcd.bin; replace it with an intact copy"
        )
    points = raw.reshape(-1, 5)
    nan = int(np.isnan(points[:, :3]).any(axis=1).sum())
    return {"nan_points": nan, "points": len(points)} if nan else None


def resolve_path(dataroot: str | os.PathLike, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(dataroot) / p
