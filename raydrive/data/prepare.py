"""`raydrive prepare`: a nuScenes tree (or an upstream info pkl) -> what training reads.

Output folder layout:

    manifest.json                      version, counts, classes, file hashes, what SparseDrive's fields
                                       lack (`sparsedrive`, see sparsedrive_fields.py); written last
    infos/<split>/part-00000.parquet   canonical info records (see `infos.py`, `parquet.py`)
    depth_gt/<image name>.bin          BEVDepth depth ground truth, float32 (u, v, depth) rows
    anchors/nuscenes_kmeans900.npy     assets the models need (`assets.py`), e.g. Sparse4D's k-means anchors
    kmeans/kmeans_*.npy                SparseDrive's k-means anchors (`kmeans.py`), when a model needs them
    pkl/<format>/<file>.pkl            optional upstream info pkls (--pkl-format)

Everything is built in a staging folder next to `--out` (`.<name>.staging-<pid>`) and swapped in only
when complete: a failed or interrupted prepare leaves `--out` as it was, and a re-prepare leaves no
file of the previous set behind. The manifest lists every file with its size, modification time and
sha256; `verify_prepared` holds a folder to it before training (sizes and times, hashing a file only
when its time differs) and in `raydrive doctor` (every sha256).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import raydrive
from raydrive.data.assets import SPARSEDRIVE_ASSETS, make_assets, models_assets
from raydrive.data.constants import CAMERAS, CLASSES
from raydrive.data.depth_gt import write_depth_gt
from raydrive.data.infos import DataError, build_infos, check_files
from raydrive.data.parquet import SCHEMA_VERSION, sha256_file, write_split
from raydrive.data.pkl_formats import FILE_NAMES, FORMATS, records_from_pkl, write_pkl
from raydrive.data.sparsedrive_fields import add_sparsedrive_fields, fields_note, note_warnings, skip_sparsedrive_fields

MANIFEST = "manifest.json"


@dataclass
class PrepareConfig:
    out: str
    dataroot: str | None = None  # with from_pkl: where its relative paths live, a prefix to strip
    version: str = "v1.0-mini"
    from_pkl: str | None = None
    split: str | None = None  # with --from-pkl: which split the pkl holds (default: from its name)
    pkl_formats: list[str] = field(default_factory=list)
    depth_gt: bool = True
    assets: tuple[str, ...] | None = None  # registered asset names (data/assets.py); None: every model's
    max_sweeps: int = 10
    show_progress: bool = True

    def __post_init__(self):
        if self.dataroot is None and self.from_pkl is None:
            raise DataError("give --dataroot (a nuScenes tree) or --from-pkl (an upstream info pkl)")
        for fmt in self.pkl_formats:
            if fmt not in FORMATS:
                raise DataError(f"unknown --pkl-format {fmt!r}; choose from {list(FORMATS)}")


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole preparation in a staging folder and swap it in as `cfg.out`; returns the manifest."""
    out = Path(cfg.out).resolve()
    _check_out(out, cfg)
    staging = _staging(out)
    try:
        manifest = _build(cfg, staging)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_out(out: Path, cfg: PrepareConfig) -> None:
    """`--out` may be new, empty or a prepared folder (which is replaced), and must not hold the input."""
    _recover(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(
            f"--out {out} holds files but no {MANIFEST}: it is not a prepared folder, and prepare replaces its "
            f"--out as a whole; give a new or empty folder"
        )
    for given, what in ((cfg.dataroot, "--dataroot"), (cfg.from_pkl, "--from-pkl")):
        if given and out.is_dir() and Path(given).resolve().is_relative_to(out):
            raise DataError(f"{what} {given} lies inside --out {out}, which prepare replaces; give another --out")
    for other in out.parent.glob(f".{out.name}.staging-*"):
        pid = other.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            raise DataError(f"another raydrive prepare (pid {pid}) is writing {out}; wait for it to finish")
        shutil.rmtree(other, ignore_errors=True)  # left by an interrupted prepare


def _recover(out: Path) -> None:
    """Put back a previous set that an interrupted swap left aside (between its two renames)."""
    if out.exists():
        for old in out.parent.glob(f".{out.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
        return
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and (olds[-1] / MANIFEST).is_file():
        os.rename(olds[-1], out)


def _staging(out: Path) -> Path:
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _swap_in(staging: Path, out: Path) -> None:
    """Make the complete staging folder `out`: the old set is moved aside first, then removed."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _build(cfg: PrepareConfig, out: Path) -> dict:
    """The preparation itself, written into `out` (the staging folder)."""
    assets = models_assets() if cfg.assets is None else cfg.assets
    if cfg.from_pkl:
        records, fmt, version = records_from_pkl(cfg.from_pkl, cfg.dataroot)
        split = cfg.split or _split_from_name(Path(cfg.from_pkl).name)
        splits = {split: records}
        dataroot = Path(cfg.dataroot).resolve() if cfg.dataroot else Path(cfg.from_pkl).resolve().parent
        source = {"kind": "pkl", "path": str(Path(cfg.from_pkl).resolve()), "format": fmt}
        version = version if version != "unknown" else cfg.version
        checked = check_files(records, dataroot, cfg.show_progress)
        sparsedrive = fields_note(records)
    else:
        from nuscenes.nuscenes import NuScenes

        dataroot = Path(cfg.dataroot).resolve()
        if not (dataroot / cfg.version).is_dir():
            raise DataError(
                f"no {cfg.version} tables under {dataroot}: expected {dataroot / cfg.version}/*.json. "
                f"Check --dataroot and --version, or make a synthetic tree with `raydrive synth`"
            )
        nusc = NuScenes(version=cfg.version, dataroot=str(dataroot), verbose=False)
        splits = build_infos(nusc, cfg.version, cfg.max_sweeps, cfg.show_progress)
        source = {"kind": "nuscenes", "path": str(dataroot)}
        version = cfg.version
        all_records = [r for recs in splits.values() for r in recs]
        if any(a in SPARSEDRIVE_ASSETS for a in assets):
            sparsedrive = add_sparsedrive_fields(nusc, dataroot, all_records, cfg.show_progress)
        else:  # no model prepared for needs them (~14 min on full nuScenes)
            sparsedrive = skip_sparsedrive_fields(all_records)
        checked = check_files(all_records, dataroot, cfg.show_progress)

    manifest: dict = {
        "format": "raydrive-prepared",
        "schema_version": SCHEMA_VERSION,
        "raydrive_version": raydrive.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": version,
        "dataroot": str(dataroot),
        "source": source,
        "classes": list(CLASSES),
        "cameras": list(CAMERAS),
        "splits": {},
        "sparsedrive": sparsedrive,
    }
    for warning in note_warnings(sparsedrive):
        print(f"prepare: warning: {warning}")
    nan_files = checked.get("lidar_nan", [])
    if nan_files:
        manifest["lidar_nan"] = nan_files
        for entry in nan_files[:5]:
            print(f"prepare: warning: lidar file {entry['path']} has {entry['nan_points']} points with NaN coordinates")
        if len(nan_files) > 5:
            print(f"prepare: warning: {len(nan_files)} lidar files in all have NaN points (listed in {MANIFEST})")
    for split, records in splits.items():
        files = [_stamp(out / "infos" / split, f) for f in write_split(records, out / "infos" / split)]
        names = np.concatenate([r["gt_names"] for r in records]) if records else np.array([])
        manifest["splits"][split] = {
            "frames": len(records),
            "scenes": len({r["scene_token"] for r in records}),
            "boxes": int(len(names)),
            "boxes_per_class": {c: int((names == c).sum()) for c in CLASSES},
            "files": files,
        }
    if cfg.depth_gt:
        depth_dir = out / "depth_gt"
        n = sum(write_depth_gt(recs, dataroot, depth_dir, cfg.show_progress) for recs in splits.values())
        manifest["depth_gt"] = {"dir": "depth_gt", "files": n}
    if assets and "train" in splits:
        made = make_assets(assets, splits["train"], out, skip_unavailable=cfg.assets is None)
        manifest["assets"] = {name: _stamp(out, entry) for name, entry in made.items()}
    pkls = []
    for fmt in cfg.pkl_formats:
        for split, records in splits.items():
            path = out / "pkl" / fmt / FILE_NAMES[fmt].format(split=split)
            # the root as the user gave it: upstream keeps relative roots relative (pkl_formats._with_root)
            write_pkl(records, fmt, path, version, cfg.dataroot or str(dataroot))
            entry = {"format": fmt, "split": split, "path": str(path.relative_to(out)), "sha256": sha256_file(path)}
            pkls.append(_stamp(out, entry))
    if pkls:
        manifest["pkl"] = pkls
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)
    return manifest


def _stamp(folder: Path, entry: dict) -> dict:
    """A manifest file entry with the file's size and modification time (for the fast check)."""
    st = (folder / entry["path"]).stat()
    return {**entry, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _split_from_name(name: str) -> str:
    for split in ("train", "val", "test"):
        if f"_{split}" in name:
            return split
    raise DataError(f"cannot tell the split of {name!r} from its name; pass --split train|val|test")


def load_manifest(prepared: str | Path) -> dict:
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {prepared} is not a prepared folder; run `raydrive prepare --out {prepared}`"
        )
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path} is unreadable ({type(e).__name__}: {e}); re-run `raydrive prepare --out {prepared}`"
        ) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path} has schema version {manifest.get('schema_version')}, this raydrive reads {SCHEMA_VERSION}: "
            f"re-run `raydrive prepare`"
        )
    return manifest


# ---- the folder against its manifest -------------------------------------------------------------------------


def _listed_files(manifest: dict) -> list[tuple[str, dict]]:
    """(path relative to the folder, manifest entry) of every file the manifest describes by hash."""
    files = []
    for split, info in manifest["splits"].items():
        files += [(f"infos/{split}/{f['path']}", f) for f in info.get("files", [])]
    files += [(a["path"], a) for a in manifest.get("assets", {}).values()]
    files += [(p["path"], p) for p in manifest.get("pkl", [])]
    return files


def _file_problem(folder: Path, rel: str, entry: dict, full: bool) -> str | None:
    path = folder / rel
    if not path.is_file():
        return f"{path} is missing"
    st = path.stat()
    if "size" in entry and st.st_size != entry["size"]:
        return f"{path} has {st.st_size} bytes, the manifest says {entry['size']}"
    unchanged = entry.get("mtime_ns") == st.st_mtime_ns and "size" in entry
    if (full or not unchanged) and "sha256" in entry and sha256_file(path) != entry["sha256"]:
        return f"{path} differs from what prepare wrote (sha256)"
    return None


def _split_problem(folder: Path, split: str, info: dict) -> str | None:
    """Part files that the manifest does not list, or row counts that differ from it."""
    import pyarrow.parquet as pq

    listed = {f["path"]: f for f in info.get("files", [])}
    present = {p.name for p in (folder / "infos" / split).glob("part-*.parquet")}
    extra = sorted(present - set(listed))
    if extra:
        return f"{folder / 'infos' / split / extra[0]} is not in the manifest (left by another prepare)"
    for name, entry in listed.items():
        path = folder / "infos" / split / name
        if not path.is_file():
            continue  # reported as missing
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow's error for a truncated or foreign file
            return f"{path} is not a readable parquet file ({type(e).__name__})"
        if "rows" in entry and rows != entry["rows"]:
            return f"{path} has {rows} rows, the manifest says {entry['rows']}"
    if sum(f.get("rows", 0) for f in listed.values()) != info.get("frames", 0):
        return f"split {split!r}: its part files hold another number of rows than its {info.get('frames')} frames"
    return None


def verify_prepared(prepared: str | Path, full: bool = False) -> dict:
    """Hold a prepared folder to its manifest: every listed file present with its size (and its sha256
    when `full`, or when its modification time changed), no unlisted part files, the parquet row counts
    and the number of depth files. Raises DataError naming the first file that differs; returns the
    manifest."""
    folder = Path(prepared)
    manifest = load_manifest(folder)
    fix = f"re-run `raydrive prepare --out {folder}`"
    problems = [_file_problem(folder, rel, entry, full) for rel, entry in _listed_files(manifest)]
    problems += [_split_problem(folder, s, info) for s, info in manifest["splits"].items()]
    if "depth_gt" in manifest:
        depth = folder / manifest["depth_gt"]["dir"]
        count = sum(1 for _ in depth.glob("*.bin")) if depth.is_dir() else 0
        if count != manifest["depth_gt"]["files"]:
            problems.append(f"{depth} has {count} depth files, the manifest says {manifest['depth_gt']['files']}")
    problem = next((p for p in problems if p), None)
    if problem:
        raise DataError(f"prepared folder {folder} does not match its {MANIFEST}: {problem}; {fix}")
    return manifest
