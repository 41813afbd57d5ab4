"""The quiet console: Ray's output goes to the run's ray.log, rank 0's progress and messages reach the
driver through the progress board, and an unexpected worker error still shows its traceback."""

from __future__ import annotations

import dataclasses
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle

from tests.conftest import SPARSE4D_TINY


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_board_carries_rank0_fields_and_messages_to_the_console(ray_local):
    from raydrive.engine.progress import Progress
    from raydrive.launch.console import ProgressConsole

    out = io.StringIO()  # not a terminal: plain lines
    with ProgressConsole("run-a", total=40, stream=out, line_every=3600) as console:
        rank0, rank1 = Progress(console.board, rank=0, interval=0), Progress(console.board, rank=1)
        rank1.message("[raydrive] from rank 1")  # only rank 0 talks to the console
        rank0.message("[raydrive] resumed from step 10")
        rank0.update(step=30, total=40, epoch=2, loss=1.5, samples_per_s=3.25, data_wait=0.04, phase="training")
        rank0.message("[raydrive] after training: val mAP 0.1234")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["[raydrive] resumed from step 10", "[raydrive] after training: val mAP 0.1234"]
    assert "from rank 1" not in out.getvalue()
    assert lines[-1].startswith("[raydrive] run-a step 30/40 (75%) epoch 2 loss 1.500 3.25 samples/s data wait 4%")


def test_progress_bar_on_a_terminal_shows_step_total_and_eta(ray_local):
    from raydrive.engine.progress import Progress
    from raydrive.launch.console import ProgressConsole

    out = FakeTty()
    with ProgressConsole("run-b", total=10, stream=out, poll=0.05) as console:
        p = Progress(console.board, rank=0, interval=0)
        for step in (1, 2, 3):
            p.update(step=step, total=10, epoch=0, loss=2.0 / step, samples_per_s=4.0, data_wait=0.5)
            console.refresh()
    text = out.getvalue()
    assert "run-b" in text and "3/10" in text and "loss 0.667" in text and "data wait 50%" in text
    assert "<" in text  # tqdm's elapsed<remaining: the ETA


def test_ray_output_moves_ray_loggers_and_forwarded_lines_to_the_log_file(tmp_path, capsys):
    from ray._private import worker as ray_worker

    from raydrive.launch.console import RayOutput

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printed = []
    dispatcher.add_handler("ray_print_logs", printed.append)  # what ray.init(log_to_driver=True) installs
    try:
        log = tmp_path / "run" / "ray.log"
        with RayOutput(log) as out:  # a run refused before it starts leaves no file
            logging.getLogger("ray.train").warning("refused")
        assert not log.parent.exists()
        with RayOutput(log) as out:
            out.capture_workers()
            logging.getLogger("ray.train").warning("a Ray warning")
            out.open_log()  # what waited in memory goes first
            dispatcher.emit({"lines": ["worker says hi"], "pid": 7, "ip": "1.2.3.4", "actor_name": "RayTrainWorker"})
        assert printed == []  # nothing reached Ray's console printer
        text = log.read_text()
        assert "(RayTrainWorker pid=7, ip=1.2.3.4) worker says hi" in text and "a Ray warning" in text
        assert "a Ray warning" not in capsys.readouterr().err
        assert [n for n, _ in dispatcher.handlers].count("ray_print_logs") == 1  # restored on exit

        with RayOutput(log, verbose=True) as out:  # --verbose: both
            out.open_log()
            out.capture_workers()
            dispatcher.emit({"lines": ["verbose line"], "pid": 8, "ip": "x"})
        assert printed and printed[-1]["lines"] == ["verbose line"] and "verbose line" in log.read_text()
    finally:
        dispatcher.remove_handler("ray_print_logs")


@pytest.mark.slow
def test_an_unexpected_worker_error_prints_its_traceback(ray_local, prepared, synth_root, tmp_path, capsys):
    import tests.test_seams as seams
    from raydrive.errors import RunFailed
    from raydrive.launch.train import build_parser, resolve_stages, run_stages
    from raydrive.trainers import register, unregister

    class Broken(seams.ToyNet):
        def forward(self, batch):
            raise RuntimeError("boom in forward (a bug, not bad input)")

    spec = dataclasses.replace(seams.TOY, name="broken", build_model=lambda c, a: Broken(c))

    ray.cloudpickle.register_pickle_by_value(seams)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register(spec)
    try:
        argv = ["broken", "--prepared", str(prepared), "--dataroot", str(synth_root), "--storage-path", str(tmp_path)]
        args = build_parser().parse_intermixed_args([*argv, "--name", "broken", "--no-eval"])
        with pytest.raises(RunFailed, match="boom in forward"):
            run_stages(resolve_stages(args))
    finally:
        unregister("broken")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raise RuntimeError" in err and "boom in forward" in err


@pytest.mark.slow
def test_a_run_prints_few_lines_and_ray_output_goes_to_the_run_folder(prepared, synth_root, tmp_path):
    argv = ["sparse4d", "--preset", "small", "--prepared", str(prepared), "--dataroot", str(synth_root)]
    argv += ["--storage-path", str(tmp_path), "--name", "quiet", "--num-workers", "1", "--max-steps", "3"]
    argv += ["--batch-size", "2", "--global-batch", "2", *SPARSE4D_TINY]
    proc = subprocess.run([sys.executable, "-m", "raydrive.train", *argv], capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    lines = [line for line in console.splitlines() if line.strip()]
    assert len(lines) < 40, console
    assert not [line for line in lines if "pid=" in line or "Warning" in line or "WARNING" in line], console
    assert any("step 3/3 (100%)" in line for line in lines), console  # the progress line's last state
    assert any("before training: val mAP" in line for line in lines), console  # rank 0's message
    assert any(line.startswith("[raydrive] checkpoint:") for line in lines), console
    ray_log = (Path(tmp_path) / "quiet" / "ray.log").read_text()
    assert "RayTrainWorker" in ray_log
    assert "[raydrive] quiet step 3/3" in ray_log  # the per-step lines live in the log
