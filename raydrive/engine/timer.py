"""Step timer: step time, data wait, samples/s (one sample = one 6-camera frame, as in DrivingSDK)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StepTimer:
    samples_per_step: int  # per worker: batch size x accumulation steps
    world_size: int
    step_times: list[float] = field(default_factory=list)
    data_waits: list[float] = field(default_factory=list)
    _t: float = field(default_factory=time.perf_counter)
    _wait: float = 0.0

    def data_wait(self, seconds: float) -> None:
        """Time this step spent waiting for batches (all its micro-batches)."""
        self._wait += seconds

    def step_done(self) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self.data_waits.append(self._wait)
        self._t, self._wait = now, 0.0

    def last(self) -> dict:
        step, wait = self.step_times[-1], self.data_waits[-1]
        per_s = self.samples_per_step / max(step, 1e-9)
        return {
            "step_time_s": step,
            "data_wait_s": wait,
            "data_wait_fraction": wait / max(step, 1e-9),
            "samples_per_s_worker": per_s,
            "samples_per_s_global": per_s * self.world_size,
        }

    def summary(self, skip: int) -> dict:
        """Mean over the steps after the first `skip` (warm-up), DrivingSDK-style FPS."""
        times = self.step_times[skip:] or self.step_times
        mean = sum(times) / max(1, len(times))
        global_batch = self.samples_per_step * self.world_size
        return {
            "steps_timed": len(times),
            "mean_step_time_s": mean,
            "global_batch": global_batch,
            "fps": global_batch / max(mean, 1e-9),
            "mean_data_wait_s": sum(self.data_waits[skip:] or self.data_waits) / max(1, len(times)),
        }
