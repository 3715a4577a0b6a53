"""Circuit breakers, retry backoff and the overload refusal: the parts that keep a request from being stranded.

The wait for a free replica slot itself is service/admission.py."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``open_s`` lets one probe through
    (half-open); the probe's success closes it, its failure opens it again."""

    __slots__ = ("failure_threshold", "open_s", "state", "failures", "opened_at", "probing", "_on_change", "_clock")

    def __init__(
        self,
        failure_threshold: int = 5,
        open_s: float = 10.0,
        on_change: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        self._on_change = on_change
        self._clock = clock

    def available(self) -> bool:
        """Whether a request may be sent now (does not claim the half-open probe)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock() - self.opened_at >= self.open_s
        return not self.probing

    def begin(self) -> None:
        """A request is being sent; in open/half-open state it is the probe."""
        if self.state != CLOSED:
            self._set(HALF_OPEN)
            self.probing = True

    def success(self) -> None:
        self.failures = 0
        self.probing = False
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self.probing = False
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.opened_at = self._clock()
            self._set(OPEN)

    def _set(self, state: int) -> None:
        if state != self.state:
            self.state = state
            if self._on_change:
                self._on_change(state)

    def snapshot(self) -> dict:
        return {"state": STATE_NAMES[self.state], "consecutive_failures": self.failures}


def backoff_s(attempt: int, base_s: float = 0.02, cap_s: float = 0.5, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1, 2, ...)."""
    return (rng or random).uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))


class Overloaded(Exception):
    """Every replica is at its in-flight limit and the wait queue is full or its deadline passed."""

    def __init__(self, message: str, retry_after_s: int, code: str = "overloaded") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.code = code  # the error's code: "overloaded", or "priority_shed" (service/admission.py)
