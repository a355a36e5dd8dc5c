"""Bounded store of disconnected sessions: what ``?session=<id>`` resumes.

Owns the bounds on what clients can make the daemon keep after they leave: each session's encoded size,
the number of sessions per user and in total (the oldest is evicted first, and counted), and their expiry
(``sweep`` frees expired sessions; ``load`` never returns one).

Pure state machine: it must not import asyncio, time or sockets. ``now`` is monotonic seconds.
"""

from __future__ import annotations

__all__ = ["SessionStore", "SessionTooLarge"]


class SessionTooLarge(ValueError):
    """The encoded session is larger than the store accepts: it is not kept."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"session is {size} bytes, more than the {limit} allowed")
        self.size = size
        self.limit = limit


class _Entry:
    __slots__ = ("blob", "expires_at", "owner")

    def __init__(self, owner: object, blob: bytes, expires_at: float) -> None:
        self.owner = owner
        self.blob = blob
        self.expires_at = expires_at


class SessionStore:
    """Encoded sessions by id, each owned by a user (any hashable key), oldest first.

    ``max_total`` / ``max_per_owner`` bound the count (a save beyond either evicts the owner's, then the
    store's, oldest session) and ``max_total_bytes`` the encoded bytes of all sessions together (a save
    beyond it evicts the oldest sessions until the new one fits); ``max_bytes`` bounds one session's encoded size (a larger one raises
    :class:`SessionTooLarge` and nothing is stored, and an older session under that id is dropped, since
    it no longer describes the client). Saving an id again replaces it and makes it the newest.
    """

    __slots__ = ("_by_owner", "_sessions", "bytes", "evicted", "expired", "max_bytes", "max_per_owner", "max_total",
                 "max_total_bytes", "refused")

    def __init__(self, max_total: int, max_per_owner: int, max_bytes: int, max_total_bytes: float = float("inf")
                 ) -> None:
        self.max_total = max_total
        self.max_per_owner = max_per_owner
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self._sessions: dict[str, _Entry] = {}
        self._by_owner: dict[object, dict[str, None]] = {}
        self.bytes = 0
        self.evicted = 0
        self.expired = 0
        self.refused = 0

    def save(self, session_id: str, owner: object, blob: bytes, expires_at: float) -> int:
        """Store ``blob`` under ``session_id`` for ``owner``; return how many older sessions were evicted."""
        self.drop(session_id)
        limit = self.max_bytes if self.max_bytes <= self.max_total_bytes else int(self.max_total_bytes)
        if len(blob) > limit:
            self.refused += 1
            raise SessionTooLarge(len(blob), limit)
        evicted = 0
        mine = self._by_owner.get(owner)
        while mine and len(mine) >= self.max_per_owner:
            self._remove(next(iter(mine)))
            evicted += 1
            mine = self._by_owner.get(owner)
        while self._sessions and (len(self._sessions) >= self.max_total
                                  or self.bytes + len(blob) > self.max_total_bytes):
            self._remove(next(iter(self._sessions)))
            evicted += 1
        self._sessions[session_id] = _Entry(owner, blob, expires_at)
        self._by_owner.setdefault(owner, {})[session_id] = None
        self.bytes += len(blob)
        self.evicted += evicted
        return evicted

    def load(self, session_id: str, now: float) -> bytes | None:
        """The session's blob, or None when it is unknown or expired (an expired one is freed)."""
        e = self._sessions.get(session_id)
        if e is None:
            return None
        if e.expires_at <= now:
            self._remove(session_id)
            self.expired += 1
            return None
        return e.blob

    def owner(self, session_id: str) -> object:
        e = self._sessions.get(session_id)
        return e.owner if e is not None else None

    def drop(self, session_id: str) -> bool:
        if session_id in self._sessions:
            self._remove(session_id)
            return True
        return False

    def sweep(self, now: float) -> int:
        """Free every expired session; return how many.

        Sessions are kept oldest first and normally share one ttl, so the expired ones are at the front;
        the walk stops at the first live one (a ttl shortened by a reload is caught up by ``load``).
        """
        n = 0
        sessions = self._sessions
        while sessions:
            sid = next(iter(sessions))
            if sessions[sid].expires_at > now:
                break
            self._remove(sid)
            n += 1
        self.expired += n
        return n

    def _remove(self, session_id: str) -> None:
        e = self._sessions.pop(session_id)
        self.bytes -= len(e.blob)
        mine = self._by_owner.get(e.owner)
        if mine is not None:
            mine.pop(session_id, None)
            if not mine:
                del self._by_owner[e.owner]

    def owners(self) -> int:
        return len(self._by_owner)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions
