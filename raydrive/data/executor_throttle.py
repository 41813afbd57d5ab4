"""Keep Ray Data's executor from spinning inside the training process.

Ray Data's streaming executor runs as a thread in the process that iterates the dataset: here, every
training worker. Its scheduling loop blocks in `ray.wait` (up to 0.1 s) only while map tasks are in
flight. Once enough blocks are produced ahead and backpressure stops new tasks, the loop has nothing
to wait on and runs flat out (resource accounting, Prometheus gauges, issue detectors) until the
trainer takes a block: measured with py-spy on the 2-core embedded default, that thread was busy
about half of the wall time in each worker, so training steps took 2-3x their compute time until
the dataset was fully produced. Sleeping briefly on idle steps costs at most `IDLE_SLEEP_S` of
latency per block, far below a step, and frees that CPU for training and decoding.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_SLEEP_S = 0.02


class IdleThrottle(ExecutionCallback):
    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None) or {}
        if not any(op.num_active_tasks() for op in topology):
            time.sleep(IDLE_SLEEP_S)


def install(ctx) -> None:
    """Register the throttle on a DataContext (once)."""
    if IdleThrottle not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleThrottle)
