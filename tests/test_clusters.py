"""Cluster configurations: launcher YAMLs validate against Ray's own schema; KubeRay manifests are well formed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LAUNCHER = ["ascend-onprem.yaml", "gpu-aws-autoscaling.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_validates_against_rays_schema(name):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)


def test_ascend_onprem_is_a_valid_local_cluster():
    from ray.autoscaler._private.local.config import prepare_local

    cfg = load("ascend-onprem.yaml")
    assert cfg["provider"]["type"] == "local"
    for rejected in ("available_node_types", "head_node", "worker_nodes"):
        assert rejected not in cfg  # the local provider refuses them
    assert cfg["max_workers"] <= len(cfg["provider"]["worker_ips"])
    prepared, _ = prepare_local(json.loads(json.dumps(cfg)))  # what `ray up` does for type: local
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == cfg["max_workers"]
    opts = " ".join(cfg["docker"]["run_options"])
    for dev in ["/dev/davinci0", "/dev/davinci7", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]:
        assert f"--device={dev}" in opts
    assert "/usr/local/Ascend/driver" in opts
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = " ".join(cmds)
        assert '"NPU": 8' in start and "HCCL_IF_IP" in start and "OMP_NUM_THREADS" in start


def test_gpu_config_autoscales_with_a_cpu_data_node_type():
    cfg = load("gpu-aws-autoscaling.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["idle_timeout_minutes"] > 0
    assert (
        types["gpu_worker"]["resources"]["GPU"] > 0
        and types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"]
    )
    assert (
        types["cpu_data_worker"]["labels"] == {"ray-subcluster": "data"}
        and "GPU" not in types["cpu_data_worker"]["resources"]
    )


def _ascend_groups(spec: dict) -> list[dict]:
    return [
        g
        for g in spec["workerGroupSpecs"]
        if any("huawei.com/Ascend910" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])
    ]


@pytest.mark.parametrize("name,kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    if kind == "RayJob":
        assert "python -m raydrive.train sparse4d" in doc["spec"]["entrypoint"]
        assert doc["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = _ascend_groups(spec)
    assert groups, "an Ascend worker group is required"
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for c in g["template"]["spec"]["containers"]:
            npus = c["resources"]["limits"]["huawei.com/Ascend910"]
            # KubeRay does not map huawei.com/Ascend* to Ray's NPU resource: the group must declare it
            assert g["resources"]["NPU"] == npus


def test_grafana_dashboard_charts_every_published_gauge():
    from raydrive.engine.metrics import GAUGES

    dash = json.loads((CLUSTERS / "grafana" / "raydrive-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in GAUGES:
        assert f"ray_{name}" in exprs, name
    assert {v["name"] for v in dash["templating"]["list"]} >= {"run"}
