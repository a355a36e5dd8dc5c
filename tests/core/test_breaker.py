"""Unit tests for wsd.core.breaker (per-connection circuit breaker)."""

from __future__ import annotations

import pytest

from wsd.core.breaker import BreakerState, CircuitBreaker


def opened(now: float = 0.0, threshold: int = 3, cooldown: float = 1.0) -> CircuitBreaker:
    """A breaker that has just opened at ``now`` through consecutive failures."""
    b = CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown)
    for _ in range(threshold):
        b.record_failure(now)
    assert b.state is BreakerState.OPEN
    return b


def test_new_breaker_is_closed_and_allows():
    """A fresh breaker is CLOSED with no failures and lets writes through."""
    b = CircuitBreaker()
    assert b.state is BreakerState.CLOSED
    assert (b.failures, b.opened_count, b.opened_at) == (0, 0, None)
    assert b.allow(0.0)


def test_state_values_are_wire_strings():
    """States compare equal to the strings wsctl and metrics print."""
    assert BreakerState.CLOSED == "closed"
    assert BreakerState.OPEN == "open"
    assert BreakerState.HALF_OPEN == "half_open"


def test_opens_exactly_at_threshold():
    """Failures below the threshold keep it CLOSED; the threshold-th failure opens it."""
    b = CircuitBreaker(failure_threshold=3, cooldown_s=1.0)
    b.record_failure(10.0)
    b.record_failure(10.1)
    assert b.state is BreakerState.CLOSED and b.failures == 2 and b.allow(10.1)
    b.record_failure(10.2)
    assert b.state is BreakerState.OPEN
    assert b.opened_at == 10.2 and b.opened_count == 1


def test_success_in_closed_resets_failure_count():
    """Failures must be consecutive: a success in CLOSED forgets earlier ones."""
    b = CircuitBreaker(failure_threshold=3)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_success(0.0)
    assert b.failures == 0
    b.record_failure(0.0)
    b.record_failure(0.0)
    assert b.state is BreakerState.CLOSED


def test_stays_open_during_cooldown():
    """An OPEN breaker refuses until cooldown_s has elapsed, and its state stays OPEN."""
    b = opened(now=5.0, cooldown=2.0)
    assert not b.allow(5.0)
    assert not b.allow(6.999)
    assert b.state is BreakerState.OPEN


def test_state_changes_to_half_open_only_through_allow():
    """After the cooldown the state still reads OPEN until allow() is called."""
    b = opened(now=0.0, cooldown=1.0)
    assert b.state is BreakerState.OPEN
    assert b.allow(1.0)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow(1.0)


def test_success_in_half_open_closes():
    """A success in HALF_OPEN closes the breaker and clears failures."""
    b = opened(now=0.0, cooldown=1.0)
    b.allow(1.5)
    b.record_success(1.6)
    assert b.state is BreakerState.CLOSED and b.failures == 0
    assert b.opened_count == 1


def test_failure_in_half_open_reopens_with_new_cooldown():
    """A failure in HALF_OPEN reopens at once and starts a fresh cooldown from that moment."""
    b = opened(now=0.0, cooldown=1.0)
    assert b.allow(1.0)
    b.record_failure(1.2)
    assert b.state is BreakerState.OPEN
    assert b.opened_at == 1.2 and b.opened_count == 2
    assert not b.allow(2.1)
    assert b.allow(2.2)
    assert b.state is BreakerState.HALF_OPEN


def test_failure_while_open_does_not_extend_cooldown():
    """Late failures reported while OPEN are counted but do not move opened_at."""
    b = opened(now=0.0, cooldown=1.0)
    b.record_failure(0.5)
    assert b.opened_at == 0.0 and b.opened_count == 1 and b.failures == 4
    assert b.allow(1.0)


def test_success_while_open_is_ignored():
    """A late success while OPEN does not close the breaker early."""
    b = opened(now=0.0, cooldown=1.0)
    b.record_success(0.5)
    assert b.state is BreakerState.OPEN and not b.allow(0.5)


def test_trip_forces_open_from_closed_and_half_open():
    """trip opens the breaker from any state and counts it as an opening."""
    b = CircuitBreaker(failure_threshold=5, cooldown_s=1.0)
    b.trip(3.0)
    assert b.state is BreakerState.OPEN and b.opened_at == 3.0 and b.opened_count == 1
    assert not b.allow(3.5)
    assert b.allow(4.0)
    b.trip(4.1)
    assert b.state is BreakerState.OPEN and b.opened_count == 2 and b.opened_at == 4.1


def test_trip_while_open_restarts_cooldown_without_counting():
    """Tripping an OPEN breaker pushes its cooldown out but is not a new opening."""
    b = CircuitBreaker(cooldown_s=1.0)
    b.trip(0.0)
    b.trip(0.8)
    assert b.opened_count == 1 and b.opened_at == 0.8
    assert not b.allow(1.5)
    assert b.allow(1.8)


def test_reset_forces_closed():
    """reset closes an OPEN breaker immediately and clears failures, keeping the history counters."""
    b = opened(now=0.0, cooldown=100.0)
    b.reset()
    assert b.state is BreakerState.CLOSED and b.failures == 0
    assert b.allow(0.0)
    assert b.opened_count == 1 and b.opened_at == 0.0


def test_zero_cooldown_half_opens_immediately():
    """With cooldown 0 the first allow() after opening already probes."""
    b = opened(now=1.0, cooldown=0.0)
    assert b.allow(1.0)
    assert b.state is BreakerState.HALF_OPEN


def test_invalid_parameters_rejected():
    """A threshold below 1 or a negative cooldown is a programming error."""
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=-1.0)
