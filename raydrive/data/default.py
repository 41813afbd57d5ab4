"""The embedded default: a synthetic nuScenes set in a cache folder, prepared once and reused."""

from __future__ import annotations

import shutil
from pathlib import Path

from raydrive.data.prepare import MANIFEST, PrepareConfig, prepare
from raydrive.data.synth import SynthConfig, default_cache_dir, synthesize

DEFAULT_SYNTH = dict(scenes=10, samples_per_scene=10, seed=0)


def ensure_default_data(cache: Path | None = None, show_progress: bool = True) -> tuple[Path, Path]:
    """(dataroot, prepared) of the embedded default set, synthesising and preparing it if absent.

    A half-written folder (no tables, or no manifest) from an interrupted run is rebuilt.
    """
    cache = Path(cache or default_cache_dir())
    dataroot, prepared = cache / "nuscenes-synth", cache / "prepared"
    if not (dataroot / "v1.0-mini" / "sample_data.json").is_file() or not (dataroot / ".complete").is_file():
        shutil.rmtree(dataroot, ignore_errors=True)
        synthesize(SynthConfig(out=str(dataroot), show_progress=show_progress, **DEFAULT_SYNTH))
        (dataroot / ".complete").write_text("ok\n")
        shutil.rmtree(prepared, ignore_errors=True)
    if not (prepared / MANIFEST).is_file():
        prepare(PrepareConfig(out=str(prepared), dataroot=str(dataroot), show_progress=show_progress))
    return dataroot, prepared
