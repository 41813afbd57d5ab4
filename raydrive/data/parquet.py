"""Info records <-> parquet, with an explicit schema.

Fixed shapes (poses, the 6 cameras' matrices) are arrow fixed-shape tensors, which Ray Data reads as
proper (N, ...) numpy arrays; per-box fields are lists of fixed-size lists (ragged over boxes, fixed
inside). SparseDrive's map polylines are one ragged list of points plus, per polyline, its class and
point count (`sparsedrive_fields.map_columns`). Per-camera fields are stacked in CAMERAS order under a
`cam_` prefix. A split is written
as several `part-*.parquet` files so that a cluster can read them in parallel.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydrive.data.constants import CAMERAS, NUM_CAMS
from raydrive.data.infos import DataError
from raydrive.data.sparsedrive_fields import AGENT_FUT_STEPS, EGO_FUT_STEPS, EGO_STATUS_DIM

SCHEMA_VERSION = 2  # 2: SparseDrive's map, future and ego-status columns
ROWS_PER_FILE = 2000


@dataclass(frozen=True)
class Col:
    name: str
    kind: str  # scalar | tensor | ragged | strings | cam_strings | cam_tensor | sweeps
    dtype: str = "float64"
    shape: tuple[int, ...] = ()


_SWEEP_FIELDS = (
    ("sensor2lidar_rotation", 9),
    ("sensor2lidar_translation", 3),
    ("sensor2ego_translation", 3),
    ("sensor2ego_rotation", 4),
    ("ego2global_translation", 3),
    ("ego2global_rotation", 4),
)

COLUMNS: tuple[Col, ...] = (
    Col("token", "scalar", "string"),
    Col("timestamp", "scalar", "int64"),
    Col("scene_token", "scalar", "string"),
    Col("scene_name", "scalar", "string"),
    Col("location", "scalar", "string"),
    Col("frame_idx", "scalar", "int32"),
    Col("prev", "scalar", "string"),
    Col("next", "scalar", "string"),
    Col("lidar_path", "scalar", "string"),
    Col("lidar_sample_data_token", "scalar", "string"),
    Col("lidar2ego_translation", "tensor", "float64", (3,)),
    Col("lidar2ego_rotation", "tensor", "float64", (4,)),
    Col("ego2global_translation", "tensor", "float64", (3,)),
    Col("ego2global_rotation", "tensor", "float64", (4,)),
    Col("data_path", "cam_strings", "string"),
    Col("sample_data_token", "cam_strings", "string"),
    Col("timestamp", "cam_tensor", "int64", ()),
    Col("width", "cam_tensor", "int32", ()),
    Col("height", "cam_tensor", "int32", ()),
    Col("cam_intrinsic", "cam_tensor", "float64", (3, 3)),
    Col("sensor2lidar_rotation", "cam_tensor", "float64", (3, 3)),
    Col("sensor2lidar_translation", "cam_tensor", "float64", (3,)),
    Col("sensor2ego_translation", "cam_tensor", "float64", (3,)),
    Col("sensor2ego_rotation", "cam_tensor", "float64", (4,)),
    Col("ego2global_translation", "cam_tensor", "float64", (3,)),
    Col("ego2global_rotation", "cam_tensor", "float64", (4,)),
    Col("sweeps", "sweeps"),
    Col("gt_boxes", "ragged", "float64", (7,)),
    Col("gt_names", "strings", "string"),
    Col("gt_velocity", "ragged", "float64", (2,)),
    Col("num_lidar_pts", "ragged", "int32"),
    Col("num_radar_pts", "ragged", "int32"),
    Col("valid_flag", "ragged", "bool"),
    Col("instance_inds", "ragged", "int64"),
    Col("ann_tokens", "strings", "string"),
    Col("instance_tokens", "strings", "string"),
    Col("ann_category", "strings", "string"),
    Col("ann_attribute", "strings", "string"),
    Col("ann_visibility", "ragged", "int8"),
    Col("ann_translation", "ragged", "float64", (3,)),
    Col("ann_size", "ragged", "float64", (3,)),
    Col("ann_rotation", "ragged", "float64", (4,)),
    Col("ann_velocity", "ragged", "float64", (3,)),
    Col("ann2d_cam", "ragged", "int8"),
    Col("ann2d_gt_index", "ragged", "int32"),
    Col("ann2d_bbox", "ragged", "float64", (4,)),
    Col("ann2d_label", "ragged", "int8"),
    Col("ann2d_center", "ragged", "float64", (2,)),
    Col("ann2d_depth", "ragged", "float64"),
    Col("ann2d_box3d_cam", "ragged", "float64", (7,)),
    Col("ann2d_visibility", "ragged", "int8"),
    # SparseDrive (sparsedrive_fields.py): map_annos flattened, futures, driving command, CAN ego status
    Col("has_map_annos", "scalar", "bool"),
    Col("map_points", "ragged", "float64", (2,)),
    Col("map_line_label", "ragged", "int8"),
    Col("map_line_num_points", "ragged", "int32"),
    Col("has_futures", "scalar", "bool"),
    Col("gt_agent_fut_trajs", "ragged", "float32", (AGENT_FUT_STEPS, 2)),
    Col("gt_agent_fut_masks", "ragged", "float32", (AGENT_FUT_STEPS,)),
    Col("gt_ego_fut_trajs", "tensor", "float32", (EGO_FUT_STEPS, 2)),
    Col("gt_ego_fut_masks", "tensor", "float32", (EGO_FUT_STEPS,)),
    Col("gt_ego_fut_cmd", "tensor", "float32", (3,)),
    Col("ego_status", "tensor", "float32", (EGO_STATUS_DIM,)),
)


def column_name(col: Col) -> str:
    if col.kind.startswith("cam_") and not col.name.startswith("cam_"):
        return f"cam_{col.name}"
    return col.name


def _pa_type(dtype: str) -> pa.DataType:
    return {"string": pa.string(), "bool": pa.bool_()}.get(dtype) or pa.from_numpy_dtype(np.dtype(dtype))


def _sweep_type() -> pa.DataType:
    fields = [("data_path", pa.string()), ("sample_data_token", pa.string()), ("timestamp", pa.int64())]
    fields += [(name, pa.list_(pa.float64(), n)) for name, n in _SWEEP_FIELDS]
    return pa.list_(pa.struct(fields))


def arrow_type(col: Col) -> pa.DataType:
    base = _pa_type(col.dtype)
    if col.kind == "scalar":
        return base
    if col.kind == "tensor":
        return pa.fixed_shape_tensor(base, col.shape)
    if col.kind == "cam_tensor":
        return pa.fixed_shape_tensor(base, (NUM_CAMS, *col.shape))
    if col.kind == "cam_strings":
        return pa.list_(pa.string(), NUM_CAMS)
    if col.kind == "strings":
        return pa.list_(pa.string())
    if col.kind == "ragged":
        return pa.list_(pa.list_(base, int(np.prod(col.shape))) if col.shape else base)
    if col.kind == "sweeps":
        return _sweep_type()
    raise ValueError(col.kind)


def schema() -> pa.Schema:
    meta = {b"raydrive.schema_version": str(SCHEMA_VERSION).encode(), b"raydrive.cameras": ",".join(CAMERAS).encode()}
    return pa.schema([pa.field(column_name(c), arrow_type(c)) for c in COLUMNS], metadata=meta)


def records_to_table(records: list[dict]) -> pa.Table:
    arrays = []
    for col in COLUMNS:
        typ = arrow_type(col)
        if col.kind == "scalar":
            arrays.append(pa.array([r[col.name] for r in records], type=typ))
        elif col.kind in ("tensor", "cam_tensor"):
            if col.kind == "tensor":
                vals = [np.asarray(r[col.name]) for r in records]
            else:
                vals = [np.stack([np.asarray(r["cams"][c][col.name]) for c in CAMERAS]) for r in records]
            shape = (len(records), *typ.shape)
            arr = np.stack(vals).astype(col.dtype).reshape(shape) if records else np.zeros(shape, col.dtype)
            storage = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(np.prod(typ.shape)))
            arrays.append(pa.ExtensionArray.from_storage(typ, storage))
        elif col.kind == "cam_strings":
            arrays.append(pa.array([[r["cams"][c][col.name] for c in CAMERAS] for r in records], type=typ))
        elif col.kind == "strings":
            arrays.append(pa.array([[str(x) for x in r[col.name]] for r in records], type=typ))
        elif col.kind == "ragged":
            inner = int(np.prod(col.shape)) if col.shape else 1
            vals = [np.asarray(r[col.name]).astype(col.dtype).reshape(-1, inner) for r in records]
            offsets = np.cumsum([0] + [len(v) for v in vals]).astype(np.int32)
            flat = pa.array(np.concatenate(vals).reshape(-1) if vals else np.zeros(0, col.dtype))
            values = pa.FixedSizeListArray.from_arrays(flat, inner) if col.shape else flat
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), values, type=typ))
        elif col.kind == "sweeps":
            rows = [
                [
                    {
                        "data_path": s["data_path"],
                        "sample_data_token": s["sample_data_token"],
                        "timestamp": int(s["timestamp"]),
                        **{
                            name: np.asarray(s[name], dtype=np.float64).reshape(-1).tolist()
                            for name, _ in _SWEEP_FIELDS
                        },
                    }
                    for s in r["sweeps"]
                ]
                for r in records
            ]
            arrays.append(pa.array(rows, type=typ))
    return pa.Table.from_arrays(arrays, schema=schema())


def _ragged_to_numpy(chunked: pa.ChunkedArray, col: Col) -> list[np.ndarray]:
    arr = chunked.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.flatten()
    if col.shape:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(col.dtype)
    inner = int(np.prod(col.shape)) if col.shape else 1
    out = []
    for i in range(len(arr)):
        piece = flat[offsets[i] * inner : offsets[i + 1] * inner]
        out.append(piece.reshape(-1, *col.shape) if col.shape else piece)
    return out


def table_to_records(table: pa.Table) -> list[dict]:
    """Inverse of `records_to_table`; the records compare equal field by field."""
    n = table.num_rows
    records: list[dict] = [{"cams": {c: {} for c in CAMERAS}} for _ in range(n)]
    for col in COLUMNS:
        name = column_name(col)
        if name not in table.column_names:
            raise DataError(f"parquet table has no column {name!r}; was it written by `raydrive prepare`?")
        data = table.column(name)
        if col.kind == "scalar":
            values = data.to_pylist()
        elif col.kind in ("tensor", "cam_tensor"):
            values = list(data.combine_chunks().to_numpy_ndarray()) if n else []
        elif col.kind in ("cam_strings", "strings"):
            values = data.to_pylist()
            if col.kind == "strings":
                values = [np.array(v, dtype=object) for v in values]
        elif col.kind == "ragged":
            values = _ragged_to_numpy(data, col)
            if col.dtype == "bool":
                values = [v.astype(bool) for v in values]
        else:  # sweeps
            values = []
            for row in data.to_pylist():
                sweeps = []
                for s in row:
                    e = {
                        "data_path": s["data_path"],
                        "type": "LIDAR_TOP",
                        "sample_data_token": s["sample_data_token"],
                        "timestamp": s["timestamp"],
                    }
                    for fname, size in _SWEEP_FIELDS:
                        e[fname] = np.array(s[fname]).reshape(3, 3) if size == 9 else np.array(s[fname])
                    sweeps.append(e)
                values.append(sweeps)
        for rec, v in zip(records, values):
            if col.kind.startswith("cam_"):
                for ci, cam in enumerate(CAMERAS):
                    rec["cams"][cam][col.name] = v[ci]
            else:
                rec[col.name] = v
    for rec in records:
        for cam in CAMERAS:
            rec["cams"][cam]["type"] = cam
    return records


def write_split(records: list[dict], out_dir: Path, rows_per_file: int = ROWS_PER_FILE) -> list[dict]:
    """Write one split as part files; returns [{path, rows, sha256}] for the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    files = []
    for i, start in enumerate(range(0, max(1, len(records)), rows_per_file)):
        chunk = records[start : start + rows_per_file]
        path = out_dir / f"part-{i:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(records_to_table(chunk), tmp, compression="zstd")
        tmp.replace(path)  # atomic: a reader never sees half a file
        files.append({"path": path.name, "rows": len(chunk), "sha256": sha256_file(path)})
    return files


def read_split(split_dir: Path, columns: list[str] | None = None) -> pa.Table:
    files = sorted(Path(split_dir).glob("part-*.parquet"))
    if not files:
        raise DataError(f"no parquet files in {split_dir}; run `raydrive prepare` first")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"corrupt parquet file {f}: {e}; re-run `raydrive prepare` to rewrite it") from e
    return pa.concat_tables(tables)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
