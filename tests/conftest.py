"""Shared fixtures: one small synthetic tree, prepared once, and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # live gauges reach the export quickly

# Sparse4D small preset, shrunk further for end-to-end tests
SPARSE4D_TINY = [
    "model.num_anchor=48",
    "model.num_temp_instances=24",
    "model.num_learnable_pts=2",
    "model.num_dn_groups=1",
    "model.decode_top_k=48",
    "data.cpus_per_task=0.25",
    "run.log_every=1",
]
BEVDEPTH_TINY = ["data.cpus_per_task=0.25", "run.log_every=1"]
STREAMPETR_TINY = ["data.cpus_per_task=0.25", "run.log_every=1"]
# per model: the small preset shrunk for end-to-end tests (shared tests are parametrised over these)
TINY = {"sparse4d": SPARSE4D_TINY, "bevdepth": BEVDEPTH_TINY, "streampetr": STREAMPETR_TINY}
KEY_LISTS = Path(__file__).resolve().parent / "data"  # upstream state-dict key lists, copied from shared/specs/keys


def upstream_keys(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """An upstream key list (tests/data/<name>) as key -> shape, in upstream's order; with `prefix`,
    only the keys under it, the prefix stripped."""
    out = {}
    for line in (KEY_LISTS / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            if key.startswith(prefix):
                out[key[len(prefix) :]] = tuple(int(x) for x in shape.strip("() ").split(",") if x.strip())
    return out


SMALL = dict(scenes=3, samples_per_scene=6, image_width=800, image_height=450, objects_per_scene=20, seed=3)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from raydrive.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("nusc")
    synthesize(SynthConfig(out=str(root), show_progress=False, **SMALL))
    return root


@pytest.fixture(scope="session")
def nusc(synth_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version="v1.0-mini", dataroot=str(synth_root), verbose=False)


@pytest.fixture(scope="session")
def prepared(synth_root, tmp_path_factory):
    from raydrive.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(
        PrepareConfig(
            out=str(out),
            dataroot=str(synth_root),
            show_progress=False,
            pkl_formats=["sparse4d", "streampetr", "bevdepth"],
        )
    )
    return out


@pytest.fixture(scope="session")
def records(prepared):
    from raydrive.data.parquet import read_split, table_to_records

    return {split: table_to_records(read_split(prepared / "infos" / split)) for split in ("train", "val")}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
