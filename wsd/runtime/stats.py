"""Daemon-wide counters, rates, latency samples and histograms.

Counters are plain ints bumped on the hot path; rates and percentiles are computed once a
second by the sweep (``tick``), never per message.

Delivery latency (publish accepted to written) is sampled at two points, never per receiver:

- once per fan-out (a publication delivered to its direct receivers, or a coalescing window
  flushed): the time until the fan-out's last direct write;
- once per queued write (a message that waited in a connection's queue): the time until it was
  written.

The hot path only appends the value to a bounded ring (and counts it); the sweep (``tick``, once a
second) and each scrape move the values recorded since the last move into the histogram, at most
``RING`` per ring and pass (beyond that rate, the histogram holds a sample).

Handshake duration is observed once per admitted connection, from the TCP accept to the open
WebSocket.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from prometheus_client import Histogram

#: Bucket bounds in seconds: sub-millisecond local writes up to multi-second stalls.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RING = 2048

#: What a pool keeps of its closed connections (``retire``), so per-pool counters never go down.
POOL_COUNTERS = ("messages_sent", "messages_received", "bytes_sent", "bytes_received", "drops", "errors")


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
        self.input_discarded_bytes = 0  # received after a close for the message rate, dropped unparsed
        self.refused: dict[str, int] = {}
        self.closed_by_code: dict[int, int] = {}
        self.errors = 0
        self._fanout: deque[float] = deque(maxlen=RING)
        self._queue_lat: deque[float] = deque(maxlen=RING)
        self._fanout_seen = 0      # values appended to each ring so far ...
        self._queue_seen = 0
        self._fanout_moved = 0     # ... and, of those, moved into the histogram
        self._queue_moved = 0
        # Not registered anywhere: metrics.py exports them from its own registry at scrape time.
        self.delivery_hist = Histogram("wsd_delivery_latency_seconds", "Publish accepted to written",
                                       buckets=LATENCY_BUCKETS, registry=None)
        self.handshake_hist = Histogram("wsd_handshake_duration_seconds", "TCP accept to open WebSocket",
                                        buckets=HANDSHAKE_BUCKETS, registry=None)
        #: pool id -> totals of the pool's closed connections
        self.retired: dict[str, dict[str, int]] = {}
        self.samples: deque[dict[str, float]] = deque(maxlen=600)
        self._last: tuple[float, int, int, int] | None = None
        self.rate_in = 0.0
        self.rate_out = 0.0
        self.rate_pub = 0.0

    def observe_fanout(self, seconds: float) -> None:
        """Once per fan-out (not per receiver): a ring append; ``move_samples`` feeds the histogram."""
        self._fanout.append(seconds)
        self._fanout_seen += 1

    def observe_queue_latency(self, seconds: float) -> None:
        """Once per queued write: a ring append; ``move_samples`` feeds the histogram."""
        self._queue_lat.append(seconds)
        self._queue_seen += 1

    def observe_handshake(self, seconds: float) -> None:
        self.handshake_hist.observe(seconds)

    def retire(self, conn: Any) -> None:
        """A connection closed: keep its counts in its pool's totals (counters never go down)."""
        t = self.retired.get(conn.pool.id)
        if t is None:
            t = self.retired[conn.pool.id] = dict.fromkeys(POOL_COUNTERS, 0)
        t["messages_sent"] += conn.msgs_out
        t["messages_received"] += conn.msgs_in
        t["bytes_sent"] += conn.bytes_out
        t["bytes_received"] += conn.bytes_in
        t["drops"] += conn.drops_overflow + conn.drops_expired
        t["errors"] += conn.errors

    def move_samples(self) -> None:
        """Put the delivery latencies recorded since the last call into the histogram."""
        obs = self.delivery_hist.observe
        new = min(self._fanout_seen - self._fanout_moved, len(self._fanout))
        self._fanout_moved = self._fanout_seen
        if new > 0:
            for v in list(self._fanout)[-new:]:
                obs(v)
        new = min(self._queue_seen - self._queue_moved, len(self._queue_lat))
        self._queue_moved = self._queue_seen
        if new > 0:
            for v in list(self._queue_lat)[-new:]:
                obs(v)

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
        self.move_samples()
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
            "invalid_data": self.invalid_data, "input_discarded_bytes": self.input_discarded_bytes,
            "refused": dict(self.refused), "closed_by_code": {str(k): v for k, v in self.closed_by_code.items()},
            "rate_in": round(self.rate_in, 2), "rate_out": round(self.rate_out, 2),
            "rate_publish": round(self.rate_pub, 2), "latency": self.latency(),
        }
