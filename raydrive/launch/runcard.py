"""`<storage_path>/<run name>/run_card.json`: what a run was and how it ended, written by the driver.

The driver writes the card when the run starts (status "running") and completes it when Ray Train
returns or raises (status "finished", "paused" or "failed", the step reached, the last checkpoint,
the final headline metrics). A card that still says "running" means that no end was recorded: the
run is going on, or its driver was killed. Every write is atomic (a temporary file, then a rename),
so a reader never sees half a card. `raydrive runs` lists the cards under a storage path.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

RUN_CARD = "run_card.json"
STATUSES = ("running", "finished", "paused", "failed")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_state() -> dict[str, Any]:
    """The commit of the git checkout that holds the raydrive package (null when it is installed
    from a wheel or the checkout cannot be read), and whether tracked files differ from it."""
    import raydrive

    pkg = Path(raydrive.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # the package's own files must be tracked: a wheel installed into a virtualenv inside some other
    # repository is not that repository's commit
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    """torch, ray, numpy, nuscenes-devkit (null when missing) and, when present, torch_npu, mx_driving, CANN."""
    from raydrive.doctor import _cann_version, _version

    versions = {name: _version(name) for name in ("torch", "ray", "numpy", "nuscenes-devkit")}
    ascend = {
        "torch_npu": _version("torch_npu"),
        "mx_driving": _version("mx-driving") or _version("mx_driving"),
        "CANN": _cann_version(),
    }
    versions.update({k: v for k, v in ascend.items() if v})
    return versions


def node_accelerators() -> list[dict[str, Any]]:
    """NPU / GPU / CPU of every live node of the connected Ray cluster."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        nodes.append({"node": n.get("NodeManagerAddress"), **{k: float(r.get(k, 0)) for k in ("NPU", "GPU", "CPU")}})
    return nodes


def file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_card(run_dir: str | Path, card: dict) -> Path:
    """Write `run_card.json` atomically: a temporary file in the same folder, then a rename."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_CARD}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(card, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, run_dir / RUN_CARD)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return run_dir / RUN_CARD


def read_card(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_CARD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def start_card(cfg, preset_cfg, total_steps: int) -> dict:
    """The card of a run about to start. `preset_cfg` is `spec.config(cfg.preset)`, for the diff."""
    import raydrive
    from raydrive.config import batching, config_diff
    from raydrive.data.prepare import MANIFEST

    r = cfg.run
    b = batching(r)
    git = git_state()
    return {
        "name": r.name,
        "model": cfg.model_name,
        "preset": cfg.preset,
        "status": "running",  # until the driver records an end; a killed driver leaves it so
        "started_at": now(),
        "ended_at": None,
        "step": None,
        "total_steps": total_steps,
        "last_checkpoint": None,
        "metrics": {},
        "metrics_before": {},
        "error": None,
        "raydrive_version": raydrive.__version__,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "packages": package_versions(),
        "config_diff": config_diff(preset_cfg, cfg),
        "world_size": b.world_size,
        "batch_size_per_worker": b.batch_size,
        "accum_steps": b.accum_steps,
        "global_batch": b.global_batch,
        "accelerators_per_node": node_accelerators(),
        "seed": r.seed,
        "prepared": cfg.data.prepared,
        "manifest_sha256": file_sha256(Path(cfg.data.prepared) / MANIFEST) if cfg.data.prepared else None,
        "storage_path": r.storage_path,
    }


def end_card(card: dict, status: str, result=None, headline: tuple[str, ...] = (), error: str | None = None) -> dict:
    """The card completed from Ray Train's Result (or from the exception `fit` raised: `error`)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    card = {**card, "status": status, "ended_at": now()}
    m = (getattr(result, "metrics", None) or {}) if result is not None else {}
    if m.get("step") is not None:
        card["step"] = int(m["step"])
    if m.get("total_steps") is not None:
        card["total_steps"] = int(m["total_steps"])
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is not None:
        card["last_checkpoint"] = str(checkpoint.path)
    if status == "finished":
        card["metrics"] = {k: float(m[k]) for k in headline if k in m}
        card["metrics_before"] = {k: float(m[f"{k}_before"]) for k in headline if f"{k}_before" in m}
    if error is None and result is not None and getattr(result, "error", None) is not None:
        error = f"{type(result.error).__name__}: {result.error}"
    if error is not None:
        card["error"] = error if len(error) <= 4000 else "... " + error[-4000:]
    return card
