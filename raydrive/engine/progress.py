"""Rank 0's channel to the driver's console.

The driver hands the workers a handle to its progress board (an actor, `raydrive/launch/console.py`)
in the train loop config. Rank 0 sends the newest step figures (at most every `interval` seconds,
fire-and-forget, so a slow console never slows training) and the messages meant for a person.
Every message is also written to the worker's stdout, which Ray forwards to the run's `ray.log`.
Without a board (a test calling the train loop itself) messages only go to stdout.
"""

from __future__ import annotations

import sys
import time


def _stdout(message: str) -> None:
    # not print(): Ray Train V2 patches print into its logger as well, which would log every line twice
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class Progress:
    def __init__(self, board=None, rank: int = 0, interval: float = 0.5):
        self.board = board if rank == 0 else None
        self.interval = interval
        self._last = 0.0

    def update(self, force: bool = False, **fields) -> None:
        """Newest figures (step, total, epoch, loss, samples_per_s, data_wait, phase)."""
        now = time.monotonic()
        if self.board is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        try:
            self.board.update.remote(fields)
        except Exception:  # noqa: BLE001 (a gone driver: training goes on; its result is what counts)
            self.board = None

    def message(self, text: str) -> None:
        """A line for the person at the console (and the log)."""
        _stdout(text)
        if self.board is not None:
            try:
                self.board.message.remote(text)
            except Exception:  # noqa: BLE001
                self.board = None

    def log(self, text: str) -> None:
        """A line for the log only (per-step figures, which the bar shows on the console)."""
        _stdout(text)
