"""Stopping a run cleanly: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) are recorded, and
the loop saves a checkpoint and returns at the next step boundary instead of dying mid-step."""

from __future__ import annotations

import signal
import threading

import numpy as np
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager: inside it, the stop signals set `signal_number` instead of ending the
    process (a second Ctrl-C still interrupts at once); the previous handlers come back on exit.
    Handlers can only be set from the main thread: elsewhere the signals keep their handlers."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def _record(self, signum, frame):
        if self.signal_number == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, process_count: int) -> int | None:
        """The signal any process received (all processes must stop at the same step: this is a
        collective call when there are several)."""
        if process_count == 1:
            return self.signal_number
        received = multihost_utils.process_allgather(np.int32(self.signal_number or 0))
        return int(received.max()) or None
