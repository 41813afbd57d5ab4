"""What a run folder holds to resume from, decided by the driver before Ray Train starts.

Ray Train resumes from the latest checkpoint in its `checkpoint_manager_snapshot.json`. That file is
rewritten in place after each checkpoint, so a full disk can leave it empty (and Ray then fails on
every re-run), and a run stopped between a checkpoint's copy and its registration leaves complete
checkpoints that Ray does not know. The driver therefore scans the folder itself: broken checkpoints
are reported and skipped, a snapshot that cannot be used is set aside, and the workers get the newest
complete checkpoint to continue from whenever it is newer than Ray's (`engine/state.resume_point`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from raydrive.engine import checkpoint as ckpt

SNAPSHOT = "checkpoint_manager_snapshot.json"


def _say(message: str) -> None:
    print(f"[raydrive] {message}", flush=True)


def _snapshot_names(path: Path) -> list[str]:
    """Checkpoint folder names a Ray snapshot refers to; ValueError when it is unreadable."""
    data = json.loads(path.read_text())
    results = list(data.get("checkpoint_results") or [])
    if data.get("latest_checkpoint_result"):
        results.append(data["latest_checkpoint_result"])
    return [r["checkpoint_dir_name"] for r in results]


def registered_step(run_dir: Path) -> int | None:
    """The step of Ray's latest registered checkpoint, None when there is none or no usable snapshot."""
    try:
        names = _snapshot_names(Path(run_dir) / SNAPSHOT)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    steps = [ckpt.checkpoint_step(Path(run_dir) / n) for n in names]
    return max((s for s in steps if s is not None), default=None)


def _check_snapshot(run_dir: Path, broken: set[str]) -> None:
    """Set Ray's snapshot aside when Ray could not start from it (unreadable, or naming a checkpoint
    that is gone or broken); the run then continues from the newest complete checkpoint."""
    path = run_dir / SNAPSHOT
    if not path.exists():
        return
    try:
        names = _snapshot_names(path)
        bad = [n for n in names if n in broken or not (run_dir / n).is_dir()]
        why = f"names checkpoint {bad[0]}, which is missing or broken" if bad else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"is unreadable ({type(e).__name__})"
    if why is None:
        return
    aside = path.with_name(SNAPSHOT + ".broken")
    os.replace(path, aside)
    _say(f"Ray's {path} {why}: set aside as {aside.name}")


def prepare_resume(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint of `run_dir` to resume from (None: start afresh), after reporting
    the broken ones and setting aside a snapshot Ray could not use."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    complete, broken = ckpt.scan(run_dir)
    for d, why in broken:
        _say(f"skipping incomplete checkpoint {d}: {why}; it is never loaded (delete it to free its space)")
    _check_snapshot(run_dir, {d.name for d, _ in broken})
    if not complete:
        return None
    newest = complete[-1]
    step, ray_step = ckpt.checkpoint_step(newest), registered_step(run_dir)
    if ray_step is None:
        newer = " (Ray had not registered it)"
    elif ray_step < (step or 0):
        newer = f", newer than Ray's latest registered checkpoint (step {ray_step})"
    else:
        newer = ""
    _say(f"resuming from step {step}: {newest}{newer}")
    return str(newest)


def newest_complete(run_dir: str | Path, report=_say) -> Path | None:
    """The newest complete checkpoint of a run folder, reporting the broken ones it skips."""
    complete, broken = ckpt.scan(Path(run_dir))
    for d, why in broken:
        report(f"skipping incomplete checkpoint {d}: {why}")
    return complete[-1] if complete else None
