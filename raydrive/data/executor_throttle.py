"""Keep Ray Data's executor from spinning inside the training process.

Ray Data's streaming executor runs as a thread in the process that iterates the dataset: here, every
training worker. Its scheduling loop blocks in `ray.wait` (up to 0.1 s) only while map tasks are in
flight. Once enough blocks are produced ahead and backpressure stops new tasks, the loop has nothing
to wait on and runs flat out (resource accounting, Prometheus gauges, issue detectors) until the
trainer takes a block: measured with py-spy on the 2-core embedded default, that thread was busy
about half of the wall time in each worker, so training steps took 2-3x their compute time until
the dataset was fully produced. Finished tasks whose outputs wait for the trainer still count as
in flight, and `ray.wait` returns at once for them, so "no task in flight" is not a reliable sign of
an idle step: the loop is instead held to at most one step per `MIN_STEP_S`. A completed block then
waits at most that long to be collected, far below a training step, and the CPU goes to training
and decoding.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

MIN_STEP_S = 0.025


class IdleThrottle(ExecutionCallback):
    def __init__(self):
        self._last = 0.0

    def on_execution_step(self, executor) -> None:
        wait = self._last + MIN_STEP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last = time.monotonic()


def install(ctx) -> None:
    """Register the throttle on a DataContext (once)."""
    if IdleThrottle not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleThrottle)
