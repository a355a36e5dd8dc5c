"""Token-bucket rate limiting: one bucket, and a memory-bounded bucket-per-key table.

Owns the arithmetic behind the ``[limits]`` section (connections per user / per IP per minute, messages
per connection per second) and the ``Retry-After`` value of a 429 refusal. It keeps no clock of its
own and never sleeps.

Pure state machine: it must not import asyncio, time or sockets. Time is passed in as ``now``
(monotonic seconds).
"""

from __future__ import annotations

__all__ = ["TokenBucket", "KeyedLimiter", "per_minute"]

_INF = float("inf")
# Refill is float arithmetic: (now - stamp) * rate can land a hair under a whole token.
_EPS = 1e-9


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled continuously at ``rate_per_s``; starts full."""

    __slots__ = ("rate_per_s", "burst", "_tokens", "_stamp")

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        if rate_per_s < 0:
            raise ValueError(f"rate_per_s must be >= 0, got {rate_per_s!r}")
        if burst < 0:
            raise ValueError(f"burst must be >= 0, got {burst!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> float:
        elapsed = now - self._stamp
        if elapsed > 0:
            tokens = self._tokens + elapsed * self.rate_per_s
            if tokens > self.burst:
                tokens = self.burst
            self._tokens = tokens
            self._stamp = now
        return self._tokens

    def available(self, now: float) -> float:
        """Tokens available at ``now``."""
        return self._refill(now)

    def try_take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are all available; otherwise take nothing and return False."""
        tokens = self._refill(now)
        if tokens + _EPS >= n:
            tokens -= n
            self._tokens = tokens if tokens > 0 else 0.0
            return True
        return False

    def retry_after(self, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available: 0 if they are now, inf if ``n`` exceeds ``burst``."""
        missing = n - self._refill(now)
        if missing <= _EPS:
            return 0.0
        if n > self.burst + _EPS or self.rate_per_s <= 0:
            return _INF
        return missing / self.rate_per_s

    def full_at(self) -> float:
        """The ``now`` at which the bucket is (or was) full again."""
        missing = self.burst - self._tokens
        if missing <= 0:
            return self._stamp
        if self.rate_per_s <= 0:
            return _INF
        return self._stamp + missing / self.rate_per_s

    def __repr__(self) -> str:
        return f"TokenBucket(rate_per_s={self.rate_per_s}, burst={self.burst}, tokens={self._tokens})"


class KeyedLimiter:
    """A token bucket per key (user id, IP) with bounded memory: buckets that are full again are forgotten.

    A forgotten bucket is indistinguishable from a new one (new buckets start full), so ``sweep`` never
    changes a decision. At ``max_keys`` a new key evicts the oldest-created bucket (O(1); the oldest is
    the likeliest to have refilled); call ``sweep`` periodically so that rarely happens.
    """

    __slots__ = ("rate_per_s", "burst", "max_keys", "_buckets")

    def __init__(self, rate_per_s: float, burst: float, max_keys: int = 100_000) -> None:
        if rate_per_s < 0:
            raise ValueError(f"rate_per_s must be >= 0, got {rate_per_s!r}")
        if burst < 0:
            raise ValueError(f"burst must be >= 0, got {burst!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def try_take(self, key: str, now: float) -> tuple[bool, float]:
        """Take one token for ``key``: ``(True, 0.0)`` or ``(False, seconds until one is available)``."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                del buckets[next(iter(buckets))]
            bucket = buckets[key] = TokenBucket(self.rate_per_s, self.burst, now)
        if bucket.try_take(now):
            return (True, 0.0)
        return (False, bucket.retry_after(now))

    def sweep(self, now: float) -> int:
        """Forget every bucket that has refilled by ``now``; return how many were removed."""
        buckets = self._buckets
        stale = [key for key, bucket in buckets.items() if bucket.full_at() <= now]
        for key in stale:
            del buckets[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


def per_minute(count: int) -> tuple[float, float]:
    """``(rate_per_s, burst)`` for an "N per minute" limit: N tokens of burst, refilled at N/60 per second."""
    if count < 0:
        raise ValueError(f"per-minute count must be >= 0, got {count!r}")
    return (count / 60.0, float(count))
