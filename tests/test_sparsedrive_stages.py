"""`python -m raydrive.train sparsedrive` end to end: both small stages run in order through the real
driver on a local Ray, stage 2 starts from stage 1's final checkpoint with a fresh planner, and each
stage's evaluation reports its tasks' metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from raydrive.engine import checkpoint as ckpt
from raydrive.launch.train import DONE_FILE


@pytest.mark.slow
def test_both_small_stages_run_in_order(prepared, synth_root, tmp_path):
    argv = ["sparsedrive", "--preset", "small", "--prepared", str(prepared), "--dataroot", str(synth_root)]
    argv += ["--storage-path", str(tmp_path), "--name", "sd", "--max-steps", "2", "--batch-size", "1"]
    argv += ["--global-batch", "2", "run.checkpoint_every=2", "run.evaluate_before=false", "data.cpus_per_task=0.25"]
    proc = subprocess.run([sys.executable, "-m", "raydrive.train", *argv], capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stage1, stage2 = tmp_path / "sd-small_stage1", tmp_path / "sd-small_stage2"
    assert out.index("sparsedrive (small_stage1)") < out.index("sparsedrive (small_stage2)")
    first = ckpt.scan(stage1)[0][-1]
    cfg2 = yaml.safe_load((stage2 / "raydrive_config.yaml").read_text())
    assert cfg2["run"]["load_from"] == str(first), "stage 2 starts from stage 1's final checkpoint"
    assert (
        cfg2["model"]["with_motion_plan"]
        and not yaml.safe_load((stage1 / "raydrive_config.yaml").read_text())["model"]["with_motion_plan"]
    )
    card = json.loads((stage2 / "run_card.json").read_text())
    metrics = card["metrics"]
    assert {"mAP", "NDS", "amota", "map_mAP", "L2_avg", "collision_avg"} <= set(metrics), sorted(metrics)
    assert "L2 1s" in out and "map mAP" in out

    # stage 2 alone from a given stage-1 run folder (its newest complete checkpoint), as from upstream's .pth
    argv[argv.index("sd")] = "sd-again"
    argv += ["--stage", "2", "--load-from", str(stage1)]
    proc = subprocess.run([sys.executable, "-m", "raydrive.train", *argv], capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "sparsedrive (small_stage1)" not in out and not (tmp_path / "sd-again-small_stage1").exists()
    cfg2 = yaml.safe_load((tmp_path / "sd-again-small_stage2" / "raydrive_config.yaml").read_text())
    assert cfg2["run"]["load_from"] == str(first)


@pytest.mark.slow
def test_killed_in_stage_two_resumes_in_stage_two(prepared, synth_root, tmp_path):
    """Ctrl-C once stage 2 has a checkpoint; the same command again skips stage 1 and continues stage 2."""
    argv = ["sparsedrive", "--preset", "small", "--prepared", str(prepared), "--dataroot", str(synth_root)]
    argv += ["--storage-path", str(tmp_path), "--name", "sd", "--max-steps", "6", "--batch-size", "1", "--no-eval"]
    argv += ["--global-batch", "2", "run.checkpoint_every=2", "data.cpus_per_task=0.25"]
    cmd = [sys.executable, "-m", "raydrive.train", *argv]
    stage2 = tmp_path / "sd-small_stage2"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (stage2.is_dir() and ckpt.scan(stage2)[0]):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert (tmp_path / "sd-small_stage1" / DONE_FILE).is_file() and not (stage2 / DONE_FILE).exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out2 = again.stdout + again.stderr
    assert again.returncode == 0, out2[-4000:]
    assert "stage small_stage1 finished before" in out2 and "sparsedrive (small_stage1)" not in out2
    assert "resuming from step" in out2 and (stage2 / DONE_FILE).is_file()
    assert ckpt.checkpoint_step(ckpt.scan(stage2)[0][-1]) == 6
