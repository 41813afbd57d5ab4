"""Accelerator detection and set-up: Ascend NPU | CUDA | CPU -> process-group backend hccl | nccl | gloo.

Ray Train's TorchTrainer picks nccl only with `use_gpu` and gloo otherwise, so an NPU cluster would
silently get gloo: raydrive always passes `TorchConfig(backend=...)` from here. On Ascend, workers ask
for {"NPU": 1, "CPU": k} (NPU alone reserves no CPU and Ray then forces OMP_NUM_THREADS=1), call
`torch.npu.set_device` themselves (Ray does that only for CUDA), and get HCCL settings through the
runtime env. See shared/specs/ray.md for the Ray facts behind each choice.

Detection happens twice: on the driver from the cluster's resources (what to ask Ray for) and on each
worker from torch (which device this process drives). Every choice can be forced.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

KINDS = ("npu", "cuda", "cpu")
BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
RESOURCE = {"npu": "NPU", "cuda": "GPU"}
# fp16 on accelerators as upstream (mmcv fp16 / native AMP); fp32 on CPU, where autocast buys little.
DEFAULT_PRECISION = {"npu": "fp16", "cuda": "fp16", "cpu": "fp32"}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# DrivingSDK's Ascend launch environment (model_examples/Sparse4D/test/*.sh), plus HCCL time-outs:
# HCCL_CONNECT_TIMEOUT allows 120..7200 s; HCCL_EXEC_TIMEOUT is rounded down to a multiple of 68.
ASCEND_ENV_DEFAULTS = {
    "HCCL_CONNECT_TIMEOUT": "1800",
    "HCCL_EXEC_TIMEOUT": "1836",
    "TASK_QUEUE_ENABLE": "2",
    "CPU_AFFINITY_CONF": "1",
    "HCCL_WHITELIST_DISABLE": "1",
    "HCCL_OP_BASE_FFTS_MODE_ENABLE": "TRUE",
    "MULTI_STREAM_MEMORY_REUSE": "1",
}


@dataclass(frozen=True)
class AccelPlan:
    """What the driver asks Ray Train for."""

    kind: str
    backend: str
    resources_per_worker: dict[str, float]
    use_gpu: bool
    precision: str
    env: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


def torch_npu_available() -> bool:
    """torch_npu importable (never imported here: on a machine without CANN that breaks torch)."""
    return importlib.util.find_spec("torch_npu") is not None


def plan(
    cluster_resources: dict[str, float],
    *,
    accelerator: str = "auto",
    backend: str | None = None,
    precision: str = "auto",
    cpus_per_worker: float | None = None,
    env_overrides: dict[str, str] | None = None,
    environ: dict[str, str] | None = None,
) -> AccelPlan:
    """Choose the accelerator kind, backend, worker resources, precision and runtime env.

    `cluster_resources` is `ray.cluster_resources()`. `accelerator`, `backend`, `precision` and
    `cpus_per_worker` force a choice; `env_overrides` win over the defaults and over `environ`.
    """
    if accelerator not in ("auto", *KINDS):
        raise ValueError(f"--accelerator must be auto, npu, cuda or cpu, got {accelerator!r}")
    if accelerator == "auto":
        if cluster_resources.get("NPU", 0) > 0:
            kind, reason = "npu", f"the cluster has {cluster_resources['NPU']:g} NPU"
        elif cluster_resources.get("GPU", 0) > 0:
            kind, reason = "cuda", f"the cluster has {cluster_resources['GPU']:g} GPU"
        else:
            kind, reason = "cpu", "the cluster has no NPU or GPU resources"
    else:
        kind, reason = accelerator, f"forced with --accelerator {accelerator}"
        if kind != "cpu" and cluster_resources.get(RESOURCE[kind], 0) <= 0:
            raise ValueError(
                f"--accelerator {kind} but the cluster has no {RESOURCE[kind]} resources: {cluster_resources}"
            )
    chosen_backend = backend or BACKEND[kind]
    if chosen_backend not in ("hccl", "nccl", "gloo"):
        raise ValueError(f"--backend must be hccl, nccl or gloo, got {chosen_backend!r}")
    if chosen_backend == "hccl" and kind != "npu":
        raise ValueError("the hccl backend needs Ascend NPUs (torch_npu); this run would use " + kind)
    prec = DEFAULT_PRECISION[kind] if precision == "auto" else precision
    if prec not in PRECISIONS:
        raise ValueError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if cpus_per_worker is None:
        # accelerator nodes: a share of the node's CPUs for data work; CPU-only: half a logical CPU, so
        # that Ray Data's decode tasks still get CPUs on a small machine (whole CPUs deadlock there)
        cpus_per_worker = 8.0 if kind != "cpu" else 0.5
    resources = {"CPU": float(cpus_per_worker)}
    if kind != "cpu":
        resources[RESOURCE[kind]] = 1.0
    env: dict[str, str] = {}
    if kind == "npu":
        environ = os.environ if environ is None else environ
        env = {k: environ.get(k, v) for k, v in ASCEND_ENV_DEFAULTS.items()}
        env["OMP_NUM_THREADS"] = environ.get("OMP_NUM_THREADS", str(max(1, int(cpus_per_worker))))
    env.update(env_overrides or {})
    return AccelPlan(kind, chosen_backend, resources, kind == "cuda", prec, env, reason)


def worker_device(kind: str) -> torch.device:
    """Inside a Ray Train worker: bind this process to its device and return it."""
    import ray.train.torch

    if kind == "npu":
        import torch_npu  # noqa: F401 (registers the npu device with torch)

        device = ray.train.torch.get_device()
        torch.npu.set_device(device)  # Ray sets the device only for CUDA
        return device
    if kind == "cuda":
        return ray.train.torch.get_device()
    return torch.device("cpu")


def local_kind() -> str:
    """What this process could drive, from torch alone (used by `raydrive doctor` and evaluation)."""
    if torch_npu_available():
        try:
            import torch_npu  # noqa: F401

            if torch.npu.is_available():
                return "npu"
        except Exception:  # a broken CANN install: fall through to the other kinds
            pass
    return "cuda" if torch.cuda.is_available() else "cpu"
