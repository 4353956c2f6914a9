"""Time limits of a trial: the whole trial (``trial_timeout_s``) and each evaluation.

The trial runs in a thread of the Ray trial process; the trainable's own thread watches a
:class:`Deadline`. A thread cannot be stopped from outside, so a trial over its limit is
reported as ``timed_out`` and then its process exits: that is what releases its memory,
GPU and CPU slot. Ray Tune starts a fresh worker process for the next trial.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Deadline:
    """The limits of one running trial and the phase it is in."""

    def __init__(self, trial_timeout_s: float | None, evaluation_timeout_s: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.trial_timeout_s = trial_timeout_s
        self.evaluation_timeout_s = evaluation_timeout_s
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._phase: tuple[str, float, float] | None = None  # name, start, limit

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return self.trial_timeout_s is not None or self.evaluation_timeout_s is not None

    @contextmanager
    def evaluation(self, name: str) -> Iterator[None]:
        """Time one evaluation against ``evaluation_timeout_s``."""
        if self.evaluation_timeout_s is None:
            yield
            return
        with self._lock:
            self._phase = (name, self._clock(), self.evaluation_timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._phase = None

    def exceeded(self) -> str | None:
        """What is over its limit, as a message; None while everything is within limits."""
        now = self._clock()
        if self.trial_timeout_s is not None and now - self._started > self.trial_timeout_s:
            return (f"the trial ran for more than trial_timeout_s = {self.trial_timeout_s:g} s "
                    "and was stopped")
        with self._lock:
            phase = self._phase
        if phase is not None and now - phase[1] > phase[2]:
            return (f"evaluation {phase[0]} ran for more than evaluation.timeout_s = "
                    f"{phase[2]:g} s and was stopped")
        return None
