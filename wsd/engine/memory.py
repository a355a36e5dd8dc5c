"""The in-process engine: history buffers and sessions in this process's memory.

A restart loses every buffer, so each start picks a new epoch: a client that resumes
from an offset of the old epoch is told ``recovered: false`` instead of getting a silent gap.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from wsd.core.history import HistoryBuffer, StreamPosition
from wsd.engine.base import Engine, HistoryResult, Publication


class MemoryEngine(Engine):
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.epoch = secrets.token_hex(4)
        self._clock = clock
        self._buffers: dict[str, HistoryBuffer] = {}
        self._sessions: dict[str, tuple[float, dict[str, Any]]] = {}

    async def start(self, on_remote: Callable[[Publication], None]) -> None:
        return None

    async def stop(self) -> None:
        self._buffers.clear()

    async def publish(self, pub: Publication, history_size: int, history_ttl_s: float,
                      scope: dict[str, Any] | None = None) -> None:
        if history_size <= 0:
            return
        buf = self._buffers.get(pub.channel)
        if buf is None:
            buf = self._buffers[pub.channel] = HistoryBuffer(history_size, history_ttl_s, self.epoch)
        pub.epoch = self.epoch
        pub.offset = buf.append(pub, self._clock(), pub.ts)

    async def history(self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
                      ) -> HistoryResult:
        buf = self._buffers.get(channel)
        now = self._clock()
        if buf is None:
            pos = StreamPosition(0, self.epoch)
            recovered = since is None or since.offset == 0  # nothing was ever published after 0
            return HistoryResult([], pos, recovered)
        if since is not None:
            entries, recovered = buf.since(since.offset, since.epoch, now, limit)
        else:
            buf.trim(now)
            entries, recovered = buf.last(limit if limit is not None else len(buf), now), True
        return HistoryResult([e.payload for e in entries], buf.position(), recovered)

    def position(self, channel: str) -> StreamPosition:
        buf = self._buffers.get(channel)
        return buf.position() if buf is not None else StreamPosition(0, self.epoch)

    def channels(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        out = {}
        for name, buf in self._buffers.items():
            buf.trim(now)
            out[name] = {"depth": len(buf), "offset": buf.top_offset, "epoch": buf.epoch}
        return out

    async def save_session(self, session_id: str, state: dict[str, Any], ttl_s: float) -> None:
        now = self._clock()
        self._sessions[session_id] = (now + ttl_s, state)
        if len(self._sessions) > 1024 and len(self._sessions) % 256 == 0:
            for sid, (exp, _) in list(self._sessions.items()):
                if exp <= now:
                    del self._sessions[sid]

    async def load_session(self, session_id: str) -> dict[str, Any] | None:
        item = self._sessions.get(session_id)
        if item is None:
            return None
        exp, state = item
        if exp <= self._clock():
            del self._sessions[session_id]
            return None
        return state

    async def drop_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "epoch": self.epoch, "channels": len(self._buffers),
                "sessions": len(self._sessions)}
