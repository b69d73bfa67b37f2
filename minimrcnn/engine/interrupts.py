"""Ctrl-C and SIGTERM during training: finish the iteration, checkpoint, say how to continue.

Clusters preempt a job with SIGTERM (and SIGKILL a little later); a user stops one with
Ctrl-C (SIGINT). Either only sets a flag here: the training loop finishes the iteration it
is in, writes ``last.pth`` at that iteration (atomically, like every checkpoint) and raises
:class:`TrainingInterrupted`, which the command line turns into one line and exit status
128 + the signal number. A second Ctrl-C stops at once (Python's usual KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped by a signal after checkpointing iteration ``iteration``."""

    def __init__(self, iteration: int, signal_number: int):
        super().__init__(f"interrupted at iteration {iteration}; continue with --resume")
        self.iteration = iteration
        self.signal_number = signal_number

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number  # the shell's convention for "killed by signal N"


class StopRequests:
    """Context manager: while active, SIGINT and SIGTERM set ``signal_number`` instead of stopping.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker
    thread) this does nothing and the signals keep their usual effect.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number, frame):
        if self.signal_number == signal.SIGINT and signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_number = signal_number

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False


__all__ = ["StopRequests", "TrainingInterrupted"]
