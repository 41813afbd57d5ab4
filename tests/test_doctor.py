"""`raydrive doctor` tells the truth about this machine: CPU only, gloo, a local Ray."""

from __future__ import annotations

from raydrive.cli import main


def test_doctor_reports_this_machine(ray_local, prepared, tmp_path, capsys):
    assert main(["doctor", "--storage-path", str(tmp_path / "runs"), "--prepared", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert "PASS  ray                2.60.0" in out
    assert "PASS  backend            gloo on cpu (the cluster has no NPU or GPU resources)" in out
    assert "0 NPU, 0 GPU" in out and "local Ray instance" in out
    assert f"{tmp_path / 'runs'} writable" in out and "v1.0-mini, train" in out
    assert "0 fail" in out


def test_doctor_fails_on_unwritable_storage_and_missing_data(ray_local, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["doctor", "--storage-path", str(blocker / "runs"), "--prepared", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  storage" in out and "not writable" in out
    assert "FAIL  prepared data" in out and "run `raydrive prepare" in out
