"""What a person sees of a run: TensorBoard scalars, the run card, `raydrive runs`."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from conftest import SPARSE4D_TINY

CARD_FIELDS = {
    "name",
    "model",
    "preset",
    "status",
    "started_at",
    "ended_at",
    "step",
    "total_steps",
    "last_checkpoint",
    "metrics",
    "raydrive_version",
    "git_commit",
    "packages",
    "config_diff",
    "world_size",
    "batch_size_per_worker",
    "accum_steps",
    "accelerators_per_node",
    "seed",
    "manifest_sha256",
}


def _scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_config_diff_names_what_differs_from_the_preset():
    from raydrive.config import apply_overrides, config_diff
    from raydrive.trainers import get_spec

    spec = get_spec("sparse4d")
    assert config_diff(spec.config("small"), spec.config("small")) == {}
    cfg = apply_overrides(spec.config("small"), ["optim.lr=3e-4", "mapper.photometric=true", "optim.lr_mults={a: 0.5}"])
    cfg.run.max_steps = 3
    diff = config_diff(spec.config("small"), cfg)
    assert diff == {
        "run.max_steps": {"preset": None, "value": 3},
        "optim.lr": {"preset": spec.config("small").optim.lr, "value": 3e-4},
        "optim.lr_mults": {"preset": spec.config("small").optim.lr_mults, "value": {"a": 0.5}},
        "mapper.photometric": {"preset": False, "value": True},
    }
    json.dumps(diff)  # goes into run_card.json as it is


def test_tensorboard_rank0_only_and_a_resumed_run_appends(tmp_path):
    from raydrive.engine.tensorboard import TensorBoardLog

    timing = {"samples_per_s_global": 4.0, "step_time_s": 0.5, "data_wait_s": 0.1, "data_wait_fraction": 0.2}
    other = TensorBoardLog(tmp_path / "rank1", rank=1)
    other.step(1, {"a": 1.0}, 1e-3, 1.0, timing)
    other.close()
    assert not (tmp_path / "rank1").exists()

    first = TensorBoardLog(tmp_path / "tb")
    for step in (1, 2, 3):  # the interrupted session got past its last checkpoint (step 2)
        first.step(step, {"a": float(step), "b": 1.0}, 1e-3, 0.5, timing)
    first.close()
    again = TensorBoardLog(tmp_path / "tb", resumed_step=2)
    for step in (3, 4):
        again.step(step, {"a": 10.0 * step, "b": 1.0}, 1e-3, 0.5, timing)
    again.metrics(4, {"mAP": 0.25})
    again.close()
    s = _scalars(tmp_path / "tb")
    assert s["loss/a"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    assert s["loss/total"][4] == 41.0 and s["val/mAP"] == {4: 0.25}
    assert set(s) >= {"train/lr", "train/grad_norm", "perf/samples_per_s", "perf/data_wait_fraction"}


def test_run_card_is_written_atomically_and_listed(tmp_path, capsys):
    from raydrive.cli import main
    from raydrive.launch.runcard import RUN_CARD, read_card, write_card

    card = {"name": "killed", "model": "sparse4d", "preset": "small", "status": "running", "step": None}
    card |= {"total_steps": 10, "started_at": "2025-01-01T00:00:00+00:00", "metrics": {}}
    write_card(tmp_path / "killed", card)
    assert read_card(tmp_path / "killed") == card
    assert [p.name for p in (tmp_path / "killed").iterdir()] == [RUN_CARD]  # no temporary file left
    (tmp_path / "no-card").mkdir()
    assert main(["runs", "--storage-path", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "model", "preset", "status", "step"]
    assert lines[1].split()[:5] == ["killed", "sparse4d", "small", "running", "-/10"]
    assert len(lines) == 3


def _train(prepared, synth_root, storage, name, *extra):
    from raydrive.launch.train import build_parser, resolve_config, run

    argv = ["sparse4d", "--preset", "small", "--prepared", str(prepared), "--dataroot", str(synth_root)]
    argv += ["--storage-path", str(storage), "--name", name, "--num-workers", "1", "--global-batch", "2"]
    argv += ["--batch-size", "2", "--max-steps", "3", "run.max_failures=0", *SPARSE4D_TINY, *extra]
    cfg = resolve_config(build_parser().parse_intermixed_args(argv))
    return run(cfg)


@pytest.mark.slow
def test_run_records_of_a_finished_a_paused_and_a_failed_run(prepared, synth_root, ray_local, tmp_path, capsys):
    import torch

    from raydrive.cli import main

    storage = tmp_path / "runs"
    result = _train(prepared, synth_root, storage, "done", "run.evaluate_before=true")
    assert result.error is None, result.error
    history = {h["step"]: h for _, m in result.best_checkpoints for h in m.get("history", [])}
    assert sorted(history) == [1, 2, 3]

    # (a) TensorBoard: every loss term and the total per step, lr, grad norm, timing; val metrics at 0 and 3
    s = _scalars(storage / "done" / "tensorboard")
    terms = history[3]["losses"]
    assert len(terms) > 1
    for step, h in history.items():
        for term, value in h["losses"].items():
            assert s[f"loss/{term}"][step] == pytest.approx(value, rel=1e-5)
        assert s["loss/total"][step] == pytest.approx(h["loss"], rel=1e-4)
        assert s["train/lr"][step] == pytest.approx(h["lr"], rel=1e-5) and h["lr"] > 0
    assert all(math.isfinite(v) and v >= 0 for v in s["train/grad_norm"].values())
    assert sorted(s["train/grad_norm"]) == [1, 2, 3]
    for tag in ("perf/samples_per_s", "perf/step_time_s"):
        assert sorted(s[tag]) == [1, 2, 3] and all(v > 0 for v in s[tag].values())
    assert all(v >= 0 for v in s["perf/data_wait_s"].values())
    assert all(0 <= v <= 1 for v in s["perf/data_wait_fraction"].values())
    m = result.metrics
    for k in ("mAP", "NDS"):
        assert s[f"val/{k}"] == {0: pytest.approx(m[f"{k}_before"]), 3: pytest.approx(m[k])}

    # (b) the run card
    card = json.loads((storage / "done" / "run_card.json").read_text())
    assert CARD_FIELDS <= set(card)
    assert (card["status"], card["step"], card["total_steps"]) == ("finished", 3, 3)
    assert set(card["metrics"]) == {"mAP", "NDS"} and card["metrics"]["NDS"] == pytest.approx(m["NDS"])
    assert set(card["metrics_before"]) == {"mAP", "NDS"}
    assert Path(card["last_checkpoint"]).is_dir() and card["last_checkpoint"] == result.checkpoint.path
    assert (card["world_size"], card["batch_size_per_worker"], card["accum_steps"], card["seed"]) == (1, 2, 1, 0)
    assert card["config_diff"]["run.max_steps"] == {"preset": None, "value": 3}
    assert card["config_diff"]["model.num_anchor"]["value"] == 48
    assert "run.epochs" not in card["config_diff"]
    assert card["packages"]["ray"] == ray_local.__version__
    assert all(card["packages"][p] for p in ("torch", "ray", "numpy", "nuscenes-devkit"))
    assert card["accelerators_per_node"] and card["accelerators_per_node"][0]["CPU"] == 4
    assert card["manifest_sha256"] == hashlib.sha256((prepared / "manifest.json").read_bytes()).hexdigest()
    start, end = (datetime.datetime.fromisoformat(card[k]) for k in ("started_at", "ended_at"))
    assert start <= end
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    import raydrive

    if Path(raydrive.__file__).resolve().is_relative_to(Path(__file__).resolve().parents[1]) and head.returncode == 0:
        assert card["git_commit"] == head.stdout.strip()  # an editable install in this checkout
    else:
        assert card["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", card["git_commit"])

    # a paused run and a failed one (weights that do not fit the model: the worker raises)
    paused = _train(prepared, synth_root, storage, "paused", "run.stop_at_step=1", "--no-eval")
    assert paused.error is None
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"not.a.parameter": torch.zeros(1)}}, bad)
    with pytest.raises(Exception, match="does not fit"):  # Ray Train raises once max_failures=0 is used up
        _train(prepared, synth_root, storage, "failed", "--load-from", str(bad), "--no-eval")
    card = json.loads((storage / "failed" / "run_card.json").read_text())
    assert card["status"] == "failed" and "does not fit" in card["error"] and card["ended_at"]

    # (c) `raydrive runs`
    capsys.readouterr()
    assert main(["runs", "--storage-path", str(storage)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert rows["done"][1:5] == ["sparse4d", "small", "finished", "3/3"]
    assert rows["done"][5].startswith("done/checkpoint_") and "mAP" in rows["done"] and "NDS" in rows["done"]
    assert rows["paused"][3:5] == ["paused", "1/3"] and rows["paused"][5].startswith("paused/checkpoint_")
    assert rows["failed"][3] == "failed" and rows["failed"][4] == "-/3"
