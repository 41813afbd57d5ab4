"""The accelerator layer's choices for NPU, CUDA and CPU clusters (detection inputs, no devices needed)."""

from __future__ import annotations

import pytest

from raydrive.accel import ASCEND_ENV_DEFAULTS, plan

NPU_CLUSTER = {"CPU": 192.0, "NPU": 16.0, "memory": 1e12}
GPU_CLUSTER = {"CPU": 96.0, "GPU": 8.0}
CPU_CLUSTER = {"CPU": 4.0}


def test_npu_cluster_gets_hccl_npu_resources_and_ascend_env():
    p = plan(NPU_CLUSTER, environ={})
    assert (p.kind, p.backend, p.use_gpu, p.precision) == ("npu", "hccl", False, "fp16")
    assert p.resources_per_worker["NPU"] == 1 and p.resources_per_worker["CPU"] > 1  # NPU alone reserves no CPU
    for key, value in ASCEND_ENV_DEFAULTS.items():
        assert p.env[key] == value
    assert int(p.env["HCCL_EXEC_TIMEOUT"]) % 68 == 0 and 120 <= int(p.env["HCCL_CONNECT_TIMEOUT"]) <= 7200
    assert p.env["OMP_NUM_THREADS"] == str(int(p.resources_per_worker["CPU"]))
    assert "NPU" in p.reason


def test_ascend_env_is_overridable_from_environment_and_flags():
    p = plan(NPU_CLUSTER, environ={"HCCL_CONNECT_TIMEOUT": "3600"}, env_overrides={"TASK_QUEUE_ENABLE": "1"})
    assert p.env["HCCL_CONNECT_TIMEOUT"] == "3600" and p.env["TASK_QUEUE_ENABLE"] == "1"


def test_gpu_cluster_gets_nccl_and_use_gpu():
    p = plan(GPU_CLUSTER)
    assert (p.kind, p.backend, p.use_gpu, p.precision) == ("cuda", "nccl", True, "fp16")
    assert p.resources_per_worker["GPU"] == 1 and p.env == {}


def test_cpu_cluster_gets_gloo_fp32_and_fractional_cpus():
    p = plan(CPU_CLUSTER)
    assert (p.kind, p.backend, p.use_gpu, p.precision) == ("cpu", "gloo", False, "fp32")
    assert p.resources_per_worker == {"CPU": 0.5} and p.amp_dtype is None  # leaves CPUs to Ray Data's tasks
    assert plan(CPU_CLUSTER, cpus_per_worker=2).resources_per_worker == {"CPU": 2.0}


def test_forcing_choices_and_clear_errors():
    assert plan(GPU_CLUSTER, accelerator="cpu").backend == "gloo"
    assert plan(GPU_CLUSTER, backend="gloo").backend == "gloo"
    assert plan(CPU_CLUSTER, precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="no NPU resources"):
        plan(CPU_CLUSTER, accelerator="npu")
    with pytest.raises(ValueError, match="hccl backend needs Ascend"):
        plan(GPU_CLUSTER, backend="hccl")
    with pytest.raises(ValueError, match="--precision"):
        plan(CPU_CLUSTER, precision="fp8")
