"""Step timer: step time, data wait, samples/s (one sample = one 6-camera frame, as in DrivingSDK)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StepTimer:
    batch_size: int  # per worker
    world_size: int
    step_times: list[float] = field(default_factory=list)
    data_waits: list[float] = field(default_factory=list)
    _t: float = field(default_factory=time.perf_counter)

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_waits.append(now - self._t)
        self._data_at = now

    def step_done(self) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self._t = now

    def last(self) -> dict:
        step, wait = self.step_times[-1], self.data_waits[-1]
        return {
            "step_time_s": step,
            "data_wait_s": wait,
            "data_wait_fraction": wait / max(step, 1e-9),
            "samples_per_s_worker": self.batch_size / max(step, 1e-9),
            "samples_per_s_global": self.batch_size * self.world_size / max(step, 1e-9),
        }

    def summary(self, skip: int) -> dict:
        """Mean over the steps after the first `skip` (warm-up), DrivingSDK-style FPS."""
        times = self.step_times[skip:] or self.step_times
        mean = sum(times) / max(1, len(times))
        global_batch = self.batch_size * self.world_size
        return {
            "steps_timed": len(times),
            "mean_step_time_s": mean,
            "global_batch": global_batch,
            "fps": global_batch / max(mean, 1e-9),
            "mean_data_wait_s": sum(self.data_waits[skip:] or self.data_waits) / max(1, len(times)),
        }
