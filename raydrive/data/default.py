"""The embedded default: a synthetic nuScenes set in a cache folder, prepared once and reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from raydrive.data.parquet import SCHEMA_VERSION
from raydrive.data.prepare import MANIFEST, PrepareConfig, prepare
from raydrive.data.synth import SynthConfig, default_cache_dir, synthesize

# 5 train scenes (80 frames) and 2 val scenes of 16 key frames (7.5 s): the first frames of each scene
# have SparseDrive's full 6 s agent and 3 s ego futures (12 and 6 frames ahead)
DEFAULT_SYNTH = dict(scenes=7, samples_per_scene=16, val_scenes=2, seed=0)
# what a complete synthetic tree holds; older caches lack SparseDrive's map expansion and CAN bus
TREE_MARKERS: tuple[str, ...] = (".complete", "v1.0-mini/sample_data.json", "maps/expansion", "can_bus")
COMPLETE = ".complete"  # written last; holds the DEFAULT_SYNTH it was made with


def tree_is_current(dataroot: Path) -> bool:
    """The cached tree was written completely, with today's DEFAULT_SYNTH, by a raydrive that draws
    every file prepare reads."""
    if not all((dataroot / marker).exists() for marker in TREE_MARKERS):
        return False
    try:
        made_with = json.loads((dataroot / COMPLETE).read_text())
    except ValueError:
        return False  # an older raydrive wrote "ok"
    return made_with == DEFAULT_SYNTH and any((dataroot / "maps" / "expansion").glob("*.json"))


def prepared_is_current(prepared: Path) -> bool:
    """The cached prepared set is complete and in this raydrive's schema."""
    try:
        return json.loads((prepared / MANIFEST).read_text()).get("schema_version") == SCHEMA_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def ensure_default_data(cache: Path | None = None, show_progress: bool = True) -> tuple[Path, Path]:
    """(dataroot, prepared) of the embedded default set, synthesising and preparing it if absent.

    A half-written folder (no tables, or no manifest) from an interrupted run is rebuilt, and so is a
    cache from an older raydrive: a tree without the map expansion or CAN bus or made with other
    `DEFAULT_SYNTH` settings, or a prepared set in an older schema (this raydrive cannot read it).
    """
    cache = Path(cache or default_cache_dir())
    dataroot, prepared = cache / "nuscenes-synth", cache / "prepared"
    if not tree_is_current(dataroot):
        if dataroot.exists() and show_progress:
            print(f"embedded default: {dataroot} is from an older raydrive; rebuilding it")
        shutil.rmtree(dataroot, ignore_errors=True)
        synthesize(SynthConfig(out=str(dataroot), show_progress=show_progress, **DEFAULT_SYNTH))
        (dataroot / COMPLETE).write_text(json.dumps(DEFAULT_SYNTH) + "\n")
        shutil.rmtree(prepared, ignore_errors=True)
    if not prepared_is_current(prepared):
        if not (prepared / MANIFEST).is_file():
            shutil.rmtree(prepared, ignore_errors=True)  # left half-written; prepare replaces only prepared sets
        prepare(PrepareConfig(out=str(prepared), dataroot=str(dataroot), show_progress=show_progress))
    return dataroot, prepared
