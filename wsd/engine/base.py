"""The engine interface: where channel history, positions and sessions live.

The memory engine keeps them in this process (the embedded default). A Redis engine keeps
them outside, so several wsd nodes (or ``wsd serve --workers N``) share channels, offsets,
epochs and sessions. Nothing above this interface assumes it is the only process: offsets and
epochs always come from the engine, and remote publications arrive through ``on_remote``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from wsd.core.history import StreamPosition


class Publication:
    """One published message, as stored in history and delivered to connections."""

    __slots__ = ("channel", "company_id", "data", "epoch", "expires_at", "group", "id", "offset", "priority",
                 "source", "ts", "ttl_s", "type", "user_id")

    def __init__(self, *, id: str, channel: str, group: str, type: str, priority: int, data: Any, ts: float,
                 ttl_s: float | None = None, source: str = "", user_id: str = "", company_id: str = "",
                 offset: int = 0, epoch: str = "", expires_at: float | None = None) -> None:
        self.id = id
        self.channel = channel
        self.group = group
        self.type = type
        self.priority = priority
        self.data = data
        self.ts = ts
        self.ttl_s = ttl_s
        self.source = source
        self.user_id = user_id
        self.company_id = company_id
        self.offset = offset
        self.epoch = epoch
        self.expires_at = expires_at

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Publication:
        return cls(**{k: d.get(k) for k in cls.__slots__ if k in d})


class HistoryResult:
    __slots__ = ("position", "publications", "recovered")

    def __init__(self, publications: list[Publication], position: StreamPosition, recovered: bool) -> None:
        self.publications = publications
        self.position = position
        self.recovered = recovered


class Engine(abc.ABC):
    """Channels' history and positions, sessions, and (for shared engines) cross-node delivery."""

    name: str = "abstract"
    #: True when publications travel through the engine to every node (the publisher included)
    shared: bool = False

    @abc.abstractmethod
    async def start(self, on_remote: Callable[[Publication], None]) -> None:
        """Begin; ``on_remote`` receives publications made on other nodes."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def configure(self, groups: Any) -> None:
        """The channel groups from config (history sizes and ttls), at start and after each reload."""
        self.groups = groups

    @abc.abstractmethod
    async def publish(self, pub: Publication, history_size: int, history_ttl_s: float,
                      scope: dict[str, Any] | None = None) -> None:
        """Assign ``pub.offset`` / ``pub.epoch`` (when the channel keeps history), store it, share it.

        A shared engine also hands the publication, with its delivery ``scope``, to every node's
        ``on_remote``; the memory engine only stores it and the hub delivers.
        """

    @abc.abstractmethod
    def position(self, channel: str) -> StreamPosition:
        """The channel's latest known position (offset 0 when it has no history)."""

    @abc.abstractmethod
    async def history(self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
                      ) -> HistoryResult: ...

    @abc.abstractmethod
    def channels(self) -> dict[str, dict[str, Any]]:
        """Channel instances with history: instance -> {depth, offset, epoch}."""

    @abc.abstractmethod
    async def save_session(self, session_id: str, state: dict[str, Any], ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def load_session(self, session_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def drop_session(self, session_id: str) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}
