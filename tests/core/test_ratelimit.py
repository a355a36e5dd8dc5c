"""Unit tests for wsd.core.ratelimit (token bucket, keyed limiter, per_minute)."""

from __future__ import annotations

import math

import pytest

from wsd.core.ratelimit import KeyedLimiter, TokenBucket, per_minute


def test_bucket_starts_full_and_allows_burst():
    """A new bucket allows exactly ``burst`` takes at one instant."""
    b = TokenBucket(rate_per_s=1.0, burst=3, now=0.0)
    assert [b.try_take(0.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_at_rate():
    """Tokens come back at rate_per_s, fractionally."""
    b = TokenBucket(rate_per_s=2.0, burst=4, now=0.0)
    for _ in range(4):
        assert b.try_take(0.0)
    assert not b.try_take(0.4)  # 0.8 tokens
    assert b.try_take(0.5)  # 1.0 token
    assert not b.try_take(0.5)
    assert b.available(1.5) == pytest.approx(2.0)


def test_bucket_never_exceeds_burst():
    """A long idle period refills to burst and no further."""
    b = TokenBucket(rate_per_s=10.0, burst=2, now=0.0)
    b.try_take(0.0)
    assert b.available(1000.0) == 2
    assert b.try_take(1000.0) and b.try_take(1000.0) and not b.try_take(1000.0)


def test_failed_take_takes_nothing():
    """A refused take leaves the tokens where they were."""
    b = TokenBucket(rate_per_s=1.0, burst=5, now=0.0)
    assert b.try_take(0.0, 3)
    assert not b.try_take(0.0, 3)
    assert b.available(0.0) == pytest.approx(2.0)
    assert b.try_take(0.0, 2)


def test_refill_survives_float_rounding():
    """Many tiny refill steps adding up to one token allow exactly one take."""
    rate, burst = per_minute(10)
    b = TokenBucket(rate, burst, now=0.0)
    for _ in range(10):
        assert b.try_take(0.0)
    now = 0.0
    for _ in range(600):
        now += 0.01
        b.available(now)
    assert b.try_take(now)
    assert not b.try_take(now)


def test_retry_after_math():
    """retry_after is the time until n tokens exist: 0 when available, missing/rate otherwise."""
    b = TokenBucket(rate_per_s=0.5, burst=2, now=0.0)
    assert b.retry_after(0.0) == 0.0
    b.try_take(0.0, 2)
    assert b.retry_after(0.0) == pytest.approx(2.0)
    assert b.retry_after(1.0) == pytest.approx(1.0)
    assert b.retry_after(1.0, 2) == pytest.approx(3.0)
    assert b.retry_after(2.0) == 0.0
    assert b.try_take(2.0)


def test_retry_after_is_infinite_when_unreachable():
    """Asking for more than burst, or a zero rate, can never be satisfied."""
    assert TokenBucket(1.0, 2, now=0.0).retry_after(0.0, 3) == math.inf
    b = TokenBucket(0.0, 1, now=0.0)
    assert b.try_take(0.0)
    assert b.retry_after(100.0) == math.inf


def test_retry_after_then_take_succeeds():
    """Waiting exactly retry_after seconds makes the take succeed."""
    b = TokenBucket(rate_per_s=3.0, burst=1, now=7.0)
    b.try_take(7.0)
    wait = b.retry_after(7.1)
    assert not b.try_take(7.1 + wait * 0.99)
    assert b.try_take(7.1 + wait)


def test_bucket_rejects_negative_parameters():
    """Negative rate or burst is a programming error."""
    with pytest.raises(ValueError):
        TokenBucket(-1.0, 1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(1.0, -1, now=0.0)


def test_per_minute():
    """per_minute(N) is a burst of N refilled at N/60 per second."""
    assert per_minute(30) == (0.5, 30.0)
    assert per_minute(0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        per_minute(-1)


def test_keyed_limiter_isolates_keys():
    """Exhausting one key's bucket does not affect another key."""
    lim = KeyedLimiter(*per_minute(2))
    assert lim.try_take("alice", 0.0) == (True, 0.0)
    assert lim.try_take("alice", 0.0) == (True, 0.0)
    allowed, retry = lim.try_take("alice", 0.0)
    assert not allowed and retry == pytest.approx(30.0)
    assert lim.try_take("bob", 0.0) == (True, 0.0)
    assert len(lim) == 2


def test_keyed_limiter_refills_per_key():
    """A refused key is allowed again after its retry_after."""
    lim = KeyedLimiter(rate_per_s=1.0, burst=1)
    assert lim.try_take("10.0.0.1", 0.0)[0]
    allowed, retry = lim.try_take("10.0.0.1", 0.25)
    assert not allowed and retry == pytest.approx(0.75)
    assert lim.try_take("10.0.0.1", 1.0)[0]


def test_keyed_limiter_zero_limit_refuses_forever():
    """A limit of 0 per minute refuses every key with an infinite retry_after."""
    lim = KeyedLimiter(*per_minute(0))
    assert lim.try_take("x", 0.0) == (False, math.inf)


def test_sweep_forgets_only_refilled_buckets():
    """sweep removes buckets that are full again and keeps ones still refilling."""
    lim = KeyedLimiter(rate_per_s=1.0, burst=2)
    lim.try_take("a", 0.0)  # full again at 1.0
    lim.try_take("b", 0.0)
    lim.try_take("b", 0.0)  # full again at 2.0
    assert lim.sweep(0.5) == 0
    assert lim.sweep(1.0) == 1
    assert "a" not in lim and "b" in lim and len(lim) == 1
    assert lim.sweep(2.0) == 1
    assert len(lim) == 0


def test_sweep_does_not_change_decisions():
    """A swept key behaves exactly like a bucket that was kept: it is full either way."""
    lim = KeyedLimiter(rate_per_s=1.0, burst=2)
    lim.try_take("a", 0.0)
    lim.sweep(5.0)
    assert lim.try_take("a", 5.0)[0] and lim.try_take("a", 5.0)[0]
    assert not lim.try_take("a", 5.0)[0]


def test_keyed_limiter_is_bounded_by_max_keys():
    """At max_keys a new key evicts the oldest bucket, so memory stays bounded."""
    lim = KeyedLimiter(rate_per_s=1.0, burst=1, max_keys=3)
    for key in ("a", "b", "c", "d"):
        lim.try_take(key, 0.0)
    assert len(lim) == 3
    assert "a" not in lim and "d" in lim
    assert not lim.try_take("b", 0.0)[0]  # kept buckets keep their state


def test_keyed_limiter_rejects_bad_max_keys():
    """max_keys must be at least 1."""
    with pytest.raises(ValueError):
        KeyedLimiter(1.0, 1, max_keys=0)


def test_keyed_limiter_churn_of_distinct_keys_falls_back_after_sweep():
    """Thousands of distinct addresses each taking one token: sweep forgets them once refilled."""
    lim = KeyedLimiter(*per_minute(600))
    for i in range(5000):
        assert lim.try_take(f"10.0.{i // 256}.{i % 256}", now=i * 0.0001)[0]
    assert len(lim) == 5000
    assert lim.sweep(0.6) == 5000 and len(lim) == 0
