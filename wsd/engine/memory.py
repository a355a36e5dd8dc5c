"""The in-process engine: history buffers and sessions in this process's memory.

A restart loses every buffer, so each start picks a new epoch: a client that resumes
from an offset of the old epoch is told ``recovered: false`` instead of getting a silent gap.
Both maps are bounded (``core/history.HistoryStore``, ``core/sessions.SessionStore``) and swept.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from wsd.core.history import HistoryStore, StreamPosition
from wsd.core.sessions import SessionStore, SessionTooLarge
from wsd.engine.base import Engine, HistoryResult, Publication, log_refused


class MemoryEngine(Engine):
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.epoch = secrets.token_hex(4)
        self._clock = clock
        self._store = HistoryStore(self.epoch, self.max_channels, self._in_use)
        self._sessions = SessionStore(self.max_sessions, self.max_sessions_per_user, self.max_session_bytes,
                                      self.max_sessions_bytes)

    def _in_use(self, channel: str) -> bool:
        return self.in_use(channel)

    def set_limits(self, limits: Any) -> None:
        super().set_limits(limits)
        self._store.max_instances = self.max_channels
        s = self._sessions
        s.max_total, s.max_per_owner, s.max_bytes, s.max_total_bytes = (
            self.max_sessions, self.max_sessions_per_user, self.max_session_bytes, self.max_sessions_bytes)

    async def start(self, on_remote: Callable[[Publication], None]) -> None:
        return None

    async def stop(self) -> None:
        self._store = HistoryStore(self.epoch, self.max_channels, self._in_use)

    async def publish(self, pub: Publication, history_size: int, history_ttl_s: float,
                      scope: dict[str, Any] | None = None) -> None:
        if history_size <= 0:
            return
        buf = self._store.append(pub.channel, pub, history_size, history_ttl_s, self._clock(), pub.ts)
        pub.epoch = buf.epoch
        pub.offset = buf.top_offset

    async def history(self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
                      ) -> HistoryResult:
        buf = self._store.get(channel, touch=True)
        now = self._clock()
        if buf is None:
            pos = StreamPosition(0, self._store.epoch)
            recovered = since is None or since.offset == 0  # nothing was ever published after 0
            return HistoryResult([], pos, recovered)
        if since is not None:
            entries, recovered = buf.since(since.offset, since.epoch, now, limit)
        else:
            buf.trim(now)
            entries, recovered = buf.last(limit if limit is not None else len(buf), now), True
        return HistoryResult([e.payload for e in entries], buf.position(), recovered)

    def position(self, channel: str) -> StreamPosition:
        buf = self._store.get(channel)
        return buf.position() if buf is not None else StreamPosition(0, self._store.epoch)

    def channels(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        out = {}
        for name, buf in self._store.items():
            buf.trim(now)
            out[name] = {"depth": len(buf), "offset": buf.top_offset, "epoch": buf.epoch}
        return out

    async def save_session(self, session_id: str, owner: str, blob: bytes, ttl_s: float) -> bool:
        try:
            self._sessions.save(session_id, owner, blob, self._clock() + ttl_s)
        except SessionTooLarge as exc:
            log_refused(len(blob), exc.limit)
            return False
        return True

    async def load_session(self, session_id: str) -> bytes | None:
        return self._sessions.load(session_id, self._clock())

    async def drop_session(self, session_id: str) -> None:
        self._sessions.drop(session_id)

    def sweep(self) -> None:
        now = self._clock()
        self._sessions.sweep(now)
        self._store.sweep(now)

    def memory_stats(self) -> dict[str, Any]:
        s, h = self._sessions, self._store
        return {"sessions": len(s), "session_bytes": s.bytes, "sessions_evicted": s.evicted,
                "sessions_expired": s.expired, "sessions_refused": s.refused, "channels": len(h),
                "channels_evicted": h.evicted, "channels_expired": h.expired}

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "epoch": self.epoch, "channels": len(self._store),
                "sessions": len(self._sessions)}
