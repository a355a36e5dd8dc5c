"""Per-channel-instance history buffer with (offset, epoch) stream positions.

Owns the numbering of a channel instance's messages (offsets 1, 2, 3, ... never reused within an
epoch), the bounded buffer behind ``history`` requests and ``subscribe`` with ``history``, and the
"recovered" verdict a reconnecting client gets for ``since: {offset, epoch}`` (docs/protocol.md, "History positions").
Bounded two ways: at most ``size`` entries, none older than ``ttl_s``.

Pure state machine: it must not import asyncio, time or sockets. ``now`` is monotonic seconds (used
for the ttl); ``wall`` is the unix timestamp shown to clients as ``ts``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from collections.abc import Callable
from itertools import islice

__all__ = ["StreamPosition", "HistoryEntry", "HistoryBuffer", "HistoryStore"]

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


def _never(channel: str) -> bool:
    return False


class HistoryStore:
    """The history buffers of every channel instance, bounded in number and freed when nobody needs them.

    - An instance nobody is subscribed to (``in_use`` says False) whose messages have all outlived their ttl
      is freed by ``sweep``.
    - At most ``max_instances`` are held: creating one more first frees the least recently used instance
      nobody is subscribed to (publishing and reading count as use). When every instance is in use the cap
      is exceeded rather than dropping a subscribed channel's history.

    Instances found in use while making room are set aside (``_pinned``) until the next ``sweep`` finds them
    unused again, so a store holding more subscribed instances than the cap does not look at each of them
    again for every instance it creates.

    A freed instance's offsets are forgotten, so a re-created one must never count under the same epoch:
    every free moves the store to a new epoch (``base``, then ``base.1``, ``base.2``, ...) for instances
    created from then on. A client holding a position in a freed instance therefore gets ``recovered:
    false``, never a message it did not ask for under an offset it already saw.
    """

    __slots__ = ("_buffers", "_gen", "_pinned", "base_epoch", "evicted", "expired", "in_use", "max_instances")

    def __init__(self, epoch: str, max_instances: int, in_use: Callable[[str], bool] = _never) -> None:
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances!r}")
        self.base_epoch = epoch
        self.max_instances = max_instances
        self.in_use = in_use
        self._buffers: dict[str, HistoryBuffer] = {}  # candidates for eviction, least recently used first
        self._pinned: dict[str, HistoryBuffer] = {}  # found in use while making room: not candidates
        self._gen = 0
        self.evicted = 0
        self.expired = 0

    @property
    def epoch(self) -> str:
        """The epoch an instance created now starts in (and an instance without history reports)."""
        return self.base_epoch if self._gen == 0 else f"{self.base_epoch}.{self._gen}"

    def get(self, channel: str, touch: bool = False) -> HistoryBuffer | None:
        """The instance's buffer, if held; ``touch`` marks it recently used."""
        buffers = self._buffers
        if not touch:
            buf = buffers.get(channel)
            return buf if buf is not None else self._pinned.get(channel)
        buf = buffers.pop(channel, None)
        if buf is not None:
            buffers[channel] = buf
            return buf
        return self._pinned.get(channel)

    def append(self, channel: str, payload: object, size: int, ttl_s: float, now: float, wall: float
               ) -> HistoryBuffer:
        """Record a message in ``channel`` (creating its buffer, making room first); return the buffer."""
        buffers = self._buffers
        buf = buffers.pop(channel, None)
        if buf is None:
            buf = self._pinned.get(channel)
            if buf is not None:
                buf.append(payload, now, wall)
                return buf
            self._make_room()
            buf = HistoryBuffer(size, ttl_s, self.epoch)
        buffers[channel] = buf  # (re)inserted last: the most recently used
        buf.append(payload, now, wall)
        return buf

    def _make_room(self) -> None:
        buffers = self._buffers
        pinned = self._pinned
        while buffers and len(buffers) + len(pinned) >= self.max_instances:
            name = next(iter(buffers))
            buf = buffers.pop(name)
            if self.in_use(name):
                pinned[name] = buf  # subscribed: set aside until a sweep finds it unused
                continue
            self._gen += 1
            self.evicted += 1

    def sweep(self, now: float) -> int:
        """Free every instance nobody is subscribed to whose messages have all expired; return how many.
        Set-aside instances nobody uses any more become candidates for eviction again (as recently used)."""
        buffers = self._buffers
        pinned = self._pinned
        if pinned:
            for name in [n for n in pinned if not self.in_use(n)]:
                buffers[name] = pinned.pop(name)
        gone = [name for name, buf in buffers.items() if (buf.trim(now) or True) and not buf
                and not self.in_use(name)]
        for name in gone:
            del buffers[name]
        for buf in pinned.values():
            buf.trim(now)
        if gone:
            self._gen += 1
            self.expired += len(gone)
        return len(gone)

    def items(self) -> list[tuple[str, HistoryBuffer]]:
        return [*self._buffers.items(), *self._pinned.items()]

    def __len__(self) -> int:
        return len(self._buffers) + len(self._pinned)

    def __contains__(self, channel: object) -> bool:
        return channel in self._buffers or channel in self._pinned
