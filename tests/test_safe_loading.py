"""Pickled files a user may have downloaded (upstream info pkls, .pth checkpoints) load without
running their code; a crafted one is refused with a line that names what it wanted to call."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from raydrive.data.infos import DataError
from raydrive.data.pkl_formats import load_pkl
from raydrive.engine.checkpoint import load_weights
from raydrive.safe_pickle import UnsafeCheckpoint


class Crafted:
    """Creates a file when unpickled: what a malicious pickle would do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_info_pkl_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "nuscenes_infos_train.pkl"
    path.write_bytes(pickle.dumps({"infos": [{"token": "t", "x": Crafted(marker)}], "metadata": {"version": "v"}}))
    with pytest.raises(DataError, match=r"refusing to load (builtins|io)\.open"):
        load_pkl(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # control: plain pickle runs it
        pickle.load(f)
    assert marker.exists()


def test_info_pkl_with_numpy_loads(tmp_path):
    payload = {"infos": [{"gt_boxes": np.zeros((2, 7)), "n": np.int64(3), "names": np.array(["car", "bus"])}]}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(payload))
    got = load_pkl(path)
    assert got["infos"][0]["n"] == 3 and got["infos"][0]["names"].tolist() == ["car", "bus"]


def test_mmcv_style_checkpoint_loads_without_trust(tmp_path):
    path = tmp_path / "upstream.pth"
    meta = {"epoch": np.int64(100), "hook_msgs": {"best_score": np.float64(0.5)}, "CLASSES": ("car",)}
    torch.save({"state_dict": {"module.w": torch.ones(2)}, "meta": meta, "arr": np.arange(3)}, path)
    assert torch.equal(load_weights(path)["w"], torch.ones(2))


def test_checkpoint_with_code_needs_trust(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": Crafted(marker)}, path)
    with pytest.raises(UnsafeCheckpoint, match=r"(builtins|io)\.open.*--trust-checkpoint"):
        load_weights(path)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="can run code"):
        assert torch.equal(load_weights(path, trust=True)["w"], torch.ones(2))
    assert marker.exists()  # trusted: unpickled in full, as asked


def test_train_refuses_a_crafted_checkpoint_before_ray_starts(prepared, synth_root, tmp_path, capsys):
    from raydrive.launch.train import main

    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": {}, "meta": Crafted(tmp_path / "ran")}, path)
    argv = ["sparse4d", "--prepared", str(prepared), "--dataroot", str(synth_root), "--load-from", str(path)]
    start = time.perf_counter()
    assert main([*argv, "--storage-path", str(tmp_path / "runs")]) == 2
    assert time.perf_counter() - start < 15 and not (tmp_path / "runs").exists()  # refused before any run
    assert ".open to load" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*argv[:-1], str(tmp_path / "missing.pth")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
