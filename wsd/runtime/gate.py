"""The handshake edge: handshakes in progress per address and in total, and repeated-record aggregation.

Pure state machines: no asyncio, no clock of their own (``now`` is passed in), no sockets.

- ``InProgress`` counts TCP connections that have not finished their WebSocket handshake, per
  client address and in total. A connection over either bound is closed by the caller at once.
- ``Repeats`` turns a flood of identical records (one refusal kind from one address, one
  descriptor-exhaustion warning) into the first record in full plus one summary per interval
  carrying the count of the rest, so a flood can neither fill the text log nor rotate the audit
  log out.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = ["InProgress", "Repeats"]


class InProgress:
    """Handshakes in progress: at most ``per_ip`` per address and ``total`` overall."""

    __slots__ = ("by_ip", "per_ip", "total", "count")

    def __init__(self, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.total = total
        self.by_ip: dict[str, int] = {}
        self.count = 0

    def try_enter(self, ip: str, per_ip: bool = True) -> str:
        """Take a slot for ``ip``: "" when taken, else which bound is full ("per_ip" or "total").
        ``per_ip=False`` (a trusted proxy, whose connections carry many clients) checks the total only."""
        if self.count >= self.total:
            return "total"
        n = self.by_ip.get(ip, 0)
        if per_ip and n >= self.per_ip:
            return "per_ip"
        self.by_ip[ip] = n + 1
        self.count += 1
        return ""

    def leave(self, ip: str) -> None:
        """Give back the slot taken by ``try_enter(ip)`` (the map only holds addresses mid-handshake)."""
        n = self.by_ip.get(ip, 0)
        if n <= 0:
            return
        if n == 1:
            del self.by_ip[ip]
        else:
            self.by_ip[ip] = n - 1
        self.count -= 1


class Repeats:
    """The first record per key per interval passes; the rest are counted and summarised by ``flush``.

    At most ``max_keys`` keys are tracked; beyond that, records fold into the key's ``overflow``
    form (the caller's choice, e.g. the address replaced by ``*``) so memory stays bounded.
    """

    __slots__ = ("entries", "max_keys")

    def __init__(self, max_keys: int = 10000) -> None:
        self.max_keys = max_keys
        # key -> [suppressed count, first-seen time of this interval, the first record's details]
        self.entries: dict[Hashable, list[Any]] = {}

    def hit(self, key: Hashable, now: float, details: Any = None, overflow: Hashable | None = None) -> bool:
        """Record one occurrence: True when it should be written in full, False when only counted."""
        e = self.entries.get(key)
        if e is None and overflow is not None and len(self.entries) >= self.max_keys:
            key = overflow
            e = self.entries.get(key)
        if e is None:
            self.entries[key] = [0, now, details]
            return True
        e[0] += 1
        return False

    def flush(self, now: float) -> list[tuple[Hashable, int, float, Any]]:
        """(key, suppressed count, seconds covered, details) for every key that suppressed records.

        Keys that suppressed nothing are forgotten (their next record is written in full); keys that
        did stay, with a zero count, so a continuing flood yields one summary per interval.
        """
        out = []
        for key, e in list(self.entries.items()):
            if e[0]:
                out.append((key, e[0], now - e[1], e[2]))
                e[0] = 0
                e[1] = now
            else:
                del self.entries[key]
        return out

    def __len__(self) -> int:
        return len(self.entries)
