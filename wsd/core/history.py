"""Per-channel-instance history buffer with (offset, epoch) stream positions.

Owns the numbering of a channel instance's messages (offsets 1, 2, 3, ... never reused within an
epoch), the bounded buffer behind ``history`` requests and ``subscribe`` with ``history``, and the
"recovered" verdict a reconnecting client gets for ``since: {offset, epoch}`` (SPEC section 4).
Bounded two ways: at most ``size`` entries, none older than ``ttl_s``.

Pure state machine: it must not import asyncio, time or sockets. ``now`` is monotonic seconds (used
for the ttl); ``wall`` is the unix timestamp shown to clients as ``ts``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice

__all__ = ["StreamPosition", "HistoryEntry", "HistoryBuffer"]

_INF = float("inf")


@dataclass(slots=True, frozen=True)
class StreamPosition:
    """Where a stream stands: the last offset published in ``epoch``."""

    offset: int
    epoch: str


class HistoryEntry:
    """One published message as kept in history."""

    __slots__ = ("offset", "wall", "expires_at", "payload")

    def __init__(self, offset: int, wall: float, expires_at: float, payload: object) -> None:
        self.offset = offset
        self.wall = wall
        self.expires_at = expires_at
        self.payload = payload

    def __repr__(self) -> str:
        return f"HistoryEntry(offset={self.offset}, wall={self.wall}, expires_at={self.expires_at})"


class HistoryBuffer:
    """The newest ``size`` messages of one channel instance, each kept at most ``ttl_s`` seconds.

    ``size`` 0 keeps nothing (offsets still advance). ``ttl_s`` <= 0 or ``inf`` means no age limit.
    Entries are appended with non-decreasing ``now``, so they expire oldest first.
    """

    __slots__ = ("size", "ttl_s", "epoch", "top_offset", "_entries")

    def __init__(self, size: int, ttl_s: float, epoch: str) -> None:
        if size < 0:
            raise ValueError(f"history size must be >= 0, got {size!r}")
        self.size = size
        self.ttl_s = ttl_s if ttl_s > 0 else _INF
        self.epoch = epoch
        self.top_offset = 0
        self._entries: deque[HistoryEntry] = deque(maxlen=size)

    def append(self, payload: object, now: float, wall: float) -> int:
        """Record a published message; return its offset. Evicts beyond ``size`` and past ``ttl_s``."""
        entries = self._entries
        while entries and entries[0].expires_at <= now:
            entries.popleft()
        offset = self.top_offset + 1
        self.top_offset = offset
        entries.append(HistoryEntry(offset, wall, now + self.ttl_s, payload))
        return offset

    def trim(self, now: float) -> int:
        """Drop entries older than ``ttl_s``; return how many were dropped."""
        entries = self._entries
        dropped = 0
        while entries and entries[0].expires_at <= now:
            entries.popleft()
            dropped += 1
        return dropped

    def last(self, n: int, now: float) -> list[HistoryEntry]:
        """The newest ``n`` live entries, oldest first."""
        self.trim(now)
        if n <= 0:
            return []
        out = list(islice(reversed(self._entries), n))
        out.reverse()
        return out

    def since(
        self, offset: int, epoch: str, now: float, limit: int | None = None
    ) -> tuple[list[HistoryEntry], bool]:
        """Entries after ``offset`` (oldest first, at most ``limit``) and whether the stream is unbroken.

        ``recovered`` is False when ``epoch`` is not this stream's (everything held is returned), when the
        entry right after ``offset`` has been evicted (what is held after it is returned), or when
        ``offset`` is beyond ``top_offset`` (a position this epoch never reached; nothing is returned).
        ``limit`` only pages the list; it does not affect ``recovered``.
        """
        self.trim(now)
        entries = self._entries
        held = len(entries)
        top = self.top_offset
        if epoch != self.epoch:
            recovered = False
            count = held
        elif offset >= top:
            return ([], offset == top)
        else:
            if offset < 0:
                offset = 0
            first = entries[0].offset if held else top + 1
            recovered = first <= offset + 1
            count = top - offset if recovered else held
        if limit is not None and limit < count:
            if limit <= 0:
                return ([], recovered)
            start = held - count
            return (list(islice(entries, start, start + limit)), recovered)
        out = list(islice(reversed(entries), count))
        out.reverse()
        return (out, recovered)

    def position(self) -> StreamPosition:
        """The stream's current ``(top_offset, epoch)``."""
        return StreamPosition(self.top_offset, self.epoch)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"HistoryBuffer(epoch={self.epoch!r}, top_offset={self.top_offset}, len={len(self._entries)}, "
            f"size={self.size}, ttl_s={self.ttl_s})"
        )
