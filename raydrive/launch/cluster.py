"""Joining the Ray cluster a run is on, or starting a local one."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from raydrive.config import ConfigError

PROBE_TIMEOUT_S = 3.0  # a cluster that does not accept a connection by then is reported, not waited for
_OWNED = {"ray": False}  # whether connect_ray connected this process (then its driver may shut Ray down)


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


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError unless something accepts connections at `address` within `timeout`, so that
    a dead RAY_ADDRESS is one line instead of `ray.init` waiting on it."""
    target = _host_port(address)
    if target is None:
        raise ConfigError(
            f"RAY_ADDRESS={address} is not an address of a Ray cluster; use HOST:PORT of its head (e.g. "
            f"10.0.0.1:6379) or ray://HOST:10001, or unset RAY_ADDRESS to start a local Ray"
        )
    try:
        with socket.create_connection(target, timeout=timeout):
            return
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there within {timeout:g} s ({reason}); start it "
            f"(`ray start --head`), correct RAY_ADDRESS, or unset it to start a local Ray"
        ) from None


def cluster_address() -> str | None:
    """The cluster to join: RAY_ADDRESS (checked to answer), or a live `ray start` cluster here; None:
    start a local one."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address == "local":
        return None
    if address == "auto":
        found = local_cluster_address()
        if found is None:
            raise ConfigError(
                "RAY_ADDRESS=auto but no Ray cluster runs on this machine; start one (`ray start --head`) or "
                "unset RAY_ADDRESS to start a local Ray"
            )
        return found
    if address:
        check_address(address)
        return address
    return local_cluster_address()


def disconnect_ray() -> None:
    """Shut down the Ray connection that `connect_ray` made (not one its caller made before)."""
    import ray

    if _OWNED["ray"] and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # a broken connection must not hide the caller's message
            pass
    _OWNED["ray"] = False


def local_cpus() -> int:
    """Logical CPUs of a local Ray: more than cores, since on a small machine workers holding whole
    CPUs would starve Ray Data's tasks."""
    return max(4, 2 * (os.cpu_count() or 1))


def connect_ray() -> None:
    """Join the cluster this runs on (RAY_ADDRESS, which `ray job submit` sets, or a live `ray start`
    cluster on this machine), else start a local Ray with `local_cpus()` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = cluster_address()
    _OWNED["ray"] = True
    if address:
        ray.init(address=address, log_to_driver=True)
        print(f"[raydrive] connected to the Ray cluster at {address}", flush=True)
    else:
        cpus = local_cpus()
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}},
        )
        print(f"[raydrive] started a local Ray instance ({cpus} logical CPUs on {os.cpu_count()} cores)", flush=True)
