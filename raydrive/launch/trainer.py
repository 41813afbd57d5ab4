"""Ray Train's TorchTrainer with raydrive's failure handling.

Two seams of Ray Train V2 (2.60) are used, both in `DataParallelTrainer`: the failure policy it hands
to its controller actor (`_initialize_and_run_controller(failure_policy=...)`) and the SIGINT handler
it installs while `fit()` waits (`_register_sigint_handler`). Ray offers no public switch for either:
`FailureConfig(max_failures)` retries every worker error alike, and its Ctrl-C handler ends the driver
with `sys.exit(0)` from inside a signal handler (the process then exits 1, with no word on resuming).
"""

from __future__ import annotations

import signal
import sys

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy

from raydrive.errors import deterministic


class FailFastPolicy(FailurePolicy):
    """Ray Train's default policy, except that a worker group error caused by a deterministic failure
    (bad data, a NaN loss, a rejected config, a full disk) is raised at once: retrying it would use up
    `max_failures` failing the same way. Pickled into the controller actor."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error) -> FailureDecision:
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any(deterministic(e) for e in failures.values()):
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class RaydriveTrainer(TorchTrainer):
    """A TorchTrainer whose deterministic failures are not retried and whose first Ctrl-C stops the
    run cleanly (`interrupted` tells the driver; a second Ctrl-C interrupts at once)."""

    interrupted = False

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = FailFastPolicy(controller_init_kwargs["failure_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller):
        def stop(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.stderr.write("\n[raydrive] Ctrl-C: stopping the workers (press Ctrl-C again to stop at once)\n")
            sys.stderr.flush()
            controller.abort.remote()  # the controller exits; fit() then raises and the driver reports

        signal.signal(signal.SIGINT, stop)
