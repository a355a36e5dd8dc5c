"""The engine interface: where channel history, positions and sessions live.

The memory engine keeps them in this process (the embedded default). A Redis engine keeps
them outside, so several wsd nodes (or ``wsd serve --workers N``) share channels, offsets,
epochs and sessions. Nothing above this interface assumes it is the only process: offsets and
epochs always come from the engine, and remote publications arrive through ``on_remote``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from wsd.core.channels import ChannelError
from wsd.core.history import StreamPosition

log = logging.getLogger("wsd.engine")


def log_refused(size: int, limit: int) -> None:
    log.warning("a disconnected session was not kept: %d bytes encoded, limits.max_session_bytes is %d "
                "(the client's resume gets a new session)", size, limit)


def _never(channel: str) -> bool:
    return False


def _no_takeover(session_id: str, owner: str) -> None:
    pass


def _no_gap(channel: str, since: StreamPosition, position: StreamPosition) -> None:
    return None


async def _no_control(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": "unavailable", "message": "this node serves no control requests yet"}}


#: how long a cluster-wide control request waits for the nodes' replies by default
CONTROL_DEADLINE_S = 2.0
#: the largest reply one node sends on the control channel (a larger one is replaced by an error reply)
MAX_CONTROL_REPLY_BYTES = 8 << 20


class ClusterReply:
    """What the nodes answered to one control request: ``replies`` maps a node id to its reply
    (``{"result": ...}`` or ``{"error": {"code", "message"}}``); ``missing`` lists the nodes asked that did not
    answer before the deadline."""

    __slots__ = ("missing", "replies")

    def __init__(self, replies: dict[str, dict[str, Any]], missing: list[str]) -> None:
        self.replies = replies
        self.missing = missing


#: the error code of a publish the shared engine could not take (it is unreachable or did not answer in time)
ENGINE_UNAVAILABLE = "engine_unavailable"


class EngineUnavailable(ChannelError):
    """The engine could not take a publication: nothing was acknowledged (the caller may retry)."""

    def __init__(self, message: str) -> None:
        super().__init__(ENGINE_UNAVAILABLE, message)


class _Push(msgspec.Struct):
    data: Any = None


_decode_push = msgspec.json.Decoder(_Push).decode
#: ``Publication._data`` once only the encoded push is kept: ``data`` is read back from ``payload``
_IN_PAYLOAD = object()


class Publication:
    """One published message, as stored in history and delivered to connections."""

    __slots__ = ("_data", "channel", "company_id", "enc", "epoch", "expires_at", "group", "id", "offset", "payload",
                 "priority", "source", "ts", "ttl_s", "type", "user_id")

    def __init__(self, *, id: str, channel: str, group: str, type: str, priority: int, data: Any, ts: float,
                 ttl_s: float | None = None, source: str = "", user_id: str = "", company_id: str = "",
                 offset: int = 0, epoch: str = "", expires_at: float | None = None, enc: str = "") -> None:
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
        #: "A256GCM" when ``data`` is the envelope of encrypted data (wsd.core.encryption), else ""
        self.enc = enc
        #: the encoded ``message`` push (JSON bytes), set once when it is first encoded (fan-out or a read
        #: of history) so history is served without encoding each stored message again
        self.payload: bytes | None = None

    @property
    def data(self) -> Any:
        d = self._data
        if d is _IN_PAYLOAD:
            return _decode_push(self.payload).data  # type: ignore[arg-type]
        return d

    @data.setter
    def data(self, value: Any) -> None:
        self._data = value

    def decode_raw(self) -> None:
        """Decode ``data`` held still encoded (``msgspec.Raw``, as read back from a shared engine), in place."""
        if isinstance(self._data, msgspec.Raw):
            self._data = msgspec.json.decode(self._data)

    def keep_payload_only(self) -> None:
        """Drop the decoded ``data`` once ``payload`` holds it: a message kept in history is held once, as
        the bytes it is sent as. ``data`` still reads it (decoded from the payload: the rare path)."""
        if self.payload is not None:
            self._data = _IN_PAYLOAD


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
    #: True when sessions outlive this process (another node can resume them): the hub then writes each live
    #: connection's session as it changes, not only when the connection closes
    durable_sessions: bool = False
    # The bounds of what the engine keeps (``[limits]``; set_limits applies the configured values).
    max_channels: int = 10000
    max_sessions: int = 100000
    max_sessions_per_user: int = 20
    max_session_bytes: int = 65536
    max_sessions_bytes: int = 268435456
    #: this node's id among the nodes sharing the engine ("" until known: the daemon names a memory engine's node)
    node_id: str = ""

    def __init__(self) -> None:
        #: whether a channel instance has subscribers on this node (the hub sets it): instances in use
        #: are never freed
        self.in_use: Callable[[str], bool] = _never
        #: called when a shared engine's bus missed messages of a channel with subscribers here that its
        #: history can no longer fill: (channel, last position delivered here, the channel's position now)
        self.on_gap: Callable[[str, StreamPosition, StreamPosition], None] = _no_gap
        #: called when another node resumed a session (session id, owner): a connection here still holding it
        #: must end (the hub sets it)
        self.on_takeover: Callable[[str, str], None] = _no_takeover
        #: serves this node's part of a control request (method, params) -> ``{"result": ...}`` or
        #: ``{"error": {"code", "message"}}``, never raising (the control server sets it)
        self.on_control: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]] = _no_control

    def set_limits(self, limits: Any) -> None:
        """The ``[limits]`` section, at start and after each reload."""
        self.max_channels = limits.max_history_channels
        self.max_sessions = limits.max_sessions
        self.max_sessions_per_user = limits.max_sessions_per_user
        self.max_session_bytes = limits.max_session_bytes
        self.max_sessions_bytes = limits.max_sessions_bytes

    def sweep(self) -> None:
        """Called by the hub's once-a-second sweep: free expired sessions and unused channel instances."""

    def memory_stats(self) -> dict[str, Any]:
        """What the engine holds and has freed: sessions and channel instances (for metrics)."""
        return {}

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
    async def save_session(self, session_id: str, owner: str, blob: bytes, ttl_s: float) -> bool:
        """Keep a disconnected session (``blob``, its encoded state, which the engine does not read) for
        ``ttl_s``, counted against ``owner`` (its tenant and user); False when it is larger than ``max_session_bytes``
        (nothing is kept, and an older session under that id is dropped). The owner's and the store's
        oldest sessions are evicted beyond ``max_sessions_per_user`` / ``max_sessions``."""

    async def save_live_sessions(self, sessions: list[tuple[str, str, bytes]], ttl_s: float) -> None:
        """Keep the sessions of live connections (``(session_id, owner, blob)`` each) for ``ttl_s``, so they can be
        resumed if this process dies (engines with ``durable_sessions``). Live sessions are bounded by the
        connection limits: they are not counted or evicted as disconnected ones (the save at close is)."""
        raise NotImplementedError(f"the {self.name} engine does not keep live sessions")

    async def announce_takeover(self, session_id: str, owner: str) -> None:
        """Tell the other nodes that this node resumed ``session_id`` of ``owner`` (shared engines): a
        connection of theirs still holding it ends (``on_takeover`` there)."""

    @abc.abstractmethod
    async def load_session(self, session_id: str) -> bytes | None:
        """The session's blob as saved, or None (unknown or expired)."""

    @abc.abstractmethod
    async def drop_session(self, session_id: str) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}

    def bus_metrics(self) -> dict[str, Any] | None:
        """A shared engine's bus: messages received per kind, the channels subscribed, fills and gaps (None:
        no bus, this process only)."""
        return None

    def live_nodes(self) -> list[str] | None:
        """The nodes sharing this engine that are alive (a shared engine), or None (this process only)."""
        return None

    async def control(self, method: str, params: dict[str, Any], nodes: list[str] | None = None,
                      deadline_s: float = CONTROL_DEADLINE_S) -> ClusterReply:
        """Ask ``nodes`` (None: every live node, this one included) to serve a control request and collect their
        replies until all answered or ``deadline_s`` passed; the nodes that did not answer are ``missing``.

        This process only (the memory engine): this node serves it, whatever ``nodes`` names but itself is
        missing at once. A shared engine carries the request to the other nodes (engine/redis_control.py).
        """
        me = self.node_id
        missing = sorted(n for n in (nodes or ()) if n != me)
        if nodes is not None and me not in nodes:
            return ClusterReply({}, missing)
        return ClusterReply({me: await self.on_control(method, params)}, missing)
