"""Bad input and faults, as a new user meets them (issue 12).

A table of bad inputs: each row sets one up, runs the command (in this process, or as a subprocess
where the process boundary is the point: exit codes, Ctrl-C, a dead RAY_ADDRESS) and checks the exit
code, that the last line names the thing and the fix, the time to report (< 15 s: everything in the
table is checkable before workers start) and that the folders it touched are as before (failures) or
complete (successes). The faults that only a running cluster shows (a corrupt image read by a worker,
a NaN loss, Ctrl-C, a full disk) follow as tests of their own on a real local Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPARSE4D_TINY

from raydrive.engine import checkpoint as ckpt

PRE_RAY_LIMIT_S = 15.0


def startup_s() -> float:
    """How long a bare `python -c "import raydrive's CLI and models"` takes here now: on a machine busy
    with other work a subprocess row's limit grows by what the load adds beyond a few seconds (that is
    not raydrive's time)."""
    start = time.perf_counter()
    code = "import raydrive.cli, raydrive.launch.train; from raydrive.trainers import list_models; list_models()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    return time.perf_counter() - start


# ---- helpers ---------------------------------------------------------------------------------------------------


def digest(folder: Path) -> dict[str, str] | None:
    """Every file under `folder` (relative path -> sha256), None if it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def link_tree(src: Path, dst: Path) -> Path:
    """A copy of a nuScenes tree made of symlinks (cheap); replace a file to break it."""
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, target)
    return dst


def replace(path: Path, data: bytes) -> Path:
    path.unlink()
    path.write_bytes(data)
    return path


def a_jpeg(root: Path, n: int = 2) -> Path:
    return sorted((root / "samples" / "CAM_BACK").glob("*.jpg"))[n]


def a_lidar(root: Path, n: int = 0) -> Path:
    return sorted((root / "samples" / "LIDAR_TOP").glob("*.bin"))[n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Env:
    """What a row's set-up may use: its own folder and copies of the session's synthetic data."""

    tmp: Path
    synth_root: Path
    prepared_src: Path

    def prepared(self) -> Path:
        out = self.tmp / "prepared"
        if not out.exists():
            shutil.copytree(self.prepared_src, out)
        return out

    def root(self) -> Path:
        out = self.tmp / "root"
        if not out.exists():
            link_tree(self.synth_root, out)
        return out

    def train(self, *extra: str, model: str = "sparse4d") -> list[str]:
        return [
            "train",
            model,
            "--preset",
            "small",
            "--prepared",
            str(self.prepared()),
            "--dataroot",
            str(self.synth_root),
            "--storage-path",
            str(self.tmp / "runs"),
            *extra,
        ]

    def prepare(self, *extra: str, root: Path | None = None) -> list[str]:
        return ["prepare", "--dataroot", str(root or self.root()), "--out", str(self.out()), "--no-assets", *extra]

    def out(self) -> Path:
        """A prepare --out that already holds a prepared set (which a failure must leave as it was)."""
        out = self.tmp / "out"
        if not out.exists():
            shutil.copytree(self.prepared_src, out)
        return out


@dataclass
class Setup:
    argv: list[str]
    unchanged: list[Path] = field(default_factory=list)  # folders a failure must leave as they were
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[str], None] | None = None  # more checks, given the whole output


@dataclass
class Row:
    finding: str
    setup: Callable[[Env], Setup]
    code: int
    expect: tuple[str, ...]  # all in the last line (for doctor: in a FAIL line)
    subprocess: bool = False


ROWS: dict[str, Row] = {}


def row(name: str, finding: str, code: int, *expect: str, subprocess: bool = False):
    def register(fn: Callable[[Env], Setup]):
        ROWS[name] = Row(finding, fn, code, expect, subprocess)
        return fn

    return register


def train_case(*extra: str, **kw) -> Callable[[Env], Setup]:
    def setup(e: Env) -> Setup:
        return Setup(e.train(*extra, **kw), unchanged=[e.prepared(), e.tmp / "runs"])

    return setup


# ---- config values: every section's ranges, before Ray starts -------------------------------------------------

SILENT = "silent wrong results"
for _model in ("sparse4d", "bevdepth"):
    row(f"num_workers_0_{_model}", SILENT, 2, "--num-workers 0", ">= 1")(train_case("--num-workers", "0", model=_model))
    row(f"max_steps_0_{_model}", SILENT, 2, "--max-steps 0", ">= 1")(train_case("--max-steps", "0", model=_model))
row("epochs_0", SILENT, 2, "--epochs 0", ">= 1")(train_case("--epochs", "0"))
row("batch_size_0", SILENT, 2, "--batch-size 0", ">= 1")(train_case("--batch-size", "0"))
row("tuple_length", SILENT, 2, "model.image_hw", "needs 2 values")(train_case("model.image_hw=(128)"))
row("lr_nan", SILENT, 2, "optim.lr=nan", "finite")(train_case("optim.lr=nan"))
row("probability_range", SILENT, 2, "data.skip_prob=1.5", "[0, 1]")(train_case("data.skip_prob=1.5"))
row("checkpoint_every_0", SILENT, 2, "run.checkpoint_every=0", ">= 1")(train_case("run.checkpoint_every=0"))
row("global_batch_split", SILENT, 2, "cannot be split", "run.global_batch to a multiple")(
    train_case("--global-batch", "3", "--num-workers", "2")
)
row("unknown_key", SILENT, 2, "optim.lrr", "did you mean optim.lr")(train_case("optim.lrr=1"))
row("unknown_preset", SILENT, 2, "no preset 'tiny'", "presets:")(
    lambda e: Setup([x if x != "small" else "tiny" for x in e.train()], unchanged=[e.prepared()])
)
row("env_not_key_value", SILENT, 2, "--env 'FOO'", "KEY=VALUE")(train_case("--env", "FOO"))


# ---- --load-from ---------------------------------------------------------------------------------------------


def _small_weights(e: Env) -> Path:
    import raydrive

    path = e.tmp / "small.pth"
    torch.save({"state_dict": raydrive.build_model("sparse4d", preset="small").state_dict()}, path)
    return path


class _Crafted:
    def __reduce__(self):
        return (open, ("/nonexistent-raydrive-crafted", "w"))


@row("load_missing", "late errors", 2, "missing.pth", "no such checkpoint file")
def _(e: Env) -> Setup:
    return train_case("--load-from", str(e.tmp / "missing.pth"))(e)


@row("load_truncated", "late errors", 2, "trunc.pth", "truncated", "download it again")
def _(e: Env) -> Setup:
    path = e.tmp / "trunc.pth"
    path.write_bytes(_small_weights(e).read_bytes()[:50_000])
    return train_case("--load-from", str(path))(e)


@row("load_wrong_preset", "late errors", 2, "does not fit sparse4d (full)", "it fits --preset small")
def _(e: Env) -> Setup:
    argv = [x if x != "small" else "full" for x in e.train("--load-from", str(_small_weights(e)))]
    return Setup(argv, unchanged=[e.prepared(), e.tmp / "runs"])


@row("load_crafted_pickle", "security", 2, "crafted.pth", "could run code", "--trust-checkpoint")
def _(e: Env) -> Setup:
    path = e.tmp / "crafted.pth"
    torch.save({"state_dict": {}, "meta": _Crafted()}, path)
    return train_case("--load-from", str(path))(e)


@row("load_incomplete_checkpoint", "full disk", 2, "incomplete checkpoint", "raydrive_complete.json")
def _(e: Env) -> Setup:
    d = ckpt.save(e.tmp / "checkpoint_x", {"w": torch.zeros(2)}, {"step": 1}, {"model": "sparse4d", "step": 1})
    (d / ckpt.COMPLETE_FILE).unlink()  # a copy cut short before its marker arrived
    return train_case("--load-from", str(d))(e)


@row("load_other_model", "late errors", 2, "a bevdepth checkpoint, not sparse4d", "give a sparse4d checkpoint")
def _(e: Env) -> Setup:
    d = ckpt.save(e.tmp / "checkpoint_b", {"w": torch.zeros(2)}, {"step": 1}, {"model": "bevdepth", "step": 1})
    return train_case("--load-from", str(d))(e)


@row("load_empty_folder", "late errors", 2, "--load-from", "holds no complete raydrive checkpoint", "run folder")
def _(e: Env) -> Setup:
    (e.tmp / "empty_run").mkdir()
    return train_case("--load-from", str(e.tmp / "empty_run"))(e)


# ---- the prepared folder against its manifest ------------------------------------------------------------------

INTERRUPTED = "interrupted re-prepare"


@row("part_rewritten", INTERRUPTED, 2, "infos/val/part-00000.parquet", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    p = e.prepared()
    shutil.copy(p / "infos" / "train" / "part-00000.parquet", p / "infos" / "val" / "part-00000.parquet")
    return Setup(e.train(), unchanged=[p, e.tmp / "runs"])


@row("part_same_size_altered", INTERRUPTED, 2, "part-00000.parquet differs", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    part = e.prepared() / "infos" / "train" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another modification time: the fast check hashes it
    part.write_bytes(bytes(data))
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"])


@row("part_deleted", INTERRUPTED, 2, "part-00000.parquet is missing", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    (e.prepared() / "infos" / "train" / "part-00000.parquet").unlink()
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"])


@row("stale_part", INTERRUPTED, 2, "part-00001.parquet is not in the manifest", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    split = e.prepared() / "infos" / "train"
    shutil.copy(split / "part-00000.parquet", split / "part-00001.parquet")
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"])


@row("manifest_broken", INTERRUPTED, 2, "manifest.json is unreadable", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    (e.prepared() / "manifest.json").write_text('{"splits": ')
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"])


@row("depth_file_deleted", INTERRUPTED, 2, "depth files", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    next((e.prepared() / "depth_gt").glob("*.bin")).unlink()
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"])


@row("asset_altered", INTERRUPTED, 2, "nuscenes_kmeans900.npy differs", "re-run `raydrive prepare")
def _(e: Env) -> Setup:
    anchors = e.prepared() / "anchors" / "nuscenes_kmeans900.npy"
    np.save(anchors, np.load(anchors) + 1.0)
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"])


@row("not_prepared", INTERRUPTED, 2, "has no manifest.json", "raydrive prepare")
def _(e: Env) -> Setup:
    empty = e.tmp / "empty"
    empty.mkdir()
    argv = ["train", "sparse4d", "--preset", "small", "--prepared", str(empty), "--storage-path", str(e.tmp / "runs")]
    return Setup(argv, unchanged=[empty, e.tmp / "runs"])


# ---- storage and cluster ---------------------------------------------------------------------------------------

HANGS = "hangs"


@row("storage_unwritable", "full disk", 2, "--storage-path", "not writable", "another --storage-path")
def _(e: Env) -> Setup:
    blocker = e.tmp / "a-file"
    blocker.write_text("not a folder")
    argv = [*e.train()[:-2], "--storage-path", str(blocker / "runs")]
    return Setup(argv, unchanged=[e.prepared(), blocker])


@row("dead_ray_address", HANGS, 2, "RAY_ADDRESS=127.0.0.1:", "no Ray cluster answers", "ray start", subprocess=True)
def _(e: Env) -> Setup:
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"], env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})


@row("bad_ray_address", HANGS, 2, "RAY_ADDRESS=nonsense", "HOST:PORT", subprocess=True)
def _(e: Env) -> Setup:
    return Setup(e.train(), unchanged=[e.prepared(), e.tmp / "runs"], env={"RAY_ADDRESS": "nonsense"})


# ---- prepare: cheap data checks, staging ---------------------------------------------------------------------

BAD_DATA = "silent wrong results"


@row("corrupt_jpeg", BAD_DATA, 2, "corrupt image", ".jpg", "replace it", subprocess=True)
def _(e: Env) -> Setup:
    replace(a_jpeg(e.root()), b"\x00garbage, not a JPEG" * 100)
    return Setup(e.prepare(), unchanged=[e.out()])


@row("truncated_jpeg", BAD_DATA, 2, "truncated image", "no JPEG end marker", "replace it")
def _(e: Env) -> Setup:
    victim = a_jpeg(e.root())
    replace(victim, victim.read_bytes()[:-4000])
    return Setup(e.prepare(), unchanged=[e.out()])


@row("image_wrong_size", BAD_DATA, 2, ".jpg", "its calibration says 800x450")
def _(e: Env) -> Setup:
    from PIL import Image

    victim = a_jpeg(e.root())
    victim.unlink()
    Image.new("RGB", (320, 180)).save(victim)
    return Setup(e.prepare(), unchanged=[e.out()])


@row("missing_image", BAD_DATA, 2, "missing image", ".jpg", "--dataroot")
def _(e: Env) -> Setup:
    a_jpeg(e.root()).unlink()
    return Setup(e.prepare(), unchanged=[e.out()])


@row("truncated_lidar", BAD_DATA, 2, "lidar file", "not a multiple of 5", "intact copy")
def _(e: Env) -> Setup:
    victim = a_lidar(e.root())
    replace(victim, victim.read_bytes()[:-6])
    return Setup(e.prepare(), unchanged=[e.out()])


@row("out_not_prepared", INTERRUPTED, 2, "not a prepared folder", "new or empty folder")
def _(e: Env) -> Setup:
    out = e.tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own file")
    return Setup(["prepare", "--dataroot", str(e.root()), "--out", str(out)], unchanged=[out])


@row("lidar_nan_reported", BAD_DATA, 0, "manifest:")
def _(e: Env) -> Setup:
    victim = a_lidar(e.root())
    points = np.fromfile(victim, dtype=np.float32).reshape(-1, 5)
    points[:7, 0] = np.nan
    replace(victim, points.tobytes())

    def after(output: str) -> None:
        assert f"lidar file {victim}" in output and "7 points with NaN" in output
        assert json.loads((e.out() / "manifest.json").read_text())["lidar_nan"][0]["nan_points"] == 7

    return Setup(e.prepare("--no-depth-gt"), after=after)


@row("reprepare_leaves_no_stale_files", INTERRUPTED, 0, "manifest:")
def _(e: Env) -> Setup:
    out = e.out()
    stale = [out / "pkl" / "streampetr" / "old.pkl", out / "depth_gt" / "old.jpg.bin", out / "infos" / "test" / "x"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("stale")

    def after(output: str) -> None:
        from raydrive.data.prepare import verify_prepared

        assert not any(p.exists() for p in stale) and not (out / "anchors").exists()
        verify_prepared(out, full=True)
        assert not list(out.parent.glob(".out.*")), "the staging folder must be gone"

    return Setup(e.prepare("--no-depth-gt"), after=after)


def _pkl_with_prefix(e: Env, prefix: str) -> Path:
    """The session's Sparse4D val pkl with its paths written under another root, as a converter run
    elsewhere (`--root_path ./data/nuscenes`) writes them."""
    payload = pickle.loads((e.prepared_src / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl").read_bytes())
    root = str(e.synth_root)

    def moved(p: str) -> str:
        return prefix + os.path.relpath(p, root) if os.path.isabs(p) else p

    for info in payload["infos"]:
        info["lidar_path"] = moved(info["lidar_path"])
        for c in info["cams"].values():
            c["data_path"] = moved(c["data_path"])
        for s in info["sweeps"]:
            s["data_path"] = moved(s["data_path"])
    path = e.tmp / "nuscenes_infos_val.pkl"
    path.write_bytes(pickle.dumps(payload))
    return path


@row("pkl_relative_prefix", "relative pkl paths", 0, "manifest:")
def _(e: Env) -> Setup:
    pkl = _pkl_with_prefix(e, "./data/nuscenes/")
    out = e.tmp / "from-pkl"

    def after(output: str) -> None:
        from raydrive.data.parquet import read_split

        paths = read_split(out / "infos" / "val").column("cam_data_path").to_pylist()
        assert all(p.startswith("samples/") for cams in paths for p in cams), paths[0]

    argv = ["prepare", "--from-pkl", str(pkl), "--dataroot", str(e.synth_root), "--out", str(out), "--no-assets"]
    return Setup([*argv, "--no-depth-gt"], after=after)


@row("pkl_crafted", "security", 2, "refusing to load", "info pkls hold only numpy arrays and builtins")
def _(e: Env) -> Setup:
    pkl = e.tmp / "crafted_val.pkl"
    pkl.write_bytes(pickle.dumps({"infos": [_Crafted()]}))
    return Setup(["prepare", "--from-pkl", str(pkl), "--out", str(e.out())], unchanged=[e.out()])


@row("pkl_truncated", BAD_DATA, 2, "corrupt or truncated", "re-create it")
def _(e: Env) -> Setup:
    pkl = e.tmp / "trunc_val.pkl"
    good = (e.prepared_src / "pkl" / "sparse4d" / "nuscenes_infos_val.pkl").read_bytes()
    pkl.write_bytes(good[: len(good) // 2])
    return Setup(["prepare", "--from-pkl", str(pkl), "--out", str(e.out())], unchanged=[e.out()])


# ---- eval ----------------------------------------------------------------------------------------------------

EVAL = "evaluation tracebacks"


def _submission(e: Env, change: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
    from raydrive.eval.detection import to_submission

    path = e.tmp / "results_nusc.json"
    if text is not None:
        path.write_text(text)
        return path
    from raydrive.data.parquet import read_split, table_to_records

    records = table_to_records(read_split(e.prepared_src / "infos" / "val"))
    sub = to_submission({}, records)
    if change:
        change(sub)
    path.write_text(json.dumps(sub))
    return path


def _eval_argv(e: Env, path: Path) -> list[str]:
    return ["eval", "--dataroot", str(e.synth_root), "--results", str(path)]


@row("results_not_json", EVAL, 2, "not valid JSON", "write it again", subprocess=True)
def _(e: Env) -> Setup:
    return Setup(_eval_argv(e, _submission(e, text='{"meta": {"use_camera": tr')))


@row("results_no_meta", EVAL, 2, "no 'meta' object", "use_camera")
def _(e: Env) -> Setup:
    return Setup(_eval_argv(e, _submission(e, lambda s: s.pop("meta"))))


@row("results_wrong_tokens", EVAL, 2, "does not cover split mini_val", "1 of its 6 samples are missing")
def _(e: Env) -> Setup:
    return Setup(_eval_argv(e, _submission(e, lambda s: s["results"].popitem())))


@row("results_bad_box", EVAL, 2, "'translation' must be 3 finite numbers", "fix the writer")
def _(e: Env) -> Setup:
    def change(s):
        token = next(iter(s["results"]))
        box = {"sample_token": token, "translation": [1.0, 2.0], "size": [1, 1, 1], "rotation": [1, 0, 0, 0]}
        box.update(velocity=[0, 0], detection_name="car", detection_score=0.5, attribute_name="")
        s["results"][token] = [box]

    return Setup(_eval_argv(e, _submission(e, change)))


@row("eval_unknown_model", SILENT, 2, "unknown model 'sparse5d'", "registered models")
def _(e: Env) -> Setup:
    return Setup(["eval", "sparse5d", "--checkpoint", str(e.tmp)])


@row("eval_run_without_complete_checkpoint", "full disk", 2, "holds no complete raydrive checkpoint", "run folder")
def _(e: Env) -> Setup:
    run = e.tmp / "run"
    d = ckpt.save(run / "checkpoint_2026", {"w": torch.zeros(2)}, {"step": 1}, {"model": "sparse4d", "step": 1})
    (d / ckpt.MODEL_FILE).write_bytes(b"cut")
    return Setup(["eval", "sparse4d", "--checkpoint", str(run)], unchanged=[run])


# ---- doctor: FAIL lines, never a hang or a traceback ----------------------------------------------------------


@row("doctor_dead_address", HANGS, 1, "FAIL  cluster", "no Ray cluster answers", subprocess=True)
def _(e: Env) -> Setup:
    argv = ["doctor", "--storage-path", str(e.tmp / "runs"), "--prepared", str(e.prepared())]
    return Setup(argv, env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})


@row("doctor_broken_manifest", INTERRUPTED, 1, "FAIL  prepared data", "unreadable", "raydrive prepare")
def _(e: Env) -> Setup:
    (e.prepared() / "manifest.json").write_text("[1, 2")
    argv = ["doctor", "--storage-path", str(e.tmp / "runs"), "--prepared", str(e.prepared())]
    return Setup(argv, unchanged=[e.prepared()], env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})


@row("doctor_altered_part", INTERRUPTED, 1, "FAIL  prepared data", "differs from what prepare wrote (sha256)")
def _(e: Env) -> Setup:
    part = e.prepared() / "infos" / "val" / "part-00000.parquet"
    stat = part.stat()
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old time: doctor hashes everything
    argv = ["doctor", "--storage-path", str(e.tmp / "runs"), "--prepared", str(e.prepared())]
    return Setup(argv, unchanged=[e.prepared()], env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})


@row("doctor_unwritable_storage", "full disk", 1, "FAIL  storage", "not writable", "--storage-path")
def _(e: Env) -> Setup:
    blocker = e.tmp / "a-file"
    blocker.write_text("x")
    argv = ["doctor", "--storage-path", str(blocker / "runs"), "--prepared", str(e.prepared())]
    return Setup(argv, env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})


# ---- running the table -----------------------------------------------------------------------------------------


def run_cli(argv: list[str], env: dict[str, str], in_subprocess: bool, capfd, monkeypatch) -> tuple[int, str, str]:
    """(exit code, the whole output, the line that matters: the last one, or doctor's FAIL lines)."""
    if in_subprocess:
        proc = subprocess.run(
            [sys.executable, "-m", "raydrive.cli", *argv],
            env={**os.environ, "RAY_ADDRESS": "local", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        code, out, last = proc.returncode, proc.stdout, last_line(proc.stdout)
    else:
        from raydrive.cli import main

        for k, v in env.items():
            monkeypatch.setenv(k, v)
        capfd.readouterr()
        code = main(argv)
        captured = capfd.readouterr()
        out = captured.out + captured.err
        # errors end on stderr; a success ends with its summary on stdout (stderr has progress bars)
        last = last_line(captured.err) if code else last_line(captured.out)
    if argv[0] == "doctor":
        last = "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))
    return code, out, last


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, tmp_path, synth_root, prepared, capfd, monkeypatch):
    r = ROWS[name]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    s = r.setup(Env(tmp_path, synth_root, prepared))
    before = {p: digest(p) for p in s.unchanged}
    start = time.perf_counter()
    code, out, last = run_cli(s.argv, s.env, r.subprocess, capfd, monkeypatch)
    elapsed = time.perf_counter() - start
    print(f"[{name}] exit {code} after {elapsed:.1f}s: {last}")
    assert code == r.code, out[-3000:]
    for text in r.expect:
        assert text in last, f"{text!r} not in the last line {last!r}"
    if r.code != 0 and not s.argv[0] == "doctor":
        assert "Traceback" not in out, out[-3000:]
    limit = PRE_RAY_LIMIT_S
    if r.subprocess and elapsed >= limit:  # measured only then: it costs a Python start-up
        limit += max(0.0, startup_s() - 5.0)
    assert elapsed < limit, f"{elapsed:.1f}s"
    for p, digest_before in before.items():
        assert digest(p) == digest_before, f"{p} changed"
    if s.after:
        s.after(out)


def test_the_table_covers_every_finding():
    assert len(ROWS) >= 30
    findings = {r.finding for r in ROWS.values()}
    assert findings >= {SILENT, "late errors", "full disk", INTERRUPTED, HANGS, "security", EVAL, "relative pkl paths"}


@pytest.mark.parametrize("cpus_per_worker, workers, expect", [(2.0, 2, "decode tasks"), (0.5, 16, "do not fit")])
def test_resources_the_cluster_cannot_give_are_refused(
    cpus_per_worker, workers, expect, ray_local, tmp_path, synth_root, prepared, capfd
):
    """Workers x CPUs equal to all CPUs (no room for decode tasks: no step for minutes) or more workers
    than the cluster hosts (Ray waits forever): one line before any worker starts."""
    from raydrive.cli import main

    e = Env(tmp_path, synth_root, prepared)
    argv = e.train("--num-workers", str(workers), "--global-batch", str(workers), "--batch-size", "1")
    start = time.perf_counter()
    assert main([*argv, "--cpus-per-worker", str(cpus_per_worker)]) == 2
    assert time.perf_counter() - start < PRE_RAY_LIMIT_S
    last = last_line(capfd.readouterr().err)
    assert expect in last and ("--cpus-per-worker" in last or "--num-workers" in last), last
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))


def test_prepare_interrupted_leaves_out_as_it_was(tmp_path, synth_root, prepared):
    """SIGINT while a re-prepare writes: --out keeps the previous set, no staging folder is left."""
    e = Env(tmp_path, synth_root, prepared)
    out = e.out()
    before = digest(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raydrive.cli", "prepare", "--dataroot", str(synth_root), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while not list(out.parent.glob(".out.staging-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the build
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-2000:]
    assert "--out was left as it was" in last_line(output)
    assert digest(out) == before
    assert not list(out.parent.glob(".out.*"))


# ---- faults that a running cluster shows ------------------------------------------------------------------------

TRAIN_FAST = [
    "--batch-size",
    "1",
    "--global-batch",
    "2",
    "--num-workers",
    "2",
    "--no-eval",
    *SPARSE4D_TINY,
]


def _read_lines(proc: subprocess.Popen, into: list[str]) -> threading.Thread:
    def pump():
        for line in proc.stdout:
            into.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def ray_address(ray) -> str:
    """The session Ray's GCS address, which a subprocess driver joins (faster than starting its own)."""
    return ray._private.worker._global_node.address


@pytest.mark.slow
def test_worker_data_error_is_one_line_and_not_retried(ray_local, tmp_path, synth_root, prepared):
    """A corrupt image met by a Ray Data task inside a training worker (prepare checked it, then it
    broke): the driver ends with one line naming the image and the fix, after a single attempt
    although --max-failures allows 3, with the traceback in the run's log file."""
    e = Env(tmp_path, synth_root, prepared)
    root = e.root()
    for victim in (root / "samples" / "CAM_BACK").glob("*.jpg"):  # whichever frame comes first
        replace(victim, victim.read_bytes()[:300] + b"\x00" * 4000 + b"\xff\xd9")
    argv = [*e.train("--name", "bad", "--max-steps", "4", "--max-failures", "3", *TRAIN_FAST)]
    argv[argv.index("--dataroot") + 1] = str(root)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "raydrive.cli", *argv],
        env={**os.environ, "RAY_ADDRESS": ray_address(ray_local)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    elapsed = time.perf_counter() - start
    last = last_line(proc.stdout)
    print(f"[worker_data_error] exit {proc.returncode} after {elapsed:.1f}s: {last}")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert last.startswith("raydrive train: error:") and "CAM_BACK" in last and "replace" in last, last
    ray_log = (tmp_path / "runs" / "bad" / "ray.log").read_text()  # Ray's own lines: not on the console
    assert ray_log.count("Started training worker group") == 1, "a data error must not be retried"
    assert "Started training worker group" not in proc.stdout
    log = tmp_path / "runs" / "bad" / "raydrive_errors.log"
    assert f"(traceback: {log})" in last and "Traceback" in log.read_text()
    assert json.loads((tmp_path / "runs" / "bad" / "run_card.json").read_text())["status"] == "failed"


def test_deterministic_failures_are_not_retried_infrastructure_failures_are(tmp_path):
    """The failure policy that Ray Train's controller runs: a NaN loss, a data error (also as the text of
    a Ray Data task's traceback, where only the text survives) or a full disk raise at once; a lost
    worker goes to Ray's default policy, which retries it while --max-failures lasts."""
    import errno

    from ray.exceptions import ActorDiedError
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, create_failure_policy
    from ray.train.v2.api.exceptions import WorkerGroupError

    from raydrive.data.infos import DataError
    from raydrive.engine.loop import NonFiniteLoss
    from raydrive.errors import FatalRunError, failure_line, worker_failure
    from raydrive.launch.trainer import FailFastPolicy

    nan = worker_failure(NonFiniteLoss("loss is NaN/inf at step 2; Lower optim.lr"), tmp_path, 0)
    task = RuntimeError("ray::MapBatches(map_block)()\nraydrive.data.infos.DataError: corrupt image a.jpg; replace it")
    full = worker_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 0)
    assert isinstance(nan, FatalRunError) and nan.log == str(tmp_path / "raydrive_errors.log")
    assert "storage" in full.line and "run the same command again" in full.line
    assert worker_failure(DataError("missing image b.jpg"), tmp_path, 1).line.startswith("missing image b.jpg; ")
    lost = ActorDiedError()
    assert worker_failure(lost, tmp_path, 1) is lost  # Ray Train restarts the group for it
    policy = FailFastPolicy(create_failure_policy(FailureConfig(max_failures=3)))
    for failures in ({0: nan}, {1: full}, {0: worker_failure(task, tmp_path, 0), 1: lost}):
        assert policy.make_decision(WorkerGroupError("x", failures)) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("x", {1: lost})) == FailureDecision.RETRY
    assert failure_line(WorkerGroupError("x", {0: lost, 1: nan})).startswith("loss is NaN/inf at step 2")
    assert "corrupt image a.jpg" in failure_line(WorkerGroupError("x", {0: task}))


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(ray_local, tmp_path, synth_root, prepared):
    e = Env(tmp_path, synth_root, prepared)
    argv = e.train("--name", "cc", "--max-steps", "200", "run.checkpoint_every=1", *TRAIN_FAST)
    lines: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "raydrive.cli", *argv],
        env={**os.environ, "RAY_ADDRESS": ray_address(ray_local)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pump = _read_lines(proc, lines)
    run_dir = tmp_path / "runs" / "cc"
    deadline = time.time() + 300
    # stop once a checkpoint is complete (the quiet console prints no line per step to wait for)
    while time.time() < deadline and proc.poll() is None and not (run_dir.is_dir() and ckpt.scan(run_dir)[0]):
        time.sleep(0.2)
    assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, "".join(lines)[-3000:]
    pump.join(timeout=10)
    print(f"[ctrl_c] stopped {time.perf_counter() - start:.1f}s after SIGINT: {last_line(''.join(lines))}")
    last = last_line("".join(lines))
    assert last.startswith("raydrive train: interrupted:") and "run the same command" in last, last
    complete, _ = ckpt.scan(run_dir)  # a copy cut short by the stop would be listed as broken: never used
    assert complete and str(complete[-1]) in last
    assert json.loads((run_dir / "run_card.json").read_text())["status"] == "paused"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _keep_first_registered(run_dir: Path) -> None:
    """Ray's snapshot as if only the first checkpoint had been registered (the driver died between the
    copies of the later ones and their registration)."""
    path = run_dir / "checkpoint_manager_snapshot.json"
    snap = json.loads(path.read_text())
    snap["checkpoint_results"] = snap["checkpoint_results"][:1]
    snap["checkpoint_report_indices"] = snap["checkpoint_report_indices"][:1]
    snap["latest_checkpoint_result"] = snap["checkpoint_results"][0]
    snap["current_report_index"] = snap["checkpoint_report_indices"][0] + 1
    path.write_text(json.dumps(snap))


@pytest.mark.slow
def test_full_disk_ends_with_a_line_and_the_same_command_resumes(ray_local, tmp_path, synth_root, prepared, capfd):
    """Storage on a 30 MB tmpfs: two checkpoints (13 MB each) fit, the third's copy fails. The run ends
    with one line; after space returns (the tmpfs grows) the same command resumes from the newest
    complete checkpoint, one that Ray had not registered, skipping the broken one."""
    from raydrive.cli import main

    storage = tmp_path / "small-disk"
    if not _mount_tmpfs(storage, "30m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        e = Env(tmp_path, synth_root, prepared)
        argv = [*e.train("--name", "fd", "--max-steps", "8", *TRAIN_FAST), "run.checkpoint_every=2"]
        argv[argv.index("--storage-path") + 1] = str(storage)
        argv.append("run.keep_checkpoints=10")
        assert main(argv) == 1
        last = last_line(capfd.readouterr().err)
        assert f"storage {storage / 'fd'} is full" in last and "run the same command again" in last, last
        run_dir = storage / "fd"
        complete, broken = ckpt.scan(run_dir)
        steps = [ckpt.checkpoint_step(d) for d in complete]
        assert steps == [2, 4] and len(broken) == 1, (steps, broken)
        _keep_first_registered(run_dir)

        subprocess.run(["mount", "-o", "remount,size=200m", str(storage)], check=True)
        assert main(argv) == 0
        out = capfd.readouterr().out
        assert f"skipping incomplete checkpoint {broken[0][0]}" in out
        assert "resuming from step 4" in out and "newer than Ray's latest registered checkpoint (step 2)" in out
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        assert snap["latest_checkpoint_result"]["metrics"]["resumed_from"] == 4
        card = json.loads((run_dir / "run_card.json").read_text())
        assert (card["status"], card["step"]) == ("finished", 8)
    finally:
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)
