"""`raydrive prepare`: a nuScenes tree (or an upstream info pkl) -> what training reads.

Output folder layout:

    manifest.json                      version, counts, classes, file hashes (written last)
    infos/<split>/part-00000.parquet   canonical info records (see `infos.py`, `parquet.py`)
    depth_gt/<image name>.bin          BEVDepth depth ground truth, float32 (u, v, depth) rows
    anchors/nuscenes_kmeans900.npy     assets the models need (`assets.py`), e.g. Sparse4D's k-means anchors
    pkl/<format>/<file>.pkl            optional upstream info pkls (--pkl-format)
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import raydrive
from raydrive.data.assets import ASSETS, make_assets
from raydrive.data.constants import CAMERAS, CLASSES
from raydrive.data.depth_gt import write_depth_gt
from raydrive.data.infos import DataError, build_infos, check_files
from raydrive.data.parquet import SCHEMA_VERSION, sha256_file, write_split
from raydrive.data.pkl_formats import FILE_NAMES, FORMATS, records_from_pkl, write_pkl

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
    assets: tuple[str, ...] | None = None  # registered asset names (data/assets.py); None: all of them
    max_sweeps: int = 10
    show_progress: bool = True

    def __post_init__(self):
        if self.dataroot is None and self.from_pkl is None:
            raise DataError("give --dataroot (a nuScenes tree) or --from-pkl (an upstream info pkl)")
        for fmt in self.pkl_formats:
            if fmt not in FORMATS:
                raise DataError(f"unknown --pkl-format {fmt!r}; choose from {list(FORMATS)}")


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole preparation; returns the manifest."""
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.from_pkl:
        records, fmt, version = records_from_pkl(cfg.from_pkl, cfg.dataroot)
        split = cfg.split or _split_from_name(Path(cfg.from_pkl).name)
        splits = {split: records}
        dataroot = Path(cfg.dataroot).resolve() if cfg.dataroot else Path(cfg.from_pkl).resolve().parent
        source = {"kind": "pkl", "path": str(Path(cfg.from_pkl).resolve()), "format": fmt}
        version = version if version != "unknown" else cfg.version
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
        for records in splits.values():
            check_files(records, dataroot)

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
    }
    for split, records in splits.items():
        files = write_split(records, out / "infos" / split)
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
    assets = sorted(ASSETS) if cfg.assets is None else cfg.assets
    if assets and "train" in splits:
        manifest["assets"] = make_assets(assets, splits["train"], out)
    pkls = []
    for fmt in cfg.pkl_formats:
        for split, records in splits.items():
            path = out / "pkl" / fmt / FILE_NAMES[fmt].format(split=split)
            # the root as the user gave it: upstream keeps relative roots relative (pkl_formats._with_root)
            write_pkl(records, fmt, path, version, cfg.dataroot or str(dataroot))
            pkls.append(
                {"format": fmt, "split": split, "path": str(path.relative_to(out)), "sha256": sha256_file(path)}
            )
    if pkls:
        manifest["pkl"] = pkls
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)
    return manifest


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
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path} has schema version {manifest.get('schema_version')}, this raydrive reads {SCHEMA_VERSION}: "
            f"re-run `raydrive prepare`"
        )
    return manifest
