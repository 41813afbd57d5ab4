"""`raydrive doctor`: what `raydrive train` would find and choose here, as PASS / WARN / FAIL lines.

It reports the Ray version and the cluster it would join, each node's NPU / GPU / CPU, the torch,
torch_npu, CANN and mx_driving versions, the backend that train would choose and why, the HCCL
environment, whether the storage path is writable and shared across nodes, and the prepared data's
manifest. Exit status 1 when any line is a FAIL.
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


def diagnose(storage_path: str | None = None, prepared: str | None = None) -> list[Check]:
    import ray

    from raydrive import accel
    from raydrive.data.synth import default_cache_dir

    checks: list[Check] = []
    version = ray.__version__
    checks.append(
        Check(
            "PASS" if version == "2.60.0" else "WARN",
            "ray",
            f"{version}" + ("" if version == "2.60.0" else " (raydrive is tested with 2.60.0)"),
        )
    )

    if not ray.is_initialized():
        from raydrive.launch.cluster import connect_ray

        connect_ray()
    ctx = ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS")
    checks.append(
        Check(
            "PASS",
            "cluster",
            f"joined {address}"
            if address
            else "local Ray instance (no RAY_ADDRESS): `raydrive train` starts one like it, "
            f"node {ctx.get_node_id()[:8]}",
        )
    )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for n in nodes:
        r = n["Resources"]
        checks.append(
            Check(
                "PASS",
                "node",
                f"{n['NodeManagerAddress']}: {r.get('NPU', 0):g} NPU, {r.get('GPU', 0):g} GPU, {r.get('CPU', 0):g} CPU",
            )
        )

    import torch

    checks.append(
        Check(
            "PASS",
            "torch",
            f"{torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"),
        )
    )
    npu_pkg, mx, cann = _version("torch_npu"), _version("mx-driving") or _version("mx_driving"), _cann_version()
    resources = ray.cluster_resources()
    has_npu = resources.get("NPU", 0) > 0
    for name, value in (("torch_npu", npu_pkg), ("CANN", cann), ("mx_driving", mx)):
        if value:
            checks.append(Check("PASS", name, value))
        else:
            checks.append(
                Check(
                    "FAIL" if has_npu and name != "mx_driving" else "PASS" if not has_npu else "WARN",
                    name,
                    "not installed" + (" (needed on Ascend nodes)" if has_npu else " (not needed without NPUs)"),
                )
            )

    try:
        plan = accel.plan(resources)
        checks.append(
            Check(
                "PASS",
                "backend",
                f"{plan.backend} on {plan.kind} ({plan.reason}); workers ask for "
                f"{plan.resources_per_worker}, precision {plan.precision}",
            )
        )
    except ValueError as e:
        checks.append(Check("FAIL", "backend", str(e)))
        plan = None
    hccl = {k: v for k, v in os.environ.items() if k.startswith("HCCL_")}
    if plan is not None and plan.kind == "npu":
        shown = ", ".join(f"{k}={v}" for k, v in sorted(plan.env.items()) if k.startswith("HCCL_"))
        checks.append(Check("PASS", "hccl env", f"workers get {shown}"))
    else:
        checks.append(Check("PASS", "hccl env", "not used (no NPUs)" + (f"; set here: {sorted(hccl)}" if hccl else "")))

    storage = Path(storage_path or default_cache_dir() / "runs")
    token = uuid.uuid4().hex[:8]
    marker = storage / f".raydrive-doctor-{token}"
    try:
        storage.mkdir(parents=True, exist_ok=True)
        marker.write_text("ok")
        writable = True
    except OSError as e:
        checks.append(Check("FAIL", "storage", f"{storage} is not writable ({e.strerror}); pass --storage-path"))
        writable = False
    if writable:
        if storage_path and str(storage_path).startswith(("s3://", "gs://")):
            checks.append(Check("PASS", "storage", f"{storage_path} (object storage is shared)"))
        elif len(nodes) <= 1:
            checks.append(Check("PASS", "storage", f"{storage} writable (single node: sharing not needed)"))
        else:
            remote = ray.remote(num_cpus=0)(_check_path_on_node)
            seen = ray.get(
                [
                    remote.options(
                        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                            n["NodeID"], soft=False
                        )
                    ).remote(str(storage), token)
                    for n in nodes
                ]
            )
            missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
            checks.append(
                Check("FAIL", "storage", f"{storage} is not shared: nodes {missing} do not see it; use NFS or S3")
                if missing
                else Check("PASS", "storage", f"{storage} writable and seen by all {len(nodes)} nodes")
            )
        marker.unlink(missing_ok=True)

    from raydrive.data.infos import DataError
    from raydrive.data.prepare import load_manifest

    folder = Path(prepared or default_cache_dir() / "prepared")
    try:
        m = load_manifest(folder)
        splits = ", ".join(f"{s} {v['frames']} frames" for s, v in m["splits"].items())
        checks.append(
            Check("PASS", "prepared data", f"{folder}: {m['version']}, {splits}, schema {m['schema_version']}")
        )
    except DataError as e:
        checks.append(Check("WARN" if prepared is None else "FAIL", "prepared data", str(e)))
    return checks


def main(storage_path: str | None = None, prepared: str | None = None) -> int:
    checks = diagnose(storage_path, prepared)
    for c in checks:
        print(c.line())
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    print(f"\n{len(checks) - failed - warned} pass, {warned} warn, {failed} fail")
    return 1 if failed else 0
