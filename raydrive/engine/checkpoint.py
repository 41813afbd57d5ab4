"""Checkpoints: everything a run needs to continue exactly where it stopped.

One directory per checkpoint: `model.pt` (the model's state dict, upstream key names), `train_state.pt`
(optimizer, grad scaler, step, epoch, position in the epoch's lane plan, RNG states), `meta.json`, and
last `raydrive_complete.json`: every other file's size and sha256. Files are written into a temporary
directory and renamed into place; both `.pt` files load with `torch.load(weights_only=True)`.

Ray Train then copies the directory into the run folder under its final name, file by file, in no
set order (there is no hook to copy it under a temporary name): a copy cut short by a full disk or a
kill leaves a folder that looks like a checkpoint. The marker is what makes one visible to raydrive:
`verify` checks it (sizes; sha256 too when loading), and every reader (resume, `raydrive eval`, a
later stage, `--load-from`) skips and reports a folder that fails it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from raydrive import safe_pickle
from raydrive.data.infos import DataError
from raydrive.data.parquet import sha256_file

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"
COMPLETE_FILE = "raydrive_complete.json"  # written last: the other files' sizes and sha256


class BrokenCheckpoint(DataError):
    """A checkpoint folder that is incomplete or altered; the message says what is wrong with it."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
        "python_pos": int(random.getstate()[2] if random.getstate()[2] is not None else -1),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    pos = state["python_pos"]
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None if pos < 0 else pos))


def save(directory: Path, model_state: dict, train_state: dict, meta: dict) -> Path:
    """Write a checkpoint directory atomically; returns its path."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model_state, tmp / MODEL_FILE)
    torch.save(train_state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    write_marker(tmp, meta.get("step"))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def write_marker(directory: Path, step: int | None) -> None:
    """List every file of `directory` with its size and sha256 in COMPLETE_FILE (fsynced)."""
    directory = Path(directory)
    files = {
        f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(directory.iterdir())
        if f.is_file() and f.name != COMPLETE_FILE
    }
    with open(directory / COMPLETE_FILE, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def verify(directory: Path, full: bool = False) -> dict:
    """The marker of a complete checkpoint; raises BrokenCheckpoint saying what is missing, short or
    (with `full`) altered."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / COMPLETE_FILE).read_text())
        files = marker["files"]
    except FileNotFoundError:
        raise BrokenCheckpoint(f"no {COMPLETE_FILE} (its copy was cut short, or an older raydrive wrote it)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BrokenCheckpoint(f"{COMPLETE_FILE} is unreadable ({type(e).__name__})") from None
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        if name not in files:
            raise BrokenCheckpoint(f"{COMPLETE_FILE} does not list {name}")
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise BrokenCheckpoint(f"{name} is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise BrokenCheckpoint(f"{name} has {size} bytes, {info['size']} were written")
        if full and sha256_file(path) != info["sha256"]:
            raise BrokenCheckpoint(f"{name} differs from what was written (sha256)")
    return marker


def checkpoint_step(directory: Path) -> int | None:
    """The optimizer step a checkpoint folder holds (from its marker or meta.json), None if unknown."""
    for name in (COMPLETE_FILE, META_FILE):
        try:
            step = json.loads((Path(directory) / name).read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return None


def scan(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The run folder's complete checkpoints, oldest step first, and its broken ones with the reason."""
    complete, broken = [], []
    for d in sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()):
        try:
            verify(d)
        except BrokenCheckpoint as e:
            broken.append((d, str(e)))
            continue
        complete.append(d)
    complete.sort(key=lambda d: (checkpoint_step(d) or 0, d.name))
    return complete, broken


def load(directory: Path, map_location="cpu") -> tuple[dict, dict, dict]:
    """Model state, train state and meta of a checkpoint, verified in full first."""
    directory = Path(directory)
    try:
        verify(directory, full=True)
    except BrokenCheckpoint as e:
        raise BrokenCheckpoint(f"checkpoint {directory} is broken: {e}") from None
    model = torch.load(directory / MODEL_FILE, map_location=map_location, weights_only=True)
    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    return model, state, json.loads((directory / META_FILE).read_text())


def load_weights(path: str | Path, trust: bool = False) -> dict:
    """Model weights from a raydrive checkpoint directory, its model.pt, or an upstream .pth
    (a dict with "state_dict", as mmcv saves it). Nothing in the file runs unless `trust`
    (`raydrive/safe_pickle.py`)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--load-from {path}: no such checkpoint file")
    obj = safe_pickle.torch_load(path, trust)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}
