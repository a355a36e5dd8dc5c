"""Daemon-wide counters, rates and latency samples (the seed's Key Performance Metrics).

Counters are plain ints bumped on the hot path; rates and percentiles are computed once a
second by the sweep (``tick``), never per message.
"""

from __future__ import annotations

from collections import deque
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


class Stats:
    """Counters for the whole manager, and one-second samples of the last ten minutes."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.published = 0
        self.delivered = 0
        self.received = 0
        self.batches = 0
        self.coalesced = 0
        self.subscribes = 0
        self.unsubscribes = 0
        self.dropped_overflow = 0
        self.dropped_expired = 0
        self.dropped_on_close = 0
        self.slow_consumers = 0
        self.reliable_resent = 0
        self.reliable_given_up = 0
        self.invalid_data = 0  # publications refused: data failed the channel group's data_schema
        self.refused: dict[str, int] = {}
        self.closed_by_code: dict[int, int] = {}
        self.errors = 0
        self._fanout: deque[float] = deque(maxlen=2048)
        self._queue_lat: deque[float] = deque(maxlen=2048)
        self.samples: deque[dict[str, float]] = deque(maxlen=600)
        self._last: tuple[float, int, int, int] | None = None
        self.rate_in = 0.0
        self.rate_out = 0.0
        self.rate_pub = 0.0

    def observe_fanout(self, seconds: float) -> None:
        self._fanout.append(seconds)

    def observe_queue_latency(self, seconds: float) -> None:
        self._queue_lat.append(seconds)

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def closed(self, code: int) -> None:
        self.closed_by_code[code] = self.closed_by_code.get(code, 0) + 1

    def latency(self) -> dict[str, float]:
        """Delivery latency: publish accepted to written (direct writes and queued writes together), ms."""
        vals = sorted(list(self._fanout) + list(self._queue_lat))
        return {"p50_ms": round(percentile(vals, 50) * 1000, 3), "p99_ms": round(percentile(vals, 99) * 1000, 3),
                "samples": len(vals)}

    def tick(self, now: float, hub: Any) -> None:
        received = self.received
        delivered = self.delivered
        published = self.published
        last = self._last
        self._last = (now, received, delivered, published)
        if last is None or now <= last[0]:
            return
        dt = now - last[0]
        self.rate_in = (received - last[1]) / dt
        self.rate_out = (delivered - last[2]) / dt
        self.rate_pub = (published - last[3]) / dt
        lat = self.latency()
        self.samples.append({"t": round(now, 3), "in": round(self.rate_in, 2), "out": round(self.rate_out, 2),
                             "pub": round(self.rate_pub, 2), "conns": len(hub.conns),
                             "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]})

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections_total": self.connections_total, "published": self.published,
            "delivered": self.delivered, "received": self.received, "batches": self.batches, "coalesced_windows": self.coalesced,
            "subscribes": self.subscribes, "unsubscribes": self.unsubscribes,
            "dropped_overflow": self.dropped_overflow, "dropped_expired": self.dropped_expired,
            "dropped_on_close": self.dropped_on_close, "slow_consumers": self.slow_consumers,
            "reliable_resent": self.reliable_resent, "reliable_given_up": self.reliable_given_up,
            "invalid_data": self.invalid_data,
            "refused": dict(self.refused), "closed_by_code": {str(k): v for k, v in self.closed_by_code.items()},
            "rate_in": round(self.rate_in, 2), "rate_out": round(self.rate_out, 2),
            "rate_publish": round(self.rate_pub, 2), "latency": self.latency(),
        }
