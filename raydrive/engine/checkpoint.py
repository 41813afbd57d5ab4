"""Checkpoints: everything a run needs to continue exactly where it stopped.

One directory per checkpoint: `model.pt` (the model's state dict, upstream key names), `train_state.pt`
(optimizer, grad scaler, step, epoch, position in the epoch's lane plan, RNG states) and `meta.json`.
Files are written into a temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint behind; both `.pt` files load with `torch.load(weights_only=True)`.
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

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"


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
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def load(directory: Path, map_location="cpu") -> tuple[dict, dict, dict]:
    directory = Path(directory)
    missing = [f for f in (MODEL_FILE, STATE_FILE, META_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete (missing {missing})")
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
