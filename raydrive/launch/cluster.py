"""Joining the Ray cluster a run is on, or starting a local one."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def local_cluster_address() -> str | None:
    """The address of a cluster started with `ray start` on this machine, if it is alive."""
    marker = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        address = marker.read_text().strip().splitlines()[0]
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError, IndexError):
        return None


def connect_ray() -> None:
    """Join the cluster this runs on (RAY_ADDRESS, which `ray job submit` sets, or a live `ray start`
    cluster on this machine), else start a local Ray with more logical CPUs than cores (on a small
    machine, workers holding whole CPUs would starve Ray Data's tasks)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS") or local_cluster_address()
    if address:
        ray.init(address=address, log_to_driver=True)
        print(f"[raydrive] connected to the Ray cluster at {address}", flush=True)
    else:
        cpus = max(4, 2 * (os.cpu_count() or 1))
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}},
        )
        print(f"[raydrive] started a local Ray instance ({cpus} logical CPUs on {os.cpu_count()} cores)", flush=True)
