"""Per-connection outbound queue: priority classes, FIFO within a class, expiry and bounded overflow.

Owns the ordering and drop policy of the delivery path ("one bounded outbound queue ordered by priority,
FIFO within a priority; expired messages are dropped and counted; overflow drops the lowest priority
first and is counted"). It does not decide what to do about a connection that keeps overflowing (the
caller watches ``dropped_overflow``) and it never writes to a socket.

This is a pure state machine on the per-message hot path: it must not import asyncio, time or sockets.
Time is always passed in as ``now`` (monotonic seconds).

Storage layout: one ``collections.deque`` per priority in which each queued message occupies two
consecutive slots, ``item`` then ``expires_at`` (``None`` = never expires). That keeps push/pop O(1)
with no per-message tuple and half the memory of ``(item, expires_at)`` pairs.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterator

__all__ = ["PRIORITY_NAMES", "Outbox", "Priority"]


class Priority(enum.IntEnum):
    """Message priority; a lower number is more important (critical > high > normal > low)."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @classmethod
    def parse(cls, value: object) -> Priority:
        """Return the Priority for ``"critical"|"high"|"normal"|"low"`` (any case) or an int 0..3."""
        if isinstance(value, str):
            found = _BY_NAME.get(value.lower())
        elif isinstance(value, int) and not isinstance(value, bool):
            found = _BY_VALUE.get(value)
        else:
            found = None
        if found is None:
            raise ValueError(
                f"invalid priority {value!r}: expected one of critical, high, normal, low or 0..3"
            )
        return found


_BY_NAME = {p.name.lower(): p for p in Priority}
#: wire names by priority number
PRIORITY_NAMES = tuple(p.name.lower() for p in Priority)
_BY_VALUE = {int(p): p for p in Priority}
_ALL = tuple(Priority)  # index == value


class Outbox:
    """Bounded per-connection outbound queue ordered by priority, FIFO within a priority."""

    __slots__ = ("capacity", "dropped_overflow", "dropped_expired", "_q", "_lanes", "_size")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"outbox capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self.dropped_overflow = 0
        self.dropped_expired = 0
        q = (deque(), deque(), deque(), deque())
        self._q = q
        self._lanes = tuple(zip(_ALL, q))  # ((Priority, deque), ...) most important first
        self._size = 0

    def push(self, item: object, priority: int, expires_at: float | None = None) -> object | None:
        """Queue ``item``; return the item dropped for overflow (possibly ``item`` itself) or None."""
        if not 0 <= priority <= 3:
            raise ValueError(f"invalid priority {priority!r}: expected 0..3")
        dropped = None
        if self._size >= self.capacity:
            q = self._q
            low = 3
            while not q[low]:
                low -= 1
            self.dropped_overflow += 1
            if low < priority:
                # Everything queued is more important than the newcomer: the newcomer loses.
                return item
            victim = q[low]
            dropped = victim.popleft()
            victim.popleft()
            self._size -= 1
        lane = self._q[priority]
        lane.append(item)
        lane.append(expires_at)
        self._size += 1
        return dropped

    def pop(self, now: float) -> tuple[object, int] | None:
        """Remove and return the next ``(item, priority)``, dropping expired items on the way, or None."""
        if not self._size:
            return None
        for prio, lane in self._lanes:
            while lane:
                item = lane.popleft()
                exp = lane.popleft()
                self._size -= 1
                if exp is not None and exp <= now:
                    self.dropped_expired += 1
                    continue
                return (item, prio)
        return None

    def pop_many(self, now: float, limit: int) -> list[tuple[object, int]]:
        """Remove and return up to ``limit`` non-expired ``(item, priority)`` in delivery order."""
        out: list[tuple[object, int]] = []
        if limit <= 0 or not self._size:
            return out
        taken = 0
        for prio, lane in self._lanes:
            while lane:
                item = lane.popleft()
                exp = lane.popleft()
                self._size -= 1
                if exp is not None and exp <= now:
                    self.dropped_expired += 1
                    continue
                out.append((item, prio))
                taken += 1
                if taken >= limit:
                    return out
        return out

    def peek_priority(self) -> int | None:
        """Priority of the item ``pop`` would consider first (expiry not checked), or None if empty."""
        if self._size:
            for prio, lane in self._lanes:
                if lane:
                    return prio
        return None

    def drain_all(self) -> list[tuple[object, int]]:
        """Remove and return everything, expired or not, in delivery order; counters are not touched."""
        out: list[tuple[object, int]] = []
        for prio, lane in self._lanes:
            while lane:
                item = lane.popleft()
                lane.popleft()
                out.append((item, prio))
        self._size = 0
        return out

    def __iter__(self) -> Iterator[object]:
        """The queued items in delivery order (expired ones included until a pop drops them)."""
        for lane in self._q:
            yield from itertools.islice(lane, 0, None, 2)

    def depth_by_priority(self) -> tuple[int, int, int, int]:
        """Queued item count per priority: (critical, high, normal, low)."""
        a, b, c, d = self._q
        return (len(a) >> 1, len(b) >> 1, len(c) >> 1, len(d) >> 1)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size != 0

    def __repr__(self) -> str:
        return (
            f"Outbox(len={self._size}, capacity={self.capacity}, depth={self.depth_by_priority()}, "
            f"dropped_overflow={self.dropped_overflow}, dropped_expired={self.dropped_expired})"
        )
