"""Live training figures on the Ray dashboard (Metrics tab / Grafana) through `ray.util.metrics`.

`ray.train.report` metrics never reach Prometheus, so every worker also sets gauges, exported by its
node's metrics agent with Ray's `ray_` prefix:

    ray_raydrive_loss{run, rank, term}           total ("total") and each loss term
    ray_raydrive_lr{run, rank}                   learning rate of the base group
    ray_raydrive_samples_per_s{run, rank, scope} scope = worker | global (one sample = one 6-camera frame)
    ray_raydrive_step_time_s{run, rank}
    ray_raydrive_data_wait_s{run, rank}
    ray_raydrive_data_wait_fraction{run, rank}
    ray_raydrive_memory_bytes{run, rank, kind}   kind = rss | device
    ray_raydrive_step{run, rank}
"""

from __future__ import annotations

import os

GAUGES = {
    "raydrive_loss": ("training loss (total and per term)", ("run", "rank", "term")),
    "raydrive_lr": ("learning rate", ("run", "rank")),
    "raydrive_samples_per_s": ("samples per second, per worker and global", ("run", "rank", "scope")),
    "raydrive_step_time_s": ("seconds per training step", ("run", "rank")),
    "raydrive_data_wait_s": ("seconds per step spent waiting for data", ("run", "rank")),
    "raydrive_data_wait_fraction": ("share of the step spent waiting for data", ("run", "rank")),
    "raydrive_memory_bytes": ("process RSS and accelerator memory", ("run", "rank", "kind")),
    "raydrive_step": ("optimizer steps done", ("run", "rank")),
}


def _rss_bytes() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0.0


class LiveMetrics:
    def __init__(self, run: str, rank: int):
        from ray.util.metrics import Gauge

        self.tags = {"run": run, "rank": str(rank)}
        self.gauges = {name: Gauge(name, description=desc, tag_keys=keys) for name, (desc, keys) in GAUGES.items()}

    def publish(self, step: int, losses: dict[str, float], lr: float, timing: dict, device=None) -> None:
        g, t = self.gauges, self.tags
        g["raydrive_loss"].set(sum(losses.values()), tags={**t, "term": "total"})
        for term, value in losses.items():
            g["raydrive_loss"].set(value, tags={**t, "term": term})
        g["raydrive_lr"].set(lr, tags=t)
        g["raydrive_samples_per_s"].set(timing["samples_per_s_worker"], tags={**t, "scope": "worker"})
        g["raydrive_samples_per_s"].set(timing["samples_per_s_global"], tags={**t, "scope": "global"})
        g["raydrive_step_time_s"].set(timing["step_time_s"], tags=t)
        g["raydrive_data_wait_s"].set(timing["data_wait_s"], tags=t)
        g["raydrive_data_wait_fraction"].set(timing["data_wait_fraction"], tags=t)
        g["raydrive_memory_bytes"].set(_rss_bytes(), tags={**t, "kind": "rss"})
        if device is not None and device.type in ("cuda", "npu"):
            import torch

            mod = getattr(torch, device.type)
            g["raydrive_memory_bytes"].set(float(mod.memory_allocated(device)), tags={**t, "kind": "device"})
        g["raydrive_step"].set(step, tags=t)
