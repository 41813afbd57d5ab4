"""Training end to end through the real driver and Ray Train on a local Ray (slow tests, few)."""
from __future__ import annotations

import pytest

from raydrive.train import build_parser, resolve_config, run

TINY = ["model.num_anchor=48", "model.num_temp_instances=24", "model.num_learnable_pts=2", "model.num_dn_groups=1",
        "model.decode_top_k=48", "data.cpus_per_task=0.25", "run.log_every=1"]  # fmt: skip


def train(prepared, synth_root, storage, name, *extra):
    argv = ["sparse4d", "--preset", "small", "--prepared", str(prepared), "--dataroot", str(synth_root),
            "--storage-path", str(storage), "--name", name, "--batch-size", "1", "--no-eval", "--max-steps", "6",
            "run.checkpoint_every=2", "run.keep_checkpoints=10", *TINY, *extra]  # fmt: skip
    cfg = resolve_config(build_parser().parse_intermixed_args(argv))
    result = run(cfg)
    assert result.error is None, result.error
    reports = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["step"])
    history = {h["step"]: h for m in reports for h in m.get("history", [])}
    return result, reports, history


@pytest.mark.slow
def test_data_parallel_training_and_exact_resume(prepared, synth_root, ray_local, tmp_path):
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

    # one worker alone sees one shard per step: its parameters end elsewhere
    _, reports_c, _ = train(prepared, synth_root, tmp_path, "c", "--num-workers", "1")
    assert reports_c[-1]["param_checksum"] != pytest.approx(reports_a[-1]["param_checksum"], rel=1e-6)


@pytest.mark.slow
def test_embedded_default_learns(ray_local, tmp_path, monkeypatch):
    """The README's first command (`python -m raydrive.train sparse4d`), on a fresh cache: the same
    run scores the untrained and the trained model on the synthetic val split."""
    monkeypatch.setenv("RAYDRIVE_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(build_parser().parse_intermixed_args(["sparse4d"]))
    from raydrive.train import resolve_data

    resolve_data(cfg)
    assert (cfg.run.num_workers, cfg.preset) == (2, "small")
    result = run(cfg)
    assert result.error is None, result.error
    m = result.metrics
    assert m["mAP_before"] < 0.002
    assert m["mAP"] > max(5 * m["mAP_before"], m["mAP_before"] + 0.005), (m["mAP_before"], m["mAP"])
    assert m["NDS"] > m["NDS_before"] + 0.02
    assert result.checkpoint is not None
