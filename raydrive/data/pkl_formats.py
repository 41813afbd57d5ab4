"""Upstream info `.pkl` layouts: write them from canonical records, read them back into records.

- `sparse4d`: `{"infos": [...], "metadata": {"version"}}`, Sparse4D `tools/nuscenes_converter.py`
  (mmdet3d style; image paths joined with the dataroot).
- `streampetr`: the same plus `scene_token`, `prev`, `next`, `frame_idx` and per-camera lists (6) of
  `bboxes2d`, `labels2d`, `centers2d`, `depths`, `bboxes_ignore`, `visibilities`, `bboxes3d_cams`
  (StreamPETR `tools/data_converter/nuscenes_converter.py`).
- `sparsedrive`: the `sparse4d` layout plus `scene_token`, `map_location`, `map_annos` ({0 ped_crossing,
  1 divider, 2 boundary: [(n, 2) polylines]}), `gt_agent_fut_trajs` / `_masks`, `gt_ego_fut_trajs` /
  `_masks`, `gt_ego_fut_cmd` and `ego_status` (SparseDrive `tools/data_converter/nuscenes_converter.py`).
  Read from any mmdet3d-style pkl that has them; records from pkls without them are flagged
  (`has_map_annos`, `has_futures` False, see `sparsedrive_fields.py`).
- `bevdepth`: a plain list of `{sample_token, timestamp, scene_token, cam_infos, lidar_infos,
  cam_sweeps, lidar_sweeps, ann_infos}` with raw devkit records (BEVDepth `scripts/gen_info.py`).
  Calibration and ego-pose records carry their values; their tokens are not kept by raydrive and are
  written empty.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np

from raydrive.data import geometry as geo
from raydrive.data import sparsedrive_fields as sd
from raydrive.data.constants import CAMERAS, LIDAR
from raydrive.data.infos import DataError, class_name
from raydrive.safe_pickle import load_pickle

FORMATS = ("sparse4d", "streampetr", "bevdepth", "sparsedrive")
FILE_NAMES = {
    "sparse4d": "nuscenes_infos_{split}.pkl",
    "sparsedrive": "nuscenes_infos_{split}.pkl",  # upstream's --extra-tag nuscenes, under data/infos/
    "streampetr": "nuscenes2d_temporal_infos_{split}.pkl",
    "bevdepth": "nuscenes_infos_{split}.pkl",
}
_CAM_KEYS = (
    "data_path",
    "type",
    "sample_data_token",
    "sensor2ego_translation",
    "sensor2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "timestamp",
    "sensor2lidar_rotation",
    "sensor2lidar_translation",
    "cam_intrinsic",
)
_SWEEP_KEYS = _CAM_KEYS[:-1]
# the float pose fields of a camera or sweep entry, read back as float64
_POSE_KEYS = (
    "sensor2ego_translation",
    "sensor2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "sensor2lidar_rotation",
    "sensor2lidar_translation",
)


def _with_root(dataroot: str | os.PathLike, p: str) -> str:
    """`dataroot` joined with a record's relative path, the root kept as the user typed it.

    Upstream gets its paths from the devkit's `os.path.join(nusc.dataroot, filename)`, so a relative
    `--root_path ./data/nuscenes` gives relative paths and an absolute one absolute paths
    (Sparse4D tools/nuscenes_converter.py, `obtain_sensor2top` and `_fill_trainval_infos`).
    """
    return p if os.path.isabs(p) else os.path.join(os.fspath(dataroot), p)


def _mmdet3d_info(rec: dict, dataroot: str) -> dict:
    def with_root(p):
        return _with_root(dataroot, p)

    cams = {}
    for cam in CAMERAS:
        c = {k: rec["cams"][cam][k] for k in _CAM_KEYS}
        c["data_path"] = with_root(c["data_path"])
        cams[cam] = c
    # Upstream's sweep entries are typed "lidar" (`obtain_sensor2top(..., "lidar")`), not the channel.
    sweeps = [
        {**{k: s[k] for k in _SWEEP_KEYS}, "data_path": with_root(s["data_path"]), "type": "lidar"}
        for s in rec["sweeps"]
    ]
    return {
        "lidar_path": with_root(rec["lidar_path"]),
        "token": rec["token"],
        "sweeps": sweeps,
        "cams": cams,
        "lidar2ego_translation": rec["lidar2ego_translation"].tolist(),
        "lidar2ego_rotation": rec["lidar2ego_rotation"].tolist(),
        "ego2global_translation": rec["ego2global_translation"].tolist(),
        "ego2global_rotation": rec["ego2global_rotation"].tolist(),
        "timestamp": rec["timestamp"],
        "gt_boxes": rec["gt_boxes"],
        "gt_names": np.array(list(rec["gt_names"])),
        "gt_velocity": rec["gt_velocity"],
        # np.array of Python ints upstream: int64 (records keep int32).
        "num_lidar_pts": np.asarray(rec["num_lidar_pts"], dtype=np.int64),
        "num_radar_pts": np.asarray(rec["num_radar_pts"], dtype=np.int64),
        "valid_flag": rec["valid_flag"],
        "instance_inds": rec["instance_inds"],
    }


def _streampetr_info(rec: dict, dataroot: str) -> dict:
    info = _mmdet3d_info(rec, dataroot)
    info.update(scene_token=rec["scene_token"], prev=rec["prev"], next=rec["next"], frame_idx=rec["frame_idx"])
    per_cam = {
        k: [] for k in ("bboxes2d", "labels2d", "centers2d", "depths", "bboxes_ignore", "visibilities", "bboxes3d_cams")
    }
    for ci in range(len(CAMERAS)):
        m = rec["ann2d_cam"] == ci
        per_cam["bboxes2d"].append(rec["ann2d_bbox"][m].astype(np.float32))
        per_cam["labels2d"].append(rec["ann2d_label"][m].astype(np.int64))
        per_cam["centers2d"].append(rec["ann2d_center"][m].astype(np.float32))
        per_cam["depths"].append(rec["ann2d_depth"][m].astype(np.float32))
        per_cam["bboxes_ignore"].append(np.zeros((0, 4), dtype=np.float32))
        per_cam["visibilities"].append(rec["ann2d_visibility"][m].astype(np.int64))
        per_cam["bboxes3d_cams"].append(rec["ann2d_box3d_cam"][m].astype(np.float32))
    info.update(per_cam)
    return info


def _sparsedrive_info(rec: dict, dataroot: str) -> dict:
    info = _mmdet3d_info(rec, dataroot)
    info.update(
        scene_token=rec["scene_token"],
        map_location=rec["location"],
        map_annos=sd.map_annos_from_columns(rec),
        **{k: np.asarray(rec[k], dtype=np.float32) for k in _SPARSEDRIVE_ARRAYS},
    )
    return info


# SparseDrive's float32 arrays of an info: (per box, shape after the box count when per box)
_SPARSEDRIVE_ARRAYS: dict[str, tuple[bool, tuple[int, ...]]] = {
    "gt_agent_fut_trajs": (True, (sd.AGENT_FUT_STEPS, 2)),
    "gt_agent_fut_masks": (True, (sd.AGENT_FUT_STEPS,)),
    "gt_ego_fut_trajs": (False, (sd.EGO_FUT_STEPS, 2)),
    "gt_ego_fut_masks": (False, (sd.EGO_FUT_STEPS,)),
    "gt_ego_fut_cmd": (False, (len(sd.COMMANDS),)),
    "ego_status": (False, (sd.EGO_STATUS_DIM,)),
}


def _bevdepth_info(rec: dict) -> dict:
    def sensor_info(entry: dict, is_cam: bool) -> dict:
        out = {
            "sample_token": rec["token"],
            "ego_pose": {
                "token": "",
                "timestamp": entry["timestamp"],
                "rotation": list(map(float, entry["ego2global_rotation"])),
                "translation": list(map(float, entry["ego2global_translation"])),
            },
            "timestamp": entry["timestamp"],
            "filename": entry["data_path"],
            "calibrated_sensor": {
                "token": "",
                "sensor_token": "",
                "translation": list(map(float, entry["sensor2ego_translation"])),
                "rotation": list(map(float, entry["sensor2ego_rotation"])),
                "camera_intrinsic": np.asarray(entry["cam_intrinsic"]).tolist() if is_cam else [],
            },
            "is_key_frame": True,
        }
        if is_cam:
            out.update(height=int(entry["height"]), width=int(entry["width"]))
        return out

    lidar = {
        "timestamp": rec["timestamp"],
        "data_path": rec["lidar_path"],
        "ego2global_rotation": rec["ego2global_rotation"],
        "ego2global_translation": rec["ego2global_translation"],
        "sensor2ego_rotation": rec["lidar2ego_rotation"],
        "sensor2ego_translation": rec["lidar2ego_translation"],
    }
    anns = []
    for i in range(len(rec["ann_tokens"])):
        vel = rec["ann_velocity"][i]
        anns.append(
            {
                "token": rec["ann_tokens"][i],
                "sample_token": rec["token"],
                "instance_token": rec["instance_tokens"][i],
                "visibility_token": str(int(rec["ann_visibility"][i])),
                "attribute_names": [rec["ann_attribute"][i]] if rec["ann_attribute"][i] else [],
                "translation": rec["ann_translation"][i].tolist(),
                "size": rec["ann_size"][i].tolist(),
                "rotation": rec["ann_rotation"][i].tolist(),
                "num_lidar_pts": int(rec["num_lidar_pts"][i]),
                "num_radar_pts": int(rec["num_radar_pts"][i]),
                "category_name": rec["ann_category"][i],
                "velocity": np.nan_to_num(vel).tolist(),
            }
        )
    return {
        "sample_token": rec["token"],
        "timestamp": rec["timestamp"],
        "scene_token": rec["scene_token"],
        "cam_infos": {cam: sensor_info(rec["cams"][cam], True) for cam in CAMERAS},
        "lidar_infos": {LIDAR: sensor_info(lidar, False)},
        "cam_sweeps": [],
        "lidar_sweeps": [],
        "ann_infos": anns,
    }


def write_pkl(records: list[dict], fmt: str, path: Path, version: str, dataroot: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"unknown --pkl-format {fmt!r}; choose from {FORMATS}")
    if fmt == "sparsedrive":
        sd.require_sparsedrive_fields(records, f"--pkl-format sparsedrive ({path.name})")
    if fmt == "bevdepth":
        payload = [_bevdepth_info(r) for r in records]
    else:
        make = {"sparse4d": _mmdet3d_info, "streampetr": _streampetr_info, "sparsedrive": _sparsedrive_info}[fmt]
        payload = {"infos": [make(r, dataroot) for r in records], "metadata": {"version": version}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Reading upstream pkl files


def load_pkl(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"info pkl {path} does not exist")
    try:
        with open(path, "rb") as f:
            return load_pickle(f)  # resolves numpy and builtins only: a crafted pkl cannot run code
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise DataError(f"info pkl {path}: {e}; it is not an upstream info file") from None
        raise DataError(
            f"info pkl {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            f"re-create it with the upstream converter or with `raydrive prepare --pkl-format`"
        ) from e
    except (EOFError, AttributeError, ImportError, ValueError, IndexError) as e:
        raise DataError(
            f"info pkl {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            f"re-create it with the upstream converter or with `raydrive prepare --pkl-format`"
        ) from e


def detect_format(payload) -> str:
    if isinstance(payload, list) and payload and isinstance(payload[0], dict) and "cam_infos" in payload[0]:
        return "bevdepth"
    if isinstance(payload, dict) and "infos" in payload:
        infos = payload["infos"]
        if infos and "bboxes2d" in infos[0]:
            return "streampetr"
        if infos and ("map_annos" in infos[0] or "gt_ego_fut_trajs" in infos[0]):
            return "sparsedrive"
        return "sparse4d"
    raise DataError(
        "unrecognised info pkl layout: expected {'infos': [...], 'metadata': ...} (Sparse4D / StreamPETR) "
        "or a list of records with 'cam_infos' (BEVDepth)"
    )


def records_from_pkl(path: str | Path, dataroot: str | None = None) -> tuple[list[dict], str, str]:
    """Canonical records from an upstream pkl, plus its format and nuScenes version."""
    payload = load_pkl(path)
    fmt = detect_format(payload)
    if fmt == "bevdepth":
        records = [_from_bevdepth(info, i, path, dataroot) for i, info in enumerate(payload)]
        version = "unknown"
    else:
        records = [_from_mmdet3d(info, i, path, dataroot) for i, info in enumerate(payload["infos"])]
        version = payload.get("metadata", {}).get("version", "unknown")
    if not records:
        raise DataError(f"info pkl {path} holds no records: the split is empty")
    records.sort(key=lambda r: r["timestamp"])
    _fill_sequences(records)
    return records, fmt, version


def _strip_root(p: str, dataroot: str | os.PathLike | None) -> str:
    """`p` relative to `dataroot` when it lies under it.

    Paths may have been written with the root as typed (`./data/nuscenes/samples/...`), normalised, or
    absolute, and `dataroot` may be given in another of those forms: compare normalised paths first,
    then paths made absolute against the current directory (and the root with its links resolved),
    and last re-root the path at its `samples/` or `sweeps/` folder (a pkl converted with another root).
    """
    if not dataroot:
        return p
    root = os.fspath(dataroot)
    pairs = (
        (os.path.normpath(root), os.path.normpath(p)),
        (os.path.abspath(root), os.path.abspath(p)),
        (str(Path(root).resolve()), os.path.abspath(p)),
    )
    for prefix, path in pairs:
        prefix = prefix.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            return path[len(prefix) :]
    return _from_tree_folder(p, root)


# the top-level folders of a nuScenes tree that info records point into
TREE_FOLDERS = ("samples", "sweeps")


def _from_tree_folder(p: str, root: str) -> str:
    """A path written under another root (`./data/nuscenes/samples/...` converted elsewhere, or an
    absolute path of another machine), re-rooted at `root` from its `samples/` or `sweeps/` folder on;
    an absolute path that exists as written is kept."""
    if os.path.isabs(p) and os.path.exists(p):
        return p
    parts = Path(os.path.normpath(p)).parts
    for i, part in enumerate(parts):
        if part in TREE_FOLDERS and i + 1 < len(parts):
            return os.path.join(*parts[i:])
    return p


def _check_cams(cams: dict, i: int, token: str, path) -> None:
    if len(cams) != len(CAMERAS) or set(cams) != set(CAMERAS):
        raise DataError(
            f"record {i} (token {token}) of {path} has {len(cams)} cameras {sorted(cams)}; "
            f"raydrive needs exactly the 6 nuScenes cameras {list(CAMERAS)}"
        )


def _from_mmdet3d(info: dict, i: int, path, dataroot) -> dict:
    token = info.get("token", f"#{i}")
    for key in ("token", "timestamp", "cams", "lidar_path", "lidar2ego_rotation", "ego2global_rotation"):
        if key not in info:
            raise DataError(f"record {i} (token {token}) of {path} has no field {key!r}; is this an info pkl?")
    _check_cams(info["cams"], i, token, path)
    rec = {
        "token": info["token"],
        "timestamp": int(info["timestamp"]),
        "scene_token": info.get("scene_token", ""),
        "scene_name": info.get("scene_token", ""),
        "location": info.get("map_location", ""),
        "frame_idx": int(info.get("frame_idx", -1)),
        "prev": info.get("prev", ""),
        "next": info.get("next", ""),
        "lidar_path": _strip_root(info["lidar_path"], dataroot),
        "lidar_sample_data_token": "",
        **{
            k: np.asarray(info[k], dtype=np.float64)
            for k in ("lidar2ego_translation", "lidar2ego_rotation", "ego2global_translation", "ego2global_rotation")
        },
    }
    cams = {}
    for cam in CAMERAS:
        c = info["cams"][cam]
        data_path = _strip_root(c["data_path"], dataroot)
        width, height = _image_size(c, data_path, dataroot)
        cams[cam] = {
            "data_path": data_path,
            "type": cam,
            "sample_data_token": c.get("sample_data_token", ""),
            "timestamp": int(c.get("timestamp", info["timestamp"])),
            "width": width,
            "height": height,
            **{k: np.asarray(c[k], dtype=np.float64) for k in (*_POSE_KEYS, "cam_intrinsic")},
        }
    rec["cams"] = cams
    rec["sweeps"] = [
        {
            "data_path": _strip_root(s["data_path"], dataroot),
            "type": LIDAR,
            "sample_data_token": s.get("sample_data_token", ""),
            "timestamp": int(s["timestamp"]),
            **{k: np.asarray(s[k], dtype=np.float64) for k in _POSE_KEYS},
        }
        for s in info.get("sweeps", [])
    ]
    boxes = np.asarray(info.get("gt_boxes", np.zeros((0, 7))), dtype=np.float64).reshape(-1, 7)
    n = len(boxes)
    names = [class_name(str(x), f"record {i} (token {token}) of {path}") for x in info.get("gt_names", [])]
    if len(names) != n:
        raise DataError(f"record {i} (token {token}) of {path}: {n} gt_boxes but {len(names)} gt_names")
    lidar2global = geo.lidar_to_global(rec)
    vel = np.asarray(info.get("gt_velocity", np.zeros((n, 2))), dtype=np.float64).reshape(n, 2)
    num_lidar = np.asarray(info.get("num_lidar_pts", np.ones(n)), dtype=np.int32).reshape(n)
    num_radar = np.asarray(info.get("num_radar_pts", np.zeros(n)), dtype=np.int32).reshape(n)
    rec.update(
        gt_boxes=boxes,
        gt_names=np.array(names, dtype=object),
        gt_velocity=vel,
        num_lidar_pts=num_lidar,
        num_radar_pts=num_radar,
        valid_flag=np.asarray(info.get("valid_flag", (num_lidar + num_radar) > 0), dtype=bool).reshape(n),
        instance_inds=np.asarray(info.get("instance_inds", -np.ones(n)), dtype=np.int64).reshape(n),
    )
    rec.update(_global_annotations(boxes, vel, lidar2global, names))
    rec.update(_ann2d_from_streampetr(info, n))
    rec.update(_sparsedrive_from_info(info, n, f"record {i} (token {token}) of {path}"))
    return rec


def _polyline(line) -> np.ndarray:
    """An upstream map polyline as (n, 2) float64 (shapely coords may carry a z)."""
    arr = np.asarray(line, dtype=np.float64)
    return arr.reshape(len(arr), -1)[:, :2]


def _sparsedrive_from_info(info: dict, n: int, where: str) -> dict:
    """SparseDrive's columns from an info that has them (SparseDrive's converter), else the empty ones."""
    out = sd.empty_map_columns()
    if "map_annos" in info:
        annos = info["map_annos"]
        if not isinstance(annos, dict):
            raise DataError(f"{where}: map_annos is a {type(annos).__name__}, expected {{class index: [polylines]}}")
        lines = {int(k): [_polyline(line) for line in v] for k, v in annos.items()}
        out = {**sd.map_columns(lines), "has_map_annos": True}
    out.update(sd.empty_future_columns(n))
    if "gt_ego_fut_trajs" not in info:
        return out
    for key, (per_box, shape) in _SPARSEDRIVE_ARRAYS.items():
        if key not in info:
            raise DataError(f"{where} has gt_ego_fut_trajs but no {key!r}: is it a complete SparseDrive info?")
        value = np.asarray(info[key], dtype=np.float32)
        want = (n, *shape) if per_box else shape
        if value.size != int(np.prod(want)):
            raise DataError(f"{where}: {key} has shape {value.shape}, expected {want}")
        out[key] = value.reshape(want)
    out["has_futures"] = True
    return out


def _image_size(cam: dict, data_path: str, dataroot) -> tuple[int, int]:
    """(width, height) of a camera entry: its own fields (BEVDepth, StreamPETR), else the image's header
    (mmdet3d pkls carry none), else nuScenes' 1600 x 900."""
    if "width" in cam and "height" in cam:
        return int(cam["width"]), int(cam["height"])
    path = Path(data_path) if os.path.isabs(data_path) or not dataroot else Path(dataroot) / data_path
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # missing or unreadable: prepare's file check names it
        return 1600, 900


def _global_annotations(boxes, vel, lidar2global, names) -> dict:
    """Global-frame annotation fields derived from lidar-frame boxes (pkl inputs carry no raw records)."""
    n = len(boxes)
    centers = geo.apply(lidar2global, boxes[:, :3]) if n else np.zeros((0, 3))
    rot = lidar2global[:3, :3]
    yaw_offset = math.atan2(rot[1, 0], rot[0, 0])
    v3 = np.concatenate([vel, np.zeros((n, 1))], axis=1) @ rot.T if n else np.zeros((0, 3))
    return dict(
        ann_tokens=np.array([""] * n, dtype=object),
        instance_tokens=np.array([""] * n, dtype=object),
        ann_category=np.array(names, dtype=object),
        ann_attribute=np.array([""] * n, dtype=object),
        ann_visibility=np.zeros(n, dtype=np.int8),
        ann_translation=centers,
        ann_size=boxes[:, [4, 3, 5]] if n else np.zeros((0, 3)),
        ann_rotation=np.array([geo.yaw_to_quat(y + yaw_offset) for y in boxes[:, 6]]).reshape(n, 4),
        ann_velocity=v3,
    )


def _ann2d_from_streampetr(info: dict, n: int) -> dict:
    keys = ("cam", "gt_index", "bbox", "label", "center", "depth", "box3d_cam", "visibility")
    out = {k: [] for k in keys}
    if "bboxes2d" in info:
        for ci in range(len(CAMERAS)):
            m = len(info["bboxes2d"][ci])
            out["cam"] += [ci] * m
            out["gt_index"] += [-1] * m  # upstream does not link 2D boxes to gt indices
            out["bbox"] += list(np.asarray(info["bboxes2d"][ci]).reshape(m, 4))
            out["label"] += list(np.asarray(info["labels2d"][ci]).reshape(m))
            out["center"] += list(np.asarray(info["centers2d"][ci]).reshape(m, -1)[:, :2])
            out["depth"] += list(np.asarray(info["depths"][ci]).reshape(m))
            out["box3d_cam"] += list(np.asarray(info["bboxes3d_cams"][ci]).reshape(m, -1)[:, :7])
            out["visibility"] += list(np.asarray(info["visibilities"][ci]).reshape(m))
    shapes = {"bbox": 4, "center": 2, "box3d_cam": 7}
    res = {}
    for k in keys:
        dtype = np.int32 if k == "gt_index" else np.int8 if k in ("cam", "label", "visibility") else np.float64
        arr = np.array(out[k], dtype=dtype)
        res[f"ann2d_{k}"] = arr.reshape(-1, shapes[k]) if k in shapes else arr.reshape(-1)
    return res


def _from_bevdepth(info: dict, i: int, path, dataroot=None) -> dict:
    token = info.get("sample_token", f"#{i}")
    for key in ("sample_token", "timestamp", "cam_infos", "lidar_infos"):
        if key not in info:
            raise DataError(f"record {i} (token {token}) of {path} has no field {key!r}; is this a BEVDepth info pkl?")
    _check_cams(info["cam_infos"], i, token, path)
    lidar = info["lidar_infos"][LIDAR]
    l2e = geo.transform(np.array(lidar["calibrated_sensor"]["rotation"]), lidar["calibrated_sensor"]["translation"])
    e2g = geo.transform(np.array(lidar["ego_pose"]["rotation"]), lidar["ego_pose"]["translation"])
    lidar2global_inv = np.linalg.inv(e2g @ l2e)
    rec = {
        "token": token,
        "timestamp": int(info["timestamp"]),
        "scene_token": info.get("scene_token", ""),
        "scene_name": info.get("scene_token", ""),
        "location": "",
        "frame_idx": -1,
        "prev": "",
        "next": "",
        "lidar_path": _strip_root(lidar["filename"], dataroot),
        "lidar_sample_data_token": "",
        "lidar2ego_translation": np.array(lidar["calibrated_sensor"]["translation"], dtype=np.float64),
        "lidar2ego_rotation": np.array(lidar["calibrated_sensor"]["rotation"], dtype=np.float64),
        "ego2global_translation": np.array(lidar["ego_pose"]["translation"], dtype=np.float64),
        "ego2global_rotation": np.array(lidar["ego_pose"]["rotation"], dtype=np.float64),
        "sweeps": [],
    }
    cams = {}
    for cam in CAMERAS:
        c = info["cam_infos"][cam]
        cs, pose = c["calibrated_sensor"], c["ego_pose"]
        s2g = geo.transform(np.array(pose["rotation"]), pose["translation"]) @ geo.transform(
            np.array(cs["rotation"]), cs["translation"]
        )
        s2l = lidar2global_inv @ s2g
        cams[cam] = {
            "data_path": _strip_root(c["filename"], dataroot),
            "type": cam,
            "sample_data_token": "",
            "timestamp": int(c["timestamp"]),
            "width": int(c.get("width", 1600)),
            "height": int(c.get("height", 900)),
            "sensor2ego_translation": np.array(cs["translation"], dtype=np.float64),
            "sensor2ego_rotation": np.array(cs["rotation"], dtype=np.float64),
            "ego2global_translation": np.array(pose["translation"], dtype=np.float64),
            "ego2global_rotation": np.array(pose["rotation"], dtype=np.float64),
            "sensor2lidar_rotation": s2l[:3, :3],
            "sensor2lidar_translation": s2l[:3, 3],
            "cam_intrinsic": np.array(cs["camera_intrinsic"], dtype=np.float64),
        }
    rec["cams"] = cams
    anns = info.get("ann_infos", [])
    n = len(anns)
    where = f"record {i} (token {token}) of {path}"
    names = [class_name(a["category_name"], where) for a in anns]
    centers = np.array([a["translation"] for a in anns], dtype=np.float64).reshape(n, 3)
    sizes = np.array([a["size"] for a in anns], dtype=np.float64).reshape(n, 3)
    rots = [geo.quat_to_matrix(a["rotation"]) for a in anns]
    vel = np.array([a.get("velocity", [np.nan] * 3) for a in anns], dtype=np.float64).reshape(n, -1)
    vel3 = np.zeros((n, 3))
    vel3[:, : min(2, vel.shape[1])] = vel[:, :2]
    yaw = np.array([math.atan2(*(lidar2global_inv[:3, :3] @ r)[[1, 0], 0]) for r in rots]).reshape(n)
    num_lidar = np.array([a.get("num_lidar_pts", 1) for a in anns], dtype=np.int32).reshape(n)
    num_radar = np.array([a.get("num_radar_pts", 0) for a in anns], dtype=np.int32).reshape(n)
    rec.update(
        gt_boxes=np.concatenate([geo.apply(lidar2global_inv, centers), sizes[:, [1, 0, 2]], yaw[:, None]], axis=1),
        gt_names=np.array(names, dtype=object),
        gt_velocity=(vel3 @ lidar2global_inv[:3, :3].T)[:, :2],
        num_lidar_pts=num_lidar,
        num_radar_pts=num_radar,
        valid_flag=(num_lidar + num_radar) > 0,
        instance_inds=-np.ones(n, dtype=np.int64),
        ann_tokens=np.array([a.get("token", "") for a in anns], dtype=object),
        instance_tokens=np.array([a.get("instance_token", "") for a in anns], dtype=object),
        ann_category=np.array([a["category_name"] for a in anns], dtype=object),
        ann_attribute=np.array([(a.get("attribute_names") or [""])[0] for a in anns], dtype=object),
        ann_visibility=np.array([int(a.get("visibility_token") or 0) for a in anns], dtype=np.int8),
        ann_translation=centers,
        ann_size=sizes,
        ann_rotation=np.array([a["rotation"] for a in anns], dtype=np.float64).reshape(n, 4),
        ann_velocity=vel3,
    )
    rec.update(_ann2d_from_streampetr({}, n))
    rec.update({**sd.empty_map_columns(), **sd.empty_future_columns(n)})
    return rec


def _fill_sequences(records: list[dict]) -> None:
    """Give records without scene tokens a sequence id, prev/next and frame_idx.

    Upstream Sparse4D pkls have no scene_token: a frame with no sweeps starts a new sequence (the
    rule its dataset uses for grouping). Other pkls keep their tokens; frame_idx is recomputed.
    """
    seq = -1
    for r in records:
        if not r["scene_token"]:
            if not r["sweeps"] or seq < 0:
                seq += 1
            r["scene_token"] = r["scene_name"] = f"sequence-{seq:05d}"
    by_scene: dict[str, list[dict]] = {}
    for r in records:
        by_scene.setdefault(r["scene_token"], []).append(r)
    for frames in by_scene.values():
        for k, r in enumerate(frames):
            r["frame_idx"] = k
            if not r["prev"] and k > 0:
                r["prev"] = frames[k - 1]["token"]
            if not r["next"] and k + 1 < len(frames):
                r["next"] = frames[k + 1]["token"]
