"""Losing a node mid-run (issue 12, item 6): a real 2-node Ray cluster on this machine (a head and a
second raylet started with `ray start --address`, each with its own CPUs and a custom resource),
2 workers spread over the nodes, the second node's raylet and worker processes killed by their
process ids. The run must finish with every step once, the data positions of an uninterrupted run,
resuming from the newest complete checkpoint on the surviving node, which can host both workers."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import SPARSE4D_TINY

from raydrive.engine import checkpoint as ckpt

MARK = "RAYDRIVE_NODE_LOSS_TEST"  # every process of the test's nodes inherits it: how they are found and killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of one node's agents: two raylets on one machine must not share them."""
    return [
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


def _registered_steps(snapshot: Path) -> list[int]:
    """Steps of the checkpoints in Ray's checkpoint-manager snapshot (none while it is absent or being written)."""
    try:
        return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _pids(value: str, title: bytes = b"") -> list[int]:
    """Processes whose environment has MARK=value (and whose command line starts with `title`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"{MARK}={value}".encode() in env and cmd.startswith(title):
            found.append(int(proc.name))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def two_nodes():
    """(GCS address, environment for drivers, token of the second node's processes)."""
    token = secrets.token_hex(4)
    tmp = tempfile.mkdtemp(prefix="rdnl-")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", MARK: token}
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0"]
    head = ["ray", "start", "--head", f"--port={port}", "--num-cpus=4", '--resources={"node_a": 1}']
    head += ["--include-dashboard=false", f"--ray-client-server-port={_free_port()}", *common, *_node_ports()]
    second = ["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"node_b": 1}']
    second += [*common, *_node_ports()]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(second, env={**env, MARK: f"{token}-b"}, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env, f"{token}-b"
    finally:
        for _ in range(3):  # ours only, by process id: never `ray stop`, which ends every Ray on the machine
            _kill(_pids(f"{token}-b") + _pids(token))
            time.sleep(0.5)
        shutil.rmtree(tmp, ignore_errors=True)


def _expected_tokens(argv: list[str], steps: int) -> dict[int, list[str]]:
    """Rank 0's frames per step of an uninterrupted run, from the sampling plan alone."""
    from raydrive.engine.loop import build_pipeline
    from raydrive.launch.train import build_parser, resolve_config
    from raydrive.trainers import get_spec

    cfg = resolve_config(build_parser().parse_intermixed_args(argv))
    pipeline = build_pipeline(get_spec(cfg.model_name), cfg, "train", True, cfg.run.num_workers)
    per_epoch = pipeline.steps_per_epoch()
    out = {}
    for step in range(1, steps + 1):
        epoch, in_epoch = divmod(step - 1, per_epoch)
        rows = pipeline.rows(epoch, 0)
        mask = [s == in_epoch for s in rows.column("step").to_pylist()]
        out[step] = [t for t, m in zip(rows.column("token").to_pylist(), mask) if m]
    return out


@pytest.mark.slow
def test_losing_a_node_resumes_from_the_newest_complete_checkpoint(two_nodes, prepared, synth_root, tmp_path):
    address, env, second = two_nodes
    steps = 8
    argv = ["sparse4d", "--preset", "small", "--prepared", str(prepared), "--dataroot", str(synth_root)]
    argv += ["--storage-path", str(tmp_path), "--name", "loss", "--num-workers", "2", "--cpus-per-worker", "1.5"]
    argv += ["--batch-size", "1", "--global-batch", "2", "--max-steps", str(steps), "--max-failures", "2", "--no-eval"]
    argv += ["run.checkpoint_every=2", "run.keep_checkpoints=20", "run.placement_strategy=SPREAD", *SPARSE4D_TINY]
    lines: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "raydrive.train", *argv],
        env={**env, "RAY_ADDRESS": address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    run_dir = tmp_path / "loss"
    killed, newest = [], None
    deadline = time.time() + 300
    while not killed and time.time() < deadline and proc.poll() is None:
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        workers_b = _pids(second, b"ray::RayTrainWorker")
        registered = _registered_steps(snapshot)
        if workers_b and registered:
            # the newest checkpoint Ray has registered: what its in-run restart continues from (one written
            # but not yet registered is used by a re-run of the command, not by Ray's restart; its steps'
            # records would be missing from Ray's results)
            newest = max(registered)
            killed = _pids(second)  # the second node's raylet, its agents and its workers
            _kill(killed)
        time.sleep(0.3)
    assert killed, "no training worker ran on the second node: " + "".join(lines)[-3000:]
    assert proc.wait(timeout=400) == 0, "".join(lines)[-4000:]

    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    reports = sorted((r["metrics"] for r in snap["checkpoint_results"]), key=lambda m: m["step"])
    history = [h for m in reports for h in m.get("history", [])]
    assert [h["step"] for h in history] == list(range(1, steps + 1)), "every step once"
    expected = _expected_tokens(argv, steps)
    assert {h["step"]: h["tokens"] for h in history} == expected, "the data positions of an uninterrupted run"
    resumed = {m.get("resumed_from") for m in reports} - {None}
    assert resumed and min(resumed) >= newest, (resumed, newest)
    assert all(r in {ckpt.checkpoint_step(d) for d in ckpt.scan(run_dir)[0]} for r in resumed)
    assert "resumed from step" in "".join(lines)
