"""Training end to end through the real driver and Ray Train on a local Ray (slow tests, few)."""

from __future__ import annotations

import pytest
from conftest import TINY

from raydrive.launch.train import build_parser, resolve_config, run

MODELS = sorted(TINY)
LEARNS_ON_EMBEDDED = MODELS


def _train(prepared, synth_root, storage, name, *extra, model="sparse4d"):
    argv = [
        model,
        "--preset",
        "small",
        "--prepared",
        str(prepared),
        "--dataroot",
        str(synth_root),
        "--storage-path",
        str(storage),
        "--name",
        name,
        "--batch-size",
        "1",
        "--global-batch",
        "2",
        "--no-eval",
        "--max-steps",
        "6",
        "run.checkpoint_every=2",
        "run.keep_checkpoints=10",
        *TINY[model],
        *extra,
    ]
    cfg = resolve_config(build_parser().parse_intermixed_args(argv))
    result = run(cfg)
    assert result.error is None, result.error
    reports = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["step"])
    history = {h["step"]: h for m in reports for h in m.get("history", [])}
    return result, reports, history


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_data_parallel_training_and_exact_resume(model, prepared, synth_root, ray_local, tmp_path, capsys):
    def train(*args, **kw):
        return _train(*args, **kw, model=model)

    # two workers, uninterrupted: every checkpoint verified that both ranks hold identical parameters
    _, reports_a, hist_a = train(prepared, synth_root, tmp_path, "a", "--num-workers", "2")
    assert [m["step"] for m in reports_a] == [2, 4, 6]
    assert all(m["ranks_checked"] == 2 for m in reports_a)
    assert sorted(hist_a) == [1, 2, 3, 4, 5, 6]

    # the same run paused after step 3, then started again with the same name and storage path
    res_b1, reports_b1, _ = train(prepared, synth_root, tmp_path, "b", "--num-workers", "2", "run.stop_at_step=3")
    assert [m["step"] for m in reports_b1] == [2, 3]
    _, reports_b2, _ = train(prepared, synth_root, tmp_path, "b", "--num-workers", "2")
    new = [m for m in reports_b2 if m["step"] > 3]  # the result also lists the paused run's checkpoints
    hist_b2 = {h["step"]: h for m in new for h in m["history"]}
    assert sorted(hist_b2) == [4, 5, 6], "the re-run must continue at step 4, not start over"
    for s in (4, 5, 6):  # same frames (data position) and the same loss curve as the uninterrupted run
        assert hist_b2[s]["tokens"] == hist_a[s]["tokens"]
        assert hist_b2[s]["loss"] == pytest.approx(hist_a[s]["loss"], rel=1e-4)
    assert reports_b2[-1]["param_checksum"] == pytest.approx(reports_a[-1]["param_checksum"], rel=1e-6)

    # `raydrive eval MODEL --checkpoint RUN_FOLDER` scores the run's latest checkpoint on the val split
    from raydrive.cli import main

    assert main(["eval", model, "--checkpoint", str(tmp_path / "a")]) == 0
    assert "mAP:" in capsys.readouterr().out

    # one worker with the same global batch accumulates 2 micro-batches per step: the same frames per
    # optimizer step (its first micro-batch is rank 0's share), temporal lanes kept per micro-batch
    _, reports_c, hist_c = train(prepared, synth_root, tmp_path, "c", "--num-workers", "1")
    assert [m["step"] for m in reports_c] == [2, 4, 6]
    for s in range(1, 7):
        assert len(hist_c[s]["tokens"]) == 2 and hist_c[s]["tokens"][0] == hist_a[s]["tokens"][0]


@pytest.mark.slow
@pytest.mark.parametrize("model", LEARNS_ON_EMBEDDED)
def test_embedded_default_learns(model, ray_local, tmp_path, monkeypatch):
    """The README's first command (`python -m raydrive.train MODEL`), on a fresh cache: the same
    run scores the untrained and the trained model on the synthetic val split."""
    monkeypatch.setenv("RAYDRIVE_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(build_parser().parse_intermixed_args([model]))
    from raydrive.launch.train import resolve_data

    resolve_data(cfg)
    assert (cfg.run.num_workers, cfg.preset) == (2, "small")
    result = run(cfg)
    assert result.error is None, result.error
    m = result.metrics
    assert m["mAP_before"] < 0.002
    assert m["mAP"] > max(5 * m["mAP_before"], m["mAP_before"] + 0.005), (m["mAP_before"], m["mAP"])
    assert m["NDS"] > m["NDS_before"] + 0.02
    assert result.checkpoint is not None


def _scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_raydrive_\w+)\{(.*)\} (\S+)$", line)
        if m:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.setdefault(m.group(1), []).append((tags, float(m.group(3))))
    return out


@pytest.mark.slow
def test_live_metrics_reach_the_nodes_prometheus_export(prepared, synth_root, ray_local, tmp_path):
    import threading
    import time

    port = ray_local._private.worker._global_node.metrics_export_port
    done = {}
    thread = threading.Thread(
        target=lambda: done.update(
            r=_train(
                prepared,
                synth_root,
                tmp_path,
                "live",
                "--num-workers",
                "2",
                "--max-steps",
                "40",
                "run.checkpoint_every=100",
            )
        )
    )
    thread.start()
    seen: dict = {}
    deadline = time.time() + 240
    while time.time() < deadline and thread.is_alive():
        seen = _scrape(port)
        steps = [(t, v) for t, v in seen.get("ray_raydrive_step", []) if t.get("run") == "live"]
        if {t["rank"] for t, _ in steps} == {"0", "1"} and any(v >= 3 for _, v in steps):
            break
        time.sleep(2)
    thread.join()
    assert done["r"][0].error is None
    live = {name: [(t, v) for t, v in series if t.get("run") == "live"] for name, series in seen.items()}
    for name in (
        "ray_raydrive_loss",
        "ray_raydrive_lr",
        "ray_raydrive_samples_per_s",
        "ray_raydrive_step_time_s",
        "ray_raydrive_data_wait_s",
        "ray_raydrive_data_wait_fraction",
        "ray_raydrive_memory_bytes",
    ):
        assert live.get(name), f"{name} not exported"
    terms = {t["term"] for t, _ in live["ray_raydrive_loss"]}
    assert {"total", "loss_cls_0", "loss_dense_depth"} <= terms
    assert all(0 < v < 1e3 for t, v in live["ray_raydrive_loss"] if t["term"] == "total")
    assert all(0 < v < 0.1 for _, v in live["ray_raydrive_lr"])
    assert {t["scope"] for t, _ in live["ray_raydrive_samples_per_s"]} == {"worker", "global"}
    assert all(v > 0 for _, v in live["ray_raydrive_samples_per_s"] + live["ray_raydrive_step_time_s"])
    assert all(0 <= v <= 1 for _, v in live["ray_raydrive_data_wait_fraction"])
    assert any(t["kind"] == "rss" and v > 50e6 for t, v in live["ray_raydrive_memory_bytes"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_on_the_cluster_it_was_submitted_to(prepared, synth_root, tmp_path, monkeypatch):
    """A real head (`ray start --head` on loopback) and `ray job submit`'s API, as a user would."""
    import os
    import secrets
    import signal
    import subprocess
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    # Ray 2.60 heads require a token: the head and the client share one, as on a real cluster
    token = secrets.token_hex(32)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    gcs, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            "--num-cpus=4",
            "--include-dashboard=true",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = None
        for _ in range(90):
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}", headers={"Authorization": f"Bearer {token}"})
                break
            except Exception:
                time.sleep(1)
        assert client is not None, "the head's job server did not come up"
        entry = " ".join(
            [
                "python -m raydrive.train sparse4d --preset small",
                f"--prepared {prepared}",
                f"--dataroot {synth_root}",
                f"--storage-path {tmp_path}",
                "--name job",
                "--num-workers 2",
                "--batch-size 1",
                "--global-batch 2",
                "--max-steps 2",
                "--no-eval",
                "run.checkpoint_every=2",
                *TINY["sparse4d"],
            ]
        )
        job = client.submit_job(entrypoint=entry, runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})
        deadline = time.time() + 420
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.time() < deadline, "the job did not finish in time"
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "connected to the Ray cluster at" in logs and "started a local Ray" not in logs
        checkpoints = sorted(p for p in (tmp_path / "job").glob("checkpoint_*") if p.is_dir())
        assert checkpoints and (checkpoints[-1] / "model.pt").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray sets their title to ray::RayTrainWorker)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


@pytest.mark.slow
def test_killed_worker_restarts_the_group_from_the_latest_checkpoint(prepared, synth_root, ray_local, tmp_path):
    import os
    import signal
    import threading
    import time

    from raydrive.engine import checkpoint as ckpt

    out = {}
    thread = threading.Thread(
        target=lambda: out.update(
            r=_train(
                prepared,
                synth_root,
                tmp_path,
                "kill",
                "--num-workers",
                "2",
                "--max-steps",
                "12",
                "--max-failures",
                "2",
                "run.checkpoint_every=3",
            )
        )
    )
    thread.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and thread.is_alive():
        snapshot = tmp_path / "kill" / "checkpoint_manager_snapshot.json"
        if snapshot.is_file() and "checkpoint_" in snapshot.read_text():  # Ray has registered a checkpoint
            workers = _train_worker_pids()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    thread.join()
    assert killed is not None, "no worker was killed"
    result, reports, history = out["r"]
    assert result.error is None, result.error
    steps = [m["step"] for m in reports]
    assert steps[-1] == 12 and len(steps) == len(set(steps)), steps  # intended length, no step reported twice
    assert reports[-1]["resumed_from"] in (3, 6, 9), "the restarted group must resume from a checkpoint, not from 0"
    assert sorted(history) == list(range(1, 13))
    assert not list((tmp_path / "kill").rglob("*.partial"))  # nothing half-written
    for d in (p for p in (tmp_path / "kill").glob("checkpoint_*") if p.is_dir()):
        _, state, meta = ckpt.load(d)
        assert state["step"] == meta["step"]
