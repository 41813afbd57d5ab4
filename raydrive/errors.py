"""Failures that a retry cannot fix, and how any failure reaches the console as one line.

Ray Train restarts the worker group on every worker error while `--max-failures` lasts, and its
driver ends in a `TrainingFailedError` whose text buries raydrive's message in tracebacks. Here:

- `deterministic(exc)`: the failure would repeat on a retry (bad data, a NaN loss, a config the
  workers reject, a full disk); only the others (a lost worker or node) are worth a restart.
- workers turn a deterministic failure into `FatalRunError` (one line, traceback in the run's log
  file), which `raydrive/launch/trainer.py` tells Ray Train's controller not to retry;
- `failure_line` turns whatever `fit()` raised into the line the driver prints last.
"""

from __future__ import annotations

import datetime
import errno
import re
import traceback
from pathlib import Path

ERROR_LOG = "raydrive_errors.log"  # in the run folder: full tracebacks of the failures printed as one line
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DATA_FIX = "replace or remove the file named there (`raydrive prepare` checks every image and lidar file it lists)"
# how a raydrive error appears in a Ray task's traceback text, where the exception object itself is lost
_RAYDRIVE_LINE = re.compile(
    r"^raydrive\.[\w.]+\.(DataError|ConfigError|UnsafeCheckpoint|BrokenCheckpoint|FatalRunError|NonFiniteLoss): (.+)$"
)


class DeterministicError(RuntimeError):
    """A failure that repeats identically on a retry (e.g. a NaN loss at the same step)."""


class FatalRunError(RuntimeError):
    """What a worker raises for a deterministic failure: `line` names the file, sample or key and the
    fix; `log` is where its full traceback went."""

    def __init__(self, line: str, log: str | None = None):
        super().__init__(line)
        self.line, self.log = line, log

    def __reduce__(self):  # crosses process boundaries (worker -> controller -> driver)
        return (type(self), (self.line, self.log))


def _chain(exc: BaseException | None):
    """`exc` and the exceptions it wraps: __cause__, __context__ and Ray's `.cause`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        nxt = getattr(exc, "cause", None)
        exc = nxt if isinstance(nxt, BaseException) else (exc.__cause__ or exc.__context__)


def _raydrive_types() -> tuple[type, ...]:
    from raydrive.config import ConfigError
    from raydrive.data.infos import DataError

    return (DataError, ConfigError, DeterministicError, FatalRunError)


def disk_full(exc: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in _DISK_FULL for e in _chain(exc)) or "No space left" in str(exc)


def deterministic(exc: BaseException) -> bool:
    """Would a retry fail the same way? raydrive's own errors (also inside Ray tasks, where only their
    text survives) and a full disk: yes. Anything else (a dead worker, a lost node): maybe not."""
    if any(isinstance(e, _raydrive_types()) for e in _chain(exc)):
        return True
    return disk_full(exc) or _raydrive_message(exc) is not None


def _raydrive_message(exc: BaseException) -> str | None:
    """The message of the innermost raydrive error named in `exc`'s text (Ray task tracebacks)."""
    found = None
    for line in str(exc).splitlines():
        m = _RAYDRIVE_LINE.match(line.strip())
        if m:
            found = m.group(2)
    return found


def one_line(exc: BaseException) -> str:
    """The most useful single line about `exc`: raydrive's own message where there is one."""
    if isinstance(exc, FatalRunError):
        return exc.line
    for e in _chain(exc):
        if isinstance(e, FatalRunError):
            return e.line
        if isinstance(e, _raydrive_types()):
            return _flat(str(e))
    text = _raydrive_message(exc)
    if text:
        return _flat(text)
    if disk_full(exc):
        return "no space left on the storage device (No space left on device)"
    inner = list(_chain(exc))[-1]
    first = next((s for s in str(inner).splitlines() if s.strip()), "")
    return _flat(f"{type(inner).__name__}: {first}")


def _flat(text: str, limit: int = 1500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_traceback(run_dir: str | Path | None, exc: BaseException, who: str) -> str | None:
    """Append `exc`'s full traceback to the run folder's error log; its path, or None where it cannot
    be written (object storage, a full disk)."""
    if not run_dir or "://" in str(run_dir):
        return None
    path = Path(run_dir) / ERROR_LOG
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"=== {stamp} {who}\n{text}\n")
    except OSError:
        return None
    return str(path)


def worker_failure(exc: BaseException, run_dir: str | Path | None, rank: int) -> BaseException:
    """What a worker raises instead of `exc`: FatalRunError when a retry would fail the same way,
    else `exc` itself (Ray Train restarts the group for it). The traceback goes to the run's log."""
    log = log_traceback(run_dir, exc, f"rank {rank}")
    if not deterministic(exc):
        return exc
    if disk_full(exc):
        line = (
            f"storage {run_dir} is full (No space left on device); free space or pass another --storage-path, "
            f"then run the same command again: it resumes from the newest complete checkpoint"
        )
    else:
        line = one_line(exc)
        if ";" not in line:  # a message that names the problem but not what to do
            line += f"; {DATA_FIX}"
    return FatalRunError(line, log)


def failure_line(exc: BaseException) -> str:
    """One line for whatever `TrainingFailedError` (or other error) `fit()` raised: a worker's
    FatalRunError first, then the lowest rank's error, then the controller's."""
    failures = getattr(exc, "worker_failures", None) or {}
    ranked = [failures[r] for r in sorted(failures)]
    fatal = [e for e in ranked if isinstance(e, FatalRunError) or deterministic(e)]
    chosen = (fatal or ranked or [getattr(exc, "controller_failure", None) or exc])[0]
    line = one_line(chosen)
    log = getattr(chosen, "log", None)
    return line + (f" (traceback: {log})" if log and "(traceback:" not in line else "")


def failure_traceback(exc: BaseException) -> str | None:
    """The full traceback of a failure that is not one of raydrive's one-line kinds (a bug, a crash):
    the quiet console shows it whole, since no single line can say what went wrong. None otherwise."""
    failures = getattr(exc, "worker_failures", None) or {}
    ranked = [failures[r] for r in sorted(failures)]
    if any(isinstance(e, FatalRunError) or deterministic(e) for e in ranked) or deterministic(exc):
        return None
    if "Traceback (most recent call last)" in str(exc):  # Ray Train's WorkerGroupError: each rank's traceback
        return str(exc).rstrip()
    chosen = (ranked or [getattr(exc, "controller_failure", None) or exc])[0]
    text = str(chosen)
    if "Traceback (most recent call last)" not in text:
        text = "".join(traceback.format_exception(type(chosen), chosen, chosen.__traceback__))
    return text.rstrip()


class RunFailed(RuntimeError):
    """A run that stopped on an error; its text is the one line the driver prints last."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run cleanly; its text says where and how to resume."""
