"""What the daemon holds per connection and per subscription.

Everything here is ``__slots__`` and allocated lazily: most connections never need an
outbox, a circuit breaker, a message rate bucket or reliable-delivery state, so those stay
``None`` until first use (RSS per idle connection is a product figure).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from wsd.core.auth import Claims
    from wsd.core.breaker import CircuitBreaker
    from wsd.core.channels import Principal
    from wsd.core.outbox import Outbox
    from wsd.core.ratelimit import TokenBucket

# Connection states (the first three are the protocol's CONNECTION_STATES).
CONNECTING = "connecting"
CONNECTED = "connected"
DISCONNECTING = "disconnecting"
DISCONNECTED = "disconnected"
ERROR = "error"

# Subscription modes, by wire name.
REALTIME = "realtime"
BATCH = "batch"
ON_DEMAND = "on_demand"
HISTORICAL = "historical"
MODES = (REALTIME, BATCH, ON_DEMAND, HISTORICAL)
# the modes as upper-case enum-style names (a subscription's `type` field)
MODE_ENUM_NAMES = {REALTIME: "REAL_TIME", BATCH: "BATCH", ON_DEMAND: "ON_DEMAND", HISTORICAL: "HISTORICAL"}


class Subscription:
    """One connection's interest in one channel instance."""

    __slots__ = ("active", "channel", "conn", "created_at", "epoch", "group", "held", "id", "mode", "offset",
                 "pending", "timer", "types")

    def __init__(self, sub_id: str, conn: Conn, channel: str, group: str, mode: str,
                 types: frozenset[str] | None, created_at: float) -> None:
        self.id = sub_id
        self.conn = conn
        self.channel = channel
        self.group = group
        self.mode = mode
        self.types = types
        self.created_at = created_at
        self.active = True
        # The position: the last offset written to this connection for this channel, in ``epoch``. It moves
        # only through ``advance`` (and ``restart``); the fan-out loop inlines ``advance`` (see there).
        self.offset = 0
        self.epoch = ""
        self.pending: list[Any] | None = None   # live messages held while history is being sent
        self.held: deque[Any] | None = None      # batch buffer or on_demand store
        self.timer: Any = None                   # the batch flush timer handle

    def advance(self, offset: int, epoch: str) -> None:
        """Move the position to a message written to the connection (the one owner of this rule).

        Within one epoch the position only rises: a message written late (a queued one, a replayed one)
        never moves it back. A message of another epoch (its instance was freed and created again, or a
        shared engine lost it) restarts the position in that epoch: an offset of the old epoch means
        nothing in the new one. An empty epoch (a message with no stream) keeps the current one.

        ``Hub._fanout_one`` and the coalesced write inline this for live messages, which reach a
        receiver in publication order (so "rise or change epoch" is "take the message's position").
        """
        if epoch and epoch != self.epoch:
            self.offset = offset
            self.epoch = epoch
        elif offset > self.offset:
            self.offset = offset

    def restart(self, offset: int, epoch: str) -> None:
        """Set the position outright: a resumed subscription's saved position, or a stream that could not
        be recovered restarting before what is held for the client. The only way it may move back."""
        self.offset = offset
        self.epoch = epoch

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "channel": self.channel, "group": self.group, "mode": self.mode,
                "type": MODE_ENUM_NAMES[self.mode], "types": sorted(self.types) if self.types else [],
                "active": self.active, "created_at": self.created_at,
                "position": {"offset": self.offset, "epoch": self.epoch},
                "held": len(self.held) if self.held else 0,
                "connection_id": self.conn.id}


class Unacked:
    """A reliable message sent and not acknowledged yet."""

    __slots__ = ("ack_timeout_s", "due", "payload", "priority", "retries")

    def __init__(self, payload: bytes, priority: int, due: float, retries: int, ack_timeout_s: float) -> None:
        self.payload = payload
        self.priority = priority
        self.due = due                      # when it is sent again (monotonic)
        self.retries = retries              # resends left
        self.ack_timeout_s = ack_timeout_s


class ReliableState:
    """Per-connection reliable delivery: the next seq and the unacked messages by seq."""

    __slots__ = ("next_seq", "resent", "unacked", "given_up")

    def __init__(self) -> None:
        self.next_seq = 1
        self.unacked: dict[int, Unacked] = {}
        self.resent = 0
        self.given_up = 0


class Conn:
    """One WebSocket connection: its identity, subscriptions, outbound queue, breaker and metrics."""

    __slots__ = (
        "breaker", "bytes_in", "bytes_out", "claims", "closing", "company_id", "congested_since", "created_at",
        "created_mono", "drops_expired", "drops_overflow", "errors", "exp", "extensions", "id", "last_activity",
        "last_heartbeat", "latency_ms", "latency_n", "msgs_in", "msgs_out", "outbox", "overflows",
        "ping_data", "ping_due", "ping_sent_at", "pings_missed", "pool", "principal", "proto", "protocol_version",
        "rate", "reconnections", "reliable", "remote_address", "session_id", "state", "subprotocol", "subs",
        "token_source", "transport", "user_agent", "user_id", "ws", "close_code", "close_reason",
        "health_recoveries", "restoring", "resumed", "session_mark", "session_saved_at", "taken_over", "unread",
    )

    def __init__(self, conn_id: str, ws: ServerConnection, pool: Any, claims: Claims, principal: Principal,
                 session_id: str, now: float, wall: float) -> None:
        self.id = conn_id
        self.ws = ws
        self.proto = ws.protocol
        self.transport = ws.transport
        self.pool = pool
        self.claims = claims
        self.principal = principal
        self.user_id = claims.user_id
        self.company_id = claims.company_id
        self.session_id = session_id
        self.state = CONNECTING
        self.created_at = wall
        self.created_mono = now
        self.last_activity = now
        self.exp = claims.exp
        self.remote_address = ""
        self.user_agent = ""
        self.protocol_version = "13"
        self.extensions: tuple[str, ...] = ()
        self.subprotocol = ""
        self.token_source = ""
        self.subs: dict[str, Subscription] = {}
        self.outbox: Outbox | None = None
        self.breaker: CircuitBreaker | None = None
        self.rate: TokenBucket | None = None
        self.reliable: ReliableState | None = None
        self.congested_since: float | None = None
        self.overflows = 0
        self.msgs_in = 0
        self.msgs_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops_overflow = 0
        self.drops_expired = 0
        self.errors = 0
        self.reconnections = 0
        self.latency_ms = 0.0
        self.latency_n = 0
        self.last_heartbeat = 0.0
        self.ping_data: bytes | None = None
        self.ping_sent_at = 0.0
        self.ping_due = 0.0
        self.pings_missed = 0
        self.closing = False
        self.close_code = 0
        self.close_reason = ""
        self.health_recoveries = 0
        self.resumed = False
        # The live session as last written to a durable engine (see Lifecycle.flush_sessions): a mark of
        # its positions (None: never written, or must be written again) and when (monotonic; 0: never).
        self.session_mark: int | None = None
        self.session_saved_at = 0.0
        self.taken_over = False  # another connection resumed this session: it owns the session now
        self.unread = b""  # received bytes not yet handed to websockets' parser (WsdServerConnection.data_received)
        # The session this connection resumes, until its subscriptions and reliable state are all back: a
        # takeover meanwhile moves what is restored so far and, from this, what is not yet.
        self.restoring: Any = None

    def queue_depth(self) -> int:
        return len(self.outbox) if self.outbox is not None else 0

    def breaker_state(self) -> str:
        return self.breaker.state.value if self.breaker is not None else "closed"

    def summary(self, now: float, wall: float) -> dict[str, Any]:
        """The row shown in connection tables."""
        return {
            "id": self.id, "pool": self.pool.id, "pool_type": self.pool.type, "user_id": self.user_id,
            "company_id": self.company_id, "roles": list(self.claims.roles), "state": self.state,
            "remote_address": self.remote_address, "age_s": round(now - self.created_mono, 1),
            "msgs_in": self.msgs_in, "msgs_out": self.msgs_out, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "queue": self.queue_depth(), "breaker": self.breaker_state(),
            "latency_ms": round(self.latency_ms, 2), "subscriptions": len(self.subs),
            "drops": self.drops_overflow + self.drops_expired,
        }

    def metrics(self, now: float) -> dict[str, Any]:
        """The connection's counters as `connections.get` shows them under `metrics`."""
        return {
            "messages_sent": self.msgs_out, "messages_received": self.msgs_in,
            "bytes_sent": self.bytes_out, "bytes_received": self.bytes_in,
            "avg_latency_ms": round(self.latency_ms, 3),
            "connection_duration": int(now - self.created_mono),
            "reconnection_count": self.reconnections, "last_heartbeat": self.last_heartbeat,
            "drops_overflow": self.drops_overflow, "drops_expired": self.drops_expired,
            "errors": self.errors, "pings_missed": self.pings_missed,
        }

    def as_conn_mapping(self) -> dict[str, Any]:
        """What ``conn`` is inside routing expressions."""
        return {"id": self.id, "pool": self.pool.id, "pool_type": self.pool.type, "user_id": self.user_id,
                "company_id": self.company_id, "roles": list(self.claims.roles), "state": self.state,
                "remote_address": self.remote_address}
