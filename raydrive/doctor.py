"""`raydrive doctor`: what `raydrive train` would find and choose here, as PASS / WARN / FAIL lines.

It reports the Ray version and the cluster it would join, each node's NPU / GPU / CPU, the torch,
torch_npu, CANN and mx_driving versions, the backend that train would choose and why, the HCCL
environment, whether the storage path is writable and shared across nodes, and the prepared data
against its manifest (every file's sha256). Exit status 1 when any line is a FAIL. It never waits on
a dead cluster (RAY_ADDRESS must answer within seconds) and never ends in a traceback: a section that
raises is a FAIL line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    status: str  # PASS | WARN | FAIL
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.what:<18} {self.detail}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cann_version() -> str | None:
    home = os.environ.get("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
    for name in ("version.cfg", "version.info"):
        f = Path(home) / name
        if f.is_file():
            for line in f.read_text().splitlines():
                if "version" in line.lower() and "=" in line:
                    return line.split("=", 1)[1].strip()
    return None


def _check_path_on_node(path: str, token: str) -> bool:
    return (Path(path) / f".raydrive-doctor-{token}").is_file()


def _guarded(what: str, section, *args) -> list[Check]:
    """A section's checks; whatever it raises becomes a FAIL line instead of a traceback."""
    try:
        return section(*args)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        return [Check("FAIL", what, f"{type(e).__name__}: {first}")]


def _ray_version() -> list[Check]:
    import ray

    version = ray.__version__
    tested = version == "2.60.0"
    return [
        Check("PASS" if tested else "WARN", "ray", version + ("" if tested else " (raydrive is tested with 2.60.0)"))
    ]


def _cluster() -> list[Check]:
    """The cluster train would join (RAY_ADDRESS must answer within seconds) and its live nodes."""
    import ray

    from raydrive.config import ConfigError
    from raydrive.launch.cluster import connect_ray

    if not ray.is_initialized():
        try:
            connect_ray()
        except ConfigError as e:
            return [Check("FAIL", "cluster", str(e))]
    ctx = ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS")
    joined = (
        f"joined {address}"
        if address
        else f"local Ray instance (no RAY_ADDRESS): `raydrive train` starts one like it, node {ctx.get_node_id()[:8]}"
    )
    checks = [Check("PASS", "cluster", joined)]
    for n in (n for n in ray.nodes() if n.get("Alive")):
        r = n["Resources"]
        detail = f"{n['NodeManagerAddress']}: {r.get('NPU', 0):g} NPU, {r.get('GPU', 0):g} GPU, {r.get('CPU', 0):g} CPU"
        checks.append(Check("PASS", "node", detail))
    return checks


def _software(resources: dict) -> list[Check]:
    import torch

    build = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
    checks = [Check("PASS", "torch", f"{torch.__version__}{build}")]
    npu_pkg, mx, cann = _version("torch_npu"), _version("mx-driving") or _version("mx_driving"), _cann_version()
    has_npu = resources.get("NPU", 0) > 0
    for name, value in (("torch_npu", npu_pkg), ("CANN", cann), ("mx_driving", mx)):
        if value:
            checks.append(Check("PASS", name, value))
            continue
        status = "FAIL" if has_npu and name != "mx_driving" else "PASS" if not has_npu else "WARN"
        checks.append(
            Check(
                status,
                name,
                "not installed" + (" (needed on Ascend nodes)" if has_npu else " (not needed without NPUs)"),
            )
        )
    return checks


def _backend(resources: dict) -> list[Check]:
    from raydrive import accel

    try:
        plan = accel.plan(resources)
    except ValueError as e:
        return [Check("FAIL", "backend", str(e))]
    detail = f"{plan.backend} on {plan.kind} ({plan.reason}); workers ask for {plan.resources_per_worker}, precision"
    checks = [Check("PASS", "backend", f"{detail} {plan.precision}")]
    hccl = {k: v for k, v in os.environ.items() if k.startswith("HCCL_")}
    if plan.kind == "npu":
        shown = ", ".join(f"{k}={v}" for k, v in sorted(plan.env.items()) if k.startswith("HCCL_"))
        checks.append(Check("PASS", "hccl env", f"workers get {shown}"))
    else:
        checks.append(Check("PASS", "hccl env", "not used (no NPUs)" + (f"; set here: {sorted(hccl)}" if hccl else "")))
    return checks


def _storage(storage_path: str | None, nodes: list[dict]) -> list[Check]:
    """Writable here, and (on several nodes) seen by every node."""
    import ray

    from raydrive.data.synth import default_cache_dir

    if storage_path and str(storage_path).startswith(("s3://", "gs://")):
        return [Check("PASS", "storage", f"{storage_path} (object storage is shared)")]
    storage = Path(storage_path or default_cache_dir() / "runs")
    token = uuid.uuid4().hex[:8]
    marker = storage / f".raydrive-doctor-{token}"
    try:
        storage.mkdir(parents=True, exist_ok=True)
        marker.write_text("ok")
    except OSError as e:
        return [Check("FAIL", "storage", f"{storage} is not writable ({e.strerror or e}); pass --storage-path")]
    try:
        if len(nodes) <= 1:
            return [Check("PASS", "storage", f"{storage} writable (single node: sharing not needed)")]
        remote = ray.remote(num_cpus=0)(_check_path_on_node)
        affinity = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
        refs = [
            remote.options(scheduling_strategy=affinity(n["NodeID"], soft=False)).remote(str(storage), token)
            for n in nodes
        ]
        seen = ray.get(refs, timeout=60)
        missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
        if missing:
            return [Check("FAIL", "storage", f"{storage} is not shared: nodes {missing} do not see it; use NFS or S3")]
        return [Check("PASS", "storage", f"{storage} writable and seen by all {len(nodes)} nodes")]
    finally:
        marker.unlink(missing_ok=True)


def _prepared(prepared: str | None) -> list[Check]:
    """The prepared folder against its manifest, every file's sha256 included."""
    from raydrive.data.infos import DataError
    from raydrive.data.prepare import verify_prepared
    from raydrive.data.synth import default_cache_dir

    folder = Path(prepared or default_cache_dir() / "prepared")
    try:
        m = verify_prepared(folder, full=True)
    except DataError as e:
        return [Check("WARN" if prepared is None else "FAIL", "prepared data", str(e))]
    splits = ", ".join(f"{s} {v['frames']} frames" for s, v in m["splits"].items())
    detail = f"{folder}: {m['version']}, {splits}, schema {m['schema_version']}, every file matches its sha256"
    return [Check("PASS", "prepared data", detail)]


def diagnose(storage_path: str | None = None, prepared: str | None = None) -> list[Check]:
    """Every check; none raises or waits on a dead cluster (a failing section is one FAIL line)."""
    import ray

    checks = _guarded("ray", _ray_version)
    checks += _guarded("cluster", _cluster)
    connected = ray.is_initialized()
    resources = _guarded_value(ray.cluster_resources, {}) if connected else {}
    nodes = _guarded_value(lambda: [n for n in ray.nodes() if n.get("Alive")], []) if connected else []
    checks += _guarded("torch", _software, resources)
    checks += _guarded("backend", _backend, resources) if connected else []
    checks += _guarded("storage", _storage, storage_path, nodes)
    checks += _guarded("prepared data", _prepared, prepared)
    return checks


def _guarded_value(fn, default):
    try:
        return fn()
    except Exception:
        return default


def main(storage_path: str | None = None, prepared: str | None = None) -> int:
    checks = diagnose(storage_path, prepared)
    for c in checks:
        print(c.line())
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    print(f"\n{len(checks) - failed - warned} pass, {warned} warn, {failed} fail")
    return 1 if failed else 0
