"""Prepared assets: files a model needs besides the info records, each made by a registered step.

A model's spec names its assets (`ModelSpec.assets`); `raydrive prepare` runs the steps of the models
it prepares for (all registered models by default), and `train` runs any step whose file is missing
before Ray starts, so a model never trains without its assets and no one prepares what no model uses.
Each step reads the train split's records and returns an array; the file is written atomically and
listed in the manifest with its shape and sha256. The asset's path is defined here, once.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydrive.data.infos import DataError


@dataclass(frozen=True)
class Asset:
    name: str
    path: str  # relative to the prepared folder
    make: Callable[[list[dict]], np.ndarray]  # train records -> array
    description: str


ASSETS: dict[str, Asset] = {}


def register_asset(asset: Asset) -> Asset:
    ASSETS[asset.name] = asset
    return asset


def _det_anchors_900(records: list[dict]) -> np.ndarray:
    from raydrive.data.anchors import kmeans_anchors

    return kmeans_anchors(records, num_anchors=900)


# Sparse4D v3 (and SparseDrive's detection head): upstream tools/anchor_generator.py's output name
DET_ANCHORS_900 = register_asset(
    Asset("det_anchors_900", "anchors/nuscenes_kmeans900.npy", _det_anchors_900, "k-means box anchors (900 x 11)")
)


def _kmeans_step(recipe: str) -> Callable[[list[dict]], np.ndarray]:
    """A step running one of `kmeans.py`'s recipes (imported when run: it needs sklearn)."""

    def make(records: list[dict]) -> np.ndarray:
        from raydrive.data import kmeans

        return getattr(kmeans, recipe)(records)

    make.__name__ = f"_{recipe}"
    return make


# SparseDrive: upstream tools/kmeans/*.py and their output names under data/kmeans/
SPARSEDRIVE_DET_900 = register_asset(
    Asset(
        "sparsedrive_det_900",
        "kmeans/kmeans_det_900.npy",
        _kmeans_step("det_anchors"),
        "SparseDrive k-means box anchors (900 x 11)",
    )
)
SPARSEDRIVE_MAP_100 = register_asset(
    Asset(
        "sparsedrive_map_100",
        "kmeans/kmeans_map_100.npy",
        _kmeans_step("map_anchors"),
        "SparseDrive k-means map polyline anchors (100 x 20 x 2)",
    )
)
SPARSEDRIVE_MOTION_6 = register_asset(
    Asset(
        "sparsedrive_motion_6",
        "kmeans/kmeans_motion_6.npy",
        _kmeans_step("motion_anchors"),
        "SparseDrive k-means agent motion modes (10 classes x 6 x 12 x 2)",
    )
)
SPARSEDRIVE_PLAN_6 = register_asset(
    Asset(
        "sparsedrive_plan_6",
        "kmeans/kmeans_plan_6.npy",
        _kmeans_step("plan_anchors"),
        "SparseDrive k-means ego plan modes (3 commands x 6 x 6 x 2)",
    )
)
SPARSEDRIVE_ASSETS: tuple[str, ...] = tuple(
    a.name for a in (SPARSEDRIVE_DET_900, SPARSEDRIVE_MAP_100, SPARSEDRIVE_MOTION_6, SPARSEDRIVE_PLAN_6)
)


def models_assets() -> tuple[str, ...]:
    """The assets of every registered model: what a prepare for all models makes. An asset no model
    names (yet) is made only on request (`PrepareConfig.assets`, `ensure_assets`)."""
    from raydrive.trainers import get_spec, list_models

    return tuple(dict.fromkeys(a for m in list_models() for a in get_spec(m).assets))


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise DataError(f"unknown prepared asset {name!r}; registered: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def make_assets(
    names: Iterable[str], train_records: list[dict], out: Path, skip_unavailable: bool = False
) -> dict[str, dict]:
    """Run the steps of `names` on the train records; returns their manifest entries. Every step runs
    before any file is written, so a failing one leaves no file that the manifest does not list.
    `skip_unavailable` (a prepare for every model, not a request): an asset whose inputs the set lacks
    (SparseDrive's without the map expansion or futures) is skipped with a warning instead."""
    from raydrive.data.sparsedrive_fields import MissingSparseDriveData

    arrays = {}
    for name in names:
        asset = get_asset(name)
        if not train_records:
            raise DataError(f"asset {name} ({asset.description}) needs a train split with frames")
        try:
            arrays[name] = asset.make(train_records)
        except MissingSparseDriveData as e:
            if not skip_unavailable:
                raise
            warnings.warn(f"skipping asset {name}: {e}", stacklevel=2)
    entries = {}
    for name, array in arrays.items():
        asset = get_asset(name)
        path = Path(out) / asset.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
        from raydrive.data.parquet import sha256_file

        entries[name] = {"path": asset.path, "shape": list(array.shape), "sha256": sha256_file(path)}
    return entries


def ensure_assets(prepared: str | Path, names: Iterable[str]) -> dict[str, Path]:
    """Paths of `names` in a prepared folder, running the steps of missing ones first (and recording
    them in its manifest)."""
    from raydrive.data.prepare import MANIFEST, load_manifest

    prepared = Path(prepared)
    names = list(names)
    missing = [n for n in names if not (prepared / get_asset(n).path).is_file()]
    if missing:
        from raydrive.data.parquet import read_split, table_to_records

        manifest = load_manifest(prepared)
        if "train" not in manifest["splits"]:
            raise DataError(f"{prepared} has no train split to compute {', '.join(missing)} from")
        records = table_to_records(read_split(prepared / "infos" / "train"))
        manifest.setdefault("assets", {}).update(_make_for(manifest, missing, records, prepared))
        tmp = prepared / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(prepared / MANIFEST)
    return {n: prepared / get_asset(n).path for n in names}


def _make_for(manifest: dict, names: list[str], records: list[dict], prepared: Path) -> dict[str, dict]:
    """`make_assets`, naming the fix when the folder was prepared without SparseDrive's fields."""
    from raydrive.data.sparsedrive_fields import MissingSparseDriveData

    try:
        return make_assets(names, records, prepared)
    except MissingSparseDriveData as e:
        if not manifest.get("sparsedrive", {}).get("skipped"):
            raise
        raise MissingSparseDriveData(
            f"{', '.join(names)}: {prepared} was prepared for models that need none of SparseDrive's fields "
            f"(map annotations, futures, ego status); run `raydrive prepare --for sparsedrive --out {prepared}` "
            f"with the same --dataroot to add them"
        ) from e


def asset_paths(prepared: str | Path, names: Iterable[str]) -> dict[str, Path]:
    """Paths of `names` in a prepared folder; a missing one is an error that says how to make it."""
    paths = {n: Path(prepared) / get_asset(n).path for n in names}
    missing = [f"{n} ({p})" for n, p in paths.items() if not p.is_file()]
    if missing:
        raise DataError(
            f"prepared asset missing: {', '.join(missing)}; run `raydrive prepare --out {prepared}` again "
            f"(or `raydrive train`, which makes missing assets before it starts)"
        )
    return paths
