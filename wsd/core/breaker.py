"""Per-connection circuit breaker: CLOSED -> OPEN on repeated write failures, HALF_OPEN after a cooldown.

Owns only the breaker state of the delivery path ("a stuck or failing connection trips a per-connection
circuit breaker: messages queue for later delivery instead of being written, and flush when it
half-opens"). The caller decides what a failure is (a write error, a timeout, a write buffer above its
high-water mark via ``trip``) and keeps queueing in the Outbox while ``allow`` says no.

Pure state machine: it must not import asyncio, time or sockets. Time is passed in as ``now``
(monotonic seconds).
"""

from __future__ import annotations

import enum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(str, enum.Enum):
    """Breaker state; the value is what wsctl and metrics show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


class CircuitBreaker:
    """Counts consecutive failures; opens at ``failure_threshold`` and half-opens after ``cooldown_s``.

    ``state`` changes from OPEN to HALF_OPEN lazily, only inside ``allow`` once the cooldown has elapsed.
    ``opened_at`` is the ``now`` of the most recent opening (None if it never opened); ``reset`` keeps it.
    """

    __slots__ = ("failure_threshold", "cooldown_s", "failures", "opened_count", "opened_at", "_state")

    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 1.0) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold!r}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s!r}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.opened_count = 0
        self.opened_at: float | None = None
        self._state = _CLOSED

    @property
    def state(self) -> BreakerState:
        """Current state (OPEN stays OPEN until ``allow`` observes the elapsed cooldown)."""
        return self._state

    def allow(self, now: float) -> bool:
        """May the caller write now? OPEN turns HALF_OPEN (and allows) once the cooldown has elapsed."""
        state = self._state
        if state is _OPEN:
            if now - self.opened_at >= self.cooldown_s:  # type: ignore[operator]
                self._state = _HALF_OPEN
                return True
            return False
        return True

    def record_success(self, now: float) -> None:
        """A write went through: HALF_OPEN closes, CLOSED forgets its failures, OPEN ignores it."""
        state = self._state
        if state is _HALF_OPEN:
            self._state = _CLOSED
            self.failures = 0
        elif state is _CLOSED:
            self.failures = 0
        # OPEN: a late success from before the trip proves nothing; wait for the cooldown.

    def record_failure(self, now: float) -> None:
        """A write failed: CLOSED opens at the threshold, HALF_OPEN reopens with a fresh cooldown."""
        self.failures += 1
        state = self._state
        if state is _CLOSED:
            if self.failures >= self.failure_threshold:
                self._open(now)
        elif state is _HALF_OPEN:
            self._open(now)
        # OPEN: counted, but the running cooldown is not extended.

    def trip(self, now: float) -> None:
        """Force OPEN now (e.g. write buffer above high-water); if already OPEN, restart the cooldown."""
        if self._state is _OPEN:
            self.opened_at = now
        else:
            self._open(now)

    def reset(self) -> None:
        """Force CLOSED with no failures."""
        self._state = _CLOSED
        self.failures = 0

    def _open(self, now: float) -> None:
        self._state = _OPEN
        self.opened_at = now
        self.opened_count += 1

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self.failures}, "
            f"opened_count={self.opened_count}, opened_at={self.opened_at})"
        )
