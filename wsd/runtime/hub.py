"""The hub: every live connection, the subscription index, and the delivery pipeline.

The per-message hot path (``fanout``) encodes one frame per message and writes that same
frame to every receiver whose queue is empty and whose transport is below its high-water
mark, as ``websockets.broadcast()`` does, without logging or allocating per receiver. Only
congested receivers take the queued path (priority outbox, circuit breaker, adaptive batch
frames), drained when their transport asks for more (``resume_writing``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from wsd import errors
from wsd.config import data_schema_of
from wsd.core.breaker import BreakerState, CircuitBreaker
from wsd.core.channels import ChannelError
from wsd.core.frames import unpublishable
from wsd.core.history import StreamPosition
from wsd.core.outbox import PRIORITY_NAMES, Outbox, Priority
from wsd.core.router import Route, RoutedMessage, RuleTable
from wsd.core.schema import OVER_BUDGET
from wsd.engine.base import Publication
from wsd.runtime.conn import (
    BATCH,
    CONNECTED,
    DISCONNECTED,
    DISCONNECTING,
    HISTORICAL,
    ON_DEMAND,
    REALTIME,
    Conn,
    ReliableState,
    Subscription,
)
from wsd.runtime.heap import HeapTrimmer
from wsd.runtime.stats import Stats

if TYPE_CHECKING:
    from wsd.runtime.daemon import Daemon

log = logging.getLogger("wsd.hub")

OPEN = State.OPEN
_perf = time.perf_counter  # latency figures need sub-millisecond resolution (uvloop's loop.time() is 1 ms)
_CANON_MODES = {m: m for m in (REALTIME, BATCH, ON_DEMAND, HISTORICAL)}
_json_encode = msgspec.json.Encoder().encode
_BATCH_HEAD = b'{"type":"batch","messages":['
_BATCH_TAIL = b"]}"


def hard_abort(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP reset: the kernel drops what it still holds for a peer that stopped reading.

    A plain ``abort()`` only closes the fd; the kernel keeps the orphaned socket and its unsent data
    (up to net.ipv4.tcp_wmem max, 4 MiB by default) while it keeps probing a zero window.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def text_frame(payload: bytes) -> bytes:
    """One unmasked server text frame, serialized by websockets once for every receiver."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class Outgoing:
    """One encoded server push shared by every receiver that needs no per-receiver change."""

    __slots__ = ("_frame", "channel", "epoch", "expires_at", "offset", "payload", "priority", "pub_mono", "type")

    def __init__(self, payload: bytes, priority: int, expires_at: float | None, channel: str, offset: int,
                 msg_type: str, pub_mono: float) -> None:
        self.payload = payload
        self.priority = priority
        self.expires_at = expires_at
        self.channel = channel
        self.offset = offset
        self.type = msg_type
        self.pub_mono = pub_mono
        self.epoch = ""
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        f = self._frame
        if f is None:
            f = self._frame = text_frame(self.payload)
        return f


HISTORY_TAIL = b',"history":true}'


def stored_push(pub: Publication) -> bytes:
    """The publication's channel push, encoded once and kept on it."""
    payload = pub.payload
    if payload is None:
        payload = pub.payload = encode_push(pub)
    return payload


def note_position(sub: Subscription, offset: int, epoch: str) -> None:
    """Move a subscription's position to a message it was sent. A message of another epoch (its instance
    was freed and created again, or a shared engine lost it) restarts the position in that epoch: an
    offset of the old epoch means nothing in the new one."""
    if epoch and epoch != sub.epoch:
        sub.offset = offset
        sub.epoch = epoch
    elif offset > sub.offset:
        sub.offset = offset


def encode_push(pub: Publication, data: Any = None, seq: int | None = None, history: bool = False) -> bytes:
    msg: dict[str, Any] = {"type": "message", "channel": pub.channel, "offset": pub.offset, "epoch": pub.epoch,
                           "msg_type": pub.type, "priority": PRIORITY_NAMES[pub.priority], "ts": pub.ts,
                           "data": pub.data if data is None else data}
    if seq is not None:
        msg["seq"] = seq
    if history:
        msg["history"] = True
    return _json_encode(msg)


class InvalidData(ChannelError):
    """A publication whose data fails its channel group's ``data_schema``: the reply's code is ``invalid_data``."""

    def __init__(self, message: str, costly: bool = False) -> None:
        super().__init__(errors.INVALID_DATA, message)
        self.costly = costly  # validating it used the whole time budget: a client's frame error


class Hub:
    """Connections, subscriptions, publish and delivery for one daemon process."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.loop = asyncio.get_running_loop()
        self.conns: dict[str, Conn] = {}
        self.by_channel: dict[str, dict[str, Subscription]] = {}
        self.by_user: dict[str, set[Conn]] = {}
        self.pool_counts: dict[str, int] = {}
        self.stats = Stats()
        self._dirty: set[Conn] = set()
        self._drain_handle: asyncio.Handle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ping_seq = 0
        self._pong_done: asyncio.Future[float] = self.loop.create_future()
        self._pong_done.set_result(0.0)
        self._win: dict[str, list[Outgoing]] = {}
        self._win_timer: dict[str, asyncio.TimerHandle] = {}
        self._last_fanout: dict[str, float] = {}
        self.heap = HeapTrimmer()
        self._memory_swept = 0.0
        self.configure()

    # -- configuration -------------------------------------------------------------------------------
    def configure(self) -> None:
        cfg = self.daemon.config
        m = cfg.manager
        self.buffer_size = m.message_buffer_size
        self.high_water = m.write_high_water_bytes
        self.heartbeat_s = m.heartbeat_interval_ms / 1000.0
        self.missed_allowed = m.missed_pongs_allowed
        self.idle_s = m.connection_timeout_ms / 1000.0
        self.slow_s = m.slow_consumer_timeout_ms / 1000.0
        self.breaker_threshold = m.breaker_failure_threshold
        self.breaker_cooldown = m.breaker_cooldown_ms / 1000.0
        self.overflow_close = m.overflow_close_count
        self.health_error_rate = m.health_error_rate
        self.session_ttl = float(m.session_ttl_s)
        self.coalesce_s = m.coalesce_window_ms / 1000.0
        self.coalesce_max = m.coalesce_max_messages
        self.groups = cfg.channels
        self.rules = RuleTable(cfg.routing.rules)
        self.schemas = {gid: schema for gid, ch in cfg.channels.items()
                        if (schema := data_schema_of(ch)) is not None}
        engine = getattr(self.daemon, "engine", None)
        if engine is not None:
            engine.configure(cfg.channels)
            engine.set_limits(cfg.limits)
            engine.in_use = self.by_channel.__contains__  # instances with subscribers here are never freed

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep_loop())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass

    # -- registry ---------------------------------------------------------------------------------------
    def new_id(self) -> str:
        return secrets.token_hex(8)

    def register(self, conn: Conn) -> None:
        self.conns[conn.id] = conn
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        self.pool_counts[conn.pool.id] = self.pool_counts.get(conn.pool.id, 0) + 1
        conn.state = CONNECTED
        conn.ping_due = conn.created_mono + self.heartbeat_s
        self.stats.connections_total += 1

    def unregister(self, conn: Conn) -> None:
        if self.conns.pop(conn.id, None) is None:
            return
        users = self.by_user.get(conn.user_id)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.by_user[conn.user_id]
        self.pool_counts[conn.pool.id] -= 1
        for sub in list(conn.subs.values()):
            self._unindex(sub)
        self._dirty.discard(conn)
        conn.state = DISCONNECTED
        # The manager's expiry count is the closed connections' plus the live ones' (metrics.py): keep
        # this connection's drops once it leaves, so the counter never goes down.
        if conn.outbox is not None:
            conn.drops_expired = max(conn.drops_expired, conn.outbox.dropped_expired)
        self.stats.dropped_expired += conn.drops_expired
        self.stats.retire(conn)  # its pool keeps its counts: per-pool counters never go down
        lost = conn.queue_depth()
        if lost:
            conn.outbox.drain_all()  # type: ignore[union-attr]
            self.stats.dropped_on_close += lost
            self.daemon.audit("undelivered_on_close", connection_id=conn.id, user_id=conn.user_id,
                              count=lost, code=conn.close_code)

    def user_connections(self, user_id: str) -> int:
        s = self.by_user.get(user_id)
        return len(s) if s else 0

    # -- subscriptions ------------------------------------------------------------------------------
    def add_subscription(self, conn: Conn, channel: str, group: str, mode: str, types: frozenset[str] | None
                         ) -> Subscription:
        if channel in self._win:
            self._flush_window(channel)  # nobody may receive a message published before they subscribed
        old = conn.subs.get(channel)
        if old is not None:
            self._unindex(old)
        # The hot path compares modes by identity: always store the module's own constant.
        mode = _CANON_MODES[mode]
        sub = Subscription(secrets.token_hex(6), conn, channel, group, mode, types, time.time())
        if mode in (ON_DEMAND, BATCH):
            sub.held = deque(maxlen=self.buffer_size)
        conn.subs[channel] = sub
        if mode != HISTORICAL:
            self.by_channel.setdefault(channel, {})[conn.id] = sub
        self.stats.subscribes += 1
        return sub

    def remove_subscription(self, conn: Conn, channel: str) -> bool:
        sub = conn.subs.pop(channel, None)
        if sub is None:
            return False
        self._unindex(sub)
        self.stats.unsubscribes += 1
        return True

    def _unindex(self, sub: Subscription) -> None:
        if sub.channel in self._win:
            self._flush_window(sub.channel)  # what it was promised before leaving still goes out
        sub.active = False
        if sub.timer is not None:
            sub.timer.cancel()
            sub.timer = None
        subs = self.by_channel.get(sub.channel)
        if subs is not None and subs.get(sub.conn.id) is sub:
            del subs[sub.conn.id]
            if not subs:
                del self.by_channel[sub.channel]

    def presence(self, channel: str) -> dict[str, Any]:
        subs = self.by_channel.get(channel, {})
        users = sorted({s.conn.user_id for s in subs.values()})
        return {"channel": channel, "connections": len(subs), "users": users}

    # -- publishing ---------------------------------------------------------------------------------------
    async def publish(self, *, channel: str, group: str, msg_type: str, data: Any, priority: int,
                      ttl_s: float | None, source: str, user_id: str = "", company_id: str = "",
                      pools: Iterable[str] = (), companies: Iterable[str] = (), broadcast: bool = False,
                      trace: bool = False, trace_limit: int = 1000) -> dict[str, Any]:
        """Publish one message: store it in history, route it, deliver it. Returns what happened.

        Raises ChannelError (``bad_request``) for data that could not be sent again (too deep, not
        encodable): nothing is stored that would break every later reader of the history. Data that
        fails the channel group's ``data_schema`` raises ``InvalidData`` before anything is stored or
        delivered. ``trace=True`` delivers through ``trace_delivery`` and adds its report.
        """
        problem = unpublishable(msg_type, data, self.daemon.config.limits.max_json_depth)
        if problem is not None:
            raise ChannelError(errors.BAD_REQUEST, problem)
        if channel and self.schemas:
            schema = self.schemas.get(group)
            if schema is not None:
                self._check_data(schema, channel, msg_type, data, source)
        now = self.loop.time()
        wall = time.time()
        pub = Publication(id=secrets.token_hex(8), channel=channel, group=group, type=msg_type,
                          priority=priority, data=data, ts=round(wall, 6), ttl_s=ttl_s, source=source,
                          user_id=user_id, company_id=company_id,
                          expires_at=(now + ttl_s) if ttl_s else None)
        self.stats.published += 1
        engine = self.daemon.engine
        gcfg = self.groups.get(group) if channel else None
        size = gcfg.history_size if gcfg is not None else 0
        ttl = float(gcfg.history_ttl_s) if gcfg is not None else 0.0
        if engine.shared:
            # A shared engine numbers the message and hands it to every node, this one included, so all
            # nodes deliver one channel's messages in the same order; the count is not known here.
            scope = {"broadcast": broadcast, "pools": tuple(pools), "companies": tuple(companies)}
            await engine.publish(pub, size, ttl, scope)
            return {"id": pub.id, "channel": channel, "offset": pub.offset, "epoch": pub.epoch,
                    "delivered": None, "shared": True}
        if gcfg is not None:
            await engine.publish(pub, size, ttl)
        if trace:
            report = self.trace_delivery(pub, now, broadcast=broadcast, pools=tuple(pools),
                                         companies=tuple(companies), limit=trace_limit)
            self._keep_encoded(pub)
            return {"id": pub.id, "channel": channel, "offset": pub.offset, "epoch": pub.epoch,
                    "delivered": report["delivered"], "trace": report}
        t0 = _perf()
        delivered = self.route_and_deliver(pub, now, broadcast=broadcast, pools=tuple(pools),
                                           companies=tuple(companies))
        self.stats.observe_fanout(_perf() - t0)
        self._keep_encoded(pub)
        return {"id": pub.id, "channel": channel, "offset": pub.offset, "epoch": pub.epoch,
                "delivered": delivered}

    @staticmethod
    def _keep_encoded(pub: Publication) -> None:
        """A publication this process keeps in history (it has an offset) is held as its encoded push only:
        delivery is done with ``data``, and history is served from the payload."""
        if pub.offset:
            if pub.payload is None:
                pub.payload = encode_push(pub)
            pub.keep_payload_only()

    def _check_data(self, schema: Any, channel: str, msg_type: str, data: Any, source: str) -> None:
        """Refuse data that fails the channel group's schema: counted, audited once, never echoed."""
        problem = schema.problem(data)
        if problem is None:
            return
        path, reason = problem
        self.stats.invalid_data += 1
        self.daemon.audit("invalid_data", source=source, channel=channel, msg_type=msg_type[:100], path=path,
                          reason=reason)
        raise InvalidData(f"data does not match the schema of {channel.split('/')[0]}: at {path}: {reason}",
                          costly=reason == OVER_BUDGET)

    def on_remote(self, pub: Publication, scope: dict[str, Any] | None = None) -> None:
        """A publication from the shared engine's bus (any node, this one included): deliver locally."""
        now = self.loop.time()
        t0 = _perf()
        if scope:
            self.route_and_deliver(pub, now, broadcast=bool(scope.get("broadcast")),
                                   pools=tuple(scope.get("pools", ())), companies=tuple(scope.get("companies", ())))
        else:
            self.route_and_deliver(pub, now)
        self.stats.observe_fanout(_perf() - t0)

    def route_and_deliver(self, pub: Publication, now: float, *, broadcast: bool = False,
                          pools: tuple[str, ...] = (), companies: tuple[str, ...] = ()) -> int:
        if broadcast:
            self.flush_all()  # never let a later broadcast overtake messages held in a window
            targets = self._narrow(self.conns.values(), pools, companies)
            out = self._outgoing(pub, now)
            n = 0
            for conn in targets:
                self.deliver(conn, out)
                n += 1
            return n
        rules = self.rules
        if not len(rules):
            rules.messages_unrouted += 1  # no rule matched: there are none
            return self.fanout(pub, now)
        routes = rules.route(self._routed(pub))
        if not routes:
            return self.fanout(pub, now)
        self.flush_all()
        return self._deliver_routes(pub, now, routes)

    def _routed(self, pub: Publication) -> RoutedMessage:
        return RoutedMessage(type=pub.type, data=pub.data, channel=pub.channel, group=pub.group,
                             priority=PRIORITY_NAMES[pub.priority], user_id=pub.user_id,
                             company_id=pub.company_id, ttl_s=pub.ttl_s, source=pub.source, id=pub.id)

    def _outgoing(self, pub: Publication, now: float, data: Any = None) -> Outgoing:
        if data is None:
            # Encoded once per publication and kept on it: history is served from the same bytes.
            payload = pub.payload
            if payload is None:
                payload = pub.payload = encode_push(pub)
        else:
            payload = encode_push(pub, data)
        out = Outgoing(payload, pub.priority, pub.expires_at, pub.channel, pub.offset, pub.type, _perf())
        out.epoch = pub.epoch
        return out

    def fanout(self, pub: Publication, now: float) -> int:
        """Deliver ``pub`` to the subscribers of its channel: the hot path.

        Under a burst (a second message for the same channel within ``coalesce_window_ms``), messages
        are collected for the window and their frames written as ONE joined buffer shared by every
        receiver: one write per receiver per window instead of per message. A lone message, a critical
        one, or a channel at a quiet rate is written at once.
        """
        subs = self.by_channel.get(pub.channel)
        if not subs:
            return 0
        out = self._outgoing(pub, now)
        channel = pub.channel
        if self.coalesce_s > 0.0:
            win = self._win.get(channel)
            if out.priority == Priority.CRITICAL:
                if win is not None:
                    self._flush_window(channel)  # what came before goes first; critical is never held
            elif win is not None:
                win.append(out)
                if len(win) >= self.coalesce_max:
                    self._flush_window(channel)
                return len(subs)
            else:
                # "Recent" is measured from the END of the previous fan-out (a fan-out to 10,000
                # receivers takes tens of ms, and the loop's clock does not move during it).
                last = self._last_fanout.get(channel)
                if last is not None and _perf() - last < self.coalesce_s:
                    self._win[channel] = [out]
                    self._win_timer[channel] = self.loop.call_later(self.coalesce_s, self._flush_window, channel)
                    return len(subs)
            n = self._fanout_one(subs, out)
            self._last_fanout[channel] = _perf()
            return n
        return self._fanout_one(subs, out)

    def flush_all(self) -> None:
        """Write every coalescing window now (before a delivery that must not overtake them)."""
        if self._win:
            for channel in list(self._win):
                self._flush_window(channel)

    def flush_channel(self, channel: str) -> None:
        """Write a channel's coalescing window now, if it has one."""
        if channel in self._win:
            self._flush_window(channel)

    def _fanout_one(self, subs: dict[str, Subscription], out: Outgoing) -> int:
        frame = out.frame
        flen = len(frame)
        offset = out.offset
        epoch = out.epoch
        n = 0
        # The conditions below are written out inline, not called: a call per receiver would cost more
        # than the write. Tracing (trace_delivery) does not copy them: it observes what this code did.
        for sub in list(subs.values()) if len(subs) < 64 else tuple(subs.values()):
            conn = sub.conn
            if sub.mode is REALTIME and sub.types is None and sub.pending is None:
                if conn.outbox is None or not conn.outbox:
                    if conn.proto.state is OPEN and conn.transport.get_write_buffer_size() < self.high_water \
                            and conn.breaker is None:
                        conn.transport.write(frame)
                        conn.msgs_out += 1
                        conn.bytes_out += flen
                        sub.offset = offset
                        sub.epoch = epoch
                        n += 1
                        continue
                self._enqueue(conn, out)
                n += 1
            elif self._deliver_sub(sub, out, out):
                n += 1
        self.stats.delivered += n
        return n

    def _flush_window(self, channel: str) -> None:
        """Write a channel's coalesced messages: one shared buffer of their frames per receiver."""
        win = self._win.pop(channel, None)
        timer = self._win_timer.pop(channel, None)
        if timer is not None:
            timer.cancel()
        if not win:
            return
        subs = self.by_channel.get(channel)
        if not subs:
            return
        now = self.loop.time()
        win = [o for o in win if o.expires_at is None or o.expires_at > now]
        if len(win) <= 1:
            if win:
                self._fanout_one(subs, win[0])
            return
        k = len(win)
        last = win[-1]
        # The window's frames, joined once and shared by every receiver: the client sees exactly the
        # frames it would have seen, and the daemon pays one write per receiver instead of k.
        data = b"".join(o.frame for o in win)
        hw = self.high_water
        n = 0
        for sub in tuple(subs.values()):
            conn = sub.conn
            if sub.mode is REALTIME and sub.types is None and sub.pending is None \
                    and (conn.outbox is None or not conn.outbox) and conn.breaker is None \
                    and conn.proto.state is OPEN and conn.transport.get_write_buffer_size() < hw:
                conn.transport.write(data)
                conn.msgs_out += k
                conn.bytes_out += len(data)
                sub.offset = last.offset
                sub.epoch = last.epoch
                n += k
                continue
            for o in win:
                if sub.mode is REALTIME and sub.types is None and sub.pending is None:
                    self.deliver(conn, o)
                    n += 1
                elif self._deliver_sub(sub, o, o):
                    n += 1
        self.stats.coalesced += 1
        self.stats.delivered += n
        done = _perf()
        self._last_fanout[channel] = done
        self.stats.observe_fanout(done - win[0].pub_mono)

    def _deliver_sub(self, sub: Subscription, out: Outgoing, pub: Publication) -> bool:
        """The slow path of one subscription: type filter, history sync, batch and on_demand modes."""
        if sub.types is not None and pub.type not in sub.types:
            return False
        if sub.pending is not None:
            sub.pending.append(out)
            return True
        mode = sub.mode
        if mode is REALTIME:
            self.deliver(sub.conn, out)
            return True
        if mode is ON_DEMAND:
            held = sub.held
            if held is not None:
                if len(held) == held.maxlen:
                    sub.conn.drops_overflow += 1
                    self.stats.dropped_overflow += 1
                held.append(out)
            return True
        if mode is BATCH:
            if out.priority == Priority.CRITICAL:
                self.deliver(sub.conn, out)
                return True
            held = sub.held
            assert held is not None
            held.append(out)
            bcfg = sub.conn.pool.batching
            if len(held) >= bcfg.max_messages:
                self._flush_sub_batch(sub)
            elif sub.timer is None:
                sub.timer = self.loop.call_later(bcfg.interval_ms / 1000.0, self._flush_sub_batch, sub)
            return True
        return False

    def _flush_sub_batch(self, sub: Subscription) -> None:
        if sub.timer is not None:
            sub.timer.cancel()
            sub.timer = None
        held = sub.held
        if not held or not sub.active:
            return
        items = list(held)
        held.clear()
        now = self.loop.time()
        items = [o for o in items if o.expires_at is None or o.expires_at > now]
        if not items:
            return
        payload = _BATCH_HEAD + b",".join(o.payload for o in items) + _BATCH_TAIL
        last = items[-1]
        batch = Outgoing(payload, min(o.priority for o in items), None, sub.channel, last.offset, "batch",
                         items[0].pub_mono)
        batch.epoch = last.epoch
        self.deliver(sub.conn, batch, count=len(items))

    def _narrow(self, conns: Iterable[Conn], pools: tuple[str, ...], companies: tuple[str, ...]
                ) -> list[Conn]:
        if not pools and not companies:
            return list(conns)
        return [c for c in conns if (not pools or c.pool.id in pools)
                and (not companies or c.company_id in companies)]

    def _deliver_routes(self, pub: Publication, now: float, routes: Any) -> int:
        seen: set[str] = set()
        n = 0
        plain: Outgoing | None = None
        cache: dict[tuple[int, str], Outgoing] = {}
        for route in routes:
            conns = self.route_conns(route, pub)
            pred = route.conn_predicate
            msg_map = None
            for conn in conns:
                if conn.id in seen:
                    continue
                if pred is not None:
                    if msg_map is None:
                        msg_map = self._routed(pub).as_mapping()
                    if not pred(msg_map, conn.as_conn_mapping()):
                        continue
                seen.add(conn.id)
                identity = route.transform is None and not route.pool_transforms
                if route.reliable:
                    data = pub.data if identity else route.apply(pub.data, conn.pool.id)
                    self.deliver_reliable(conn, pub, data, route.max_retries, route.ack_timeout_s, now)
                elif identity:
                    if plain is None:
                        plain = self._outgoing(pub, now)
                    self.deliver(conn, plain)
                else:
                    # One encode per (rule, pool): never per receiver.
                    key = (id(route), conn.pool.id)
                    out = cache.get(key)
                    if out is None:
                        out = cache[key] = self._outgoing(pub, now, route.apply(pub.data, conn.pool.id))
                    self.deliver(conn, out)
                n += 1
        self.stats.delivered += n
        return n

    def route_conns(self, route: Route, pub: Publication) -> list[Conn]:
        """The connections a route's target names for ``pub``, before its conn predicate and de-duplication."""
        target = route.target
        ttype = target.type
        if ttype == "channel":
            return [s.conn for s in self.by_channel.get(pub.channel, {}).values()
                    if s.types is None or pub.type in s.types]
        if ttype == "individual":
            return [c for c in (self.conns.get(i) for i in target.connection_ids) if c is not None]
        if ttype == "group":
            return [s.conn for s in self.by_channel.get(self._group_instance(target.group_id, pub), {}).values()]
        # broadcast, or filtered (the rule's conn predicate does the filtering)
        return self._narrow(self.conns.values(), tuple(target.pools), tuple(target.company_ids))

    def _group_instance(self, group_id: str, pub: Publication) -> str:
        """The instance of a group that belongs to the message's own tenant: never another tenant's."""
        g = self.groups.get(group_id)
        if g is None:
            return ""
        if g.type in ("global", "admin"):
            return group_id
        if g.type == "company":
            return f"{group_id}/{pub.company_id}" if pub.company_id else ""
        return f"{group_id}/{pub.company_id}/{pub.user_id}" if pub.company_id and pub.user_id else ""

    # -- stored messages read back (history, replays) -------------------------------------------------
    def push_for(self, conn: Conn, pub: Publication) -> bytes | None:
        """A stored message's push as ``conn`` would have got it live: the routing rules decide.

        With no rule matching, the channel's push (the stored bytes). Otherwise the first matching rule whose
        target reaches ``conn`` shapes it (its transform and ``conn``'s pool transform), as in
        ``_deliver_routes``; None when no matching rule reaches ``conn`` (live delivery never sent it
        there, so history does not either). A channel target counts as reaching whoever may read the
        channel. Only with rules configured does this look at ``data``.
        """
        if not len(self.rules):
            return stored_push(pub)
        if isinstance(pub._data, msgspec.Raw):  # read back from a shared engine still encoded: rules see data
            pub.data = msgspec.json.decode(pub._data)
        routes = self.rules.matching(self._routed(pub))
        if not routes:
            return stored_push(pub)
        msg_map = None
        for route in routes:
            target = route.target
            ttype = target.type
            if ttype == "individual":
                if conn.id not in target.connection_ids:
                    continue
            elif ttype == "group":
                if self._group_instance(target.group_id, pub) not in conn.subs:
                    continue
            elif ttype != "channel" and not self._narrow((conn,), tuple(target.pools), tuple(target.company_ids)):
                continue
            if route.conn_predicate is not None:
                if msg_map is None:
                    msg_map = self._routed(pub).as_mapping()
                if not route.conn_predicate(msg_map, conn.as_conn_mapping()):
                    continue
            if route.transform is None and not route.pool_transforms:
                return stored_push(pub)
            return encode_push(pub, route.apply(pub.data, conn.pool.id))
        return None

    def history_push_for(self, conn: Conn, pub: Publication) -> bytes | None:
        """``push_for`` marked ``"history": true``."""
        p = self.push_for(conn, pub)
        return None if p is None else p[:-1] + HISTORY_TAIL

    # -- explaining and tracing (wsctl rules test, wsctl publish --trace) ------------------------------
    def explain_routing(self, pub: Publication) -> dict[str, Any]:
        """What ``route_and_deliver`` would do with ``pub``, without delivering it or counting hits.

        The rule walk is ``RuleTable.explain`` (the same match test as ``route``); each target's
        receivers come from ``route_conns`` with the same conn predicate and "first rule wins"
        de-duplication as ``_deliver_routes``; the data per pool is ``Route.apply``.
        """
        steps, routes = self.rules.explain(self._routed(pub))
        out: dict[str, Any] = {"rules": steps, "routed": bool(routes), "targets": []}
        if not routes:
            by_pool: dict[str, int] = {}
            filtered = 0
            for sub in self.by_channel.get(pub.channel, {}).values():
                if sub.types is not None and pub.type not in sub.types:
                    filtered += 1
                    continue
                by_pool[sub.conn.pool.id] = by_pool.get(sub.conn.pool.id, 0) + 1
            out["channel"] = {"channel": pub.channel, "connections": sum(by_pool.values()),
                              "filtered_by_type": filtered,
                              "by_pool": {pid: {"connections": n, "data": pub.data}
                                          for pid, n in sorted(by_pool.items())}}
            return out
        seen: set[str] = set()
        msg_map: dict[str, Any] | None = None
        for route in routes:
            reached: dict[str, int] = {}
            already = refused = 0
            pred = route.conn_predicate
            for conn in self.route_conns(route, pub):
                if conn.id in seen:
                    already += 1
                    continue
                if pred is not None:
                    if msg_map is None:
                        msg_map = self._routed(pub).as_mapping()
                    if not pred(msg_map, conn.as_conn_mapping()):
                        refused += 1
                        continue
                seen.add(conn.id)
                reached[conn.pool.id] = reached.get(conn.pool.id, 0) + 1
            target = route.target
            named = set(getattr(target, "pools", None) or ()) | set(route.pool_transforms)
            pools = sorted(set(reached) | named)
            out["targets"].append({
                "rule_id": route.rule_id, "type": target.type, "reliable": route.reliable,
                "connections": sum(reached.values()), "already_reached": already,
                "refused_by_expression": refused,
                "by_pool": {pid: {"connections": reached.get(pid, 0), "data": route.apply(pub.data, pid)}
                            for pid in pools},
                "data": route.apply(pub.data, ""),
            })
        return out

    def trace_delivery(self, pub: Publication, now: float, *, broadcast: bool = False,
                       pools: tuple[str, ...] = (), companies: tuple[str, ...] = (), limit: int = 1000
                       ) -> dict[str, Any]:
        """Deliver ``pub`` exactly as ``route_and_deliver`` does and report what happened per receiver.

        A separate path, so untraced messages pay nothing for tracing. It does not re-decide with
        copies of the fast path's conditions (which could drift): it snapshots each connection's
        counters, delivers through ``route_and_deliver`` itself, and classifies every connection by
        what changed: written, coalesced (held in the channel's burst window), queued (with depth and
        breaker state), batched / held (batch and on_demand subscriptions), dropped (overflow, closed),
        filtered (type filter), not reached (a rule's target left it out) or not subscribed. The result
        is as of the moment the publication was handed over; a queued message can still expire (ttl)
        or be dropped later, which the drop counters and the audit log record. ``receivers`` lists at
        most ``limit`` of them, those not written at once first; ``receivers_total`` counts them all.
        """
        channel = pub.channel
        self.flush_all()  # earlier windows go out first, so their writes are not taken for this message
        before: dict[str, tuple[int, int, int, int, int, bool]] = {}
        for conn in self.conns.values():
            sub = conn.subs.get(channel) if channel else None
            before[conn.id] = (conn.msgs_out, conn.queue_depth(), conn.drops_overflow,
                               len(sub.held) if sub is not None and sub.held is not None else 0,
                               len(sub.pending) if sub is not None and sub.pending is not None else 0,
                               conn.closing or conn.proto.state is not OPEN)
        routed = not broadcast and len(self.rules) > 0 and bool(self.rules.explain(self._routed(pub))[1])
        t_start = _perf()
        delivered = self.route_and_deliver(pub, now, broadcast=broadcast, pools=pools, companies=companies)
        self.stats.observe_fanout(_perf() - t_start)
        coalesced = bool(channel) and channel in self._win  # the window was empty before: it is ours
        scope = self._tenant_scope(pub) if channel and not broadcast else None
        rows: list[dict[str, Any]] = []
        not_subscribed: dict[str, int] = {}
        for conn in list(self.conns.values()):
            b = before.get(conn.id)
            if b is None:
                continue
            sub = conn.subs.get(channel) if channel else None
            row = {"connection_id": conn.id, "user_id": conn.user_id, "pool": conn.pool.id}
            outcome = self._trace_outcome(conn, sub, pub, b, t_start, coalesced, row)
            if outcome is None:
                if sub is None or sub.mode is HISTORICAL:
                    if scope is not None and scope(conn):
                        not_subscribed[conn.pool.id] = not_subscribed.get(conn.pool.id, 0) + 1
                    continue
                if sub.types is not None and pub.type not in sub.types:
                    outcome = "filtered"
                    types = ",".join(sorted(sub.types))  # the client's own strings: cut, never whole
                    row["reason"] = f"type filter {types[:80] + '…' if len(types) > 80 else types} excludes " \
                                    f"{pub.type[:80]}"
                elif b[5]:
                    outcome = "dropped"
                    row["reason"] = "closed"
                else:
                    outcome = "not_reached"
                    row["reason"] = "no matching rule's target includes it" if routed else "not delivered"
            row["outcome"] = outcome
            rows.append(row)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        if not_subscribed:
            counts["not_subscribed"] = sum(not_subscribed.values())
        total = len(rows)
        if total > limit:  # the unusual outcomes first: those are what a trace is read for
            rows.sort(key=lambda r: r["outcome"] in ("written", "coalesced"))
            del rows[limit:]
        return {"delivered": delivered, "routed": bool(routed), "counts": counts, "receivers": rows,
                "receivers_total": total,
                "not_subscribed": {"connections": sum(not_subscribed.values()), "by_pool": not_subscribed}}

    def _trace_outcome(self, conn: Conn, sub: Subscription | None, pub: Publication,
                       b: tuple[int, int, int, int, int, bool], t_start: float, coalesced: bool,
                       row: dict[str, Any]) -> str | None:
        """What happened to the traced message at ``conn`` (see ``trace_delivery``); None if nothing did."""
        out_d = conn.msgs_out - b[0]
        drops_d = conn.drops_overflow - b[2]
        held_d = (len(sub.held) if sub is not None and sub.held is not None else 0) - b[3]
        pending_d = (len(sub.pending) if sub is not None and sub.pending is not None else 0) - b[4]
        if not b[5] and conn.closing and sub is not None:
            # Closed by this very delivery (its queue overflowed once too often): what it held, this
            # message included, was dropped with it.
            row["reason"] = f"closed: {conn.close_reason or 'closing'}"
            return "dropped"
        ob = conn.outbox
        # Every Outgoing made for this publication was made after t_start (delivery is synchronous).
        ours_queued = ob is not None and any(item.pub_mono >= t_start for item in ob)
        if ours_queued:
            row["queue_depth"] = len(ob)  # type: ignore[arg-type]
            row["breaker"] = conn.breaker_state()
            if drops_d > 0:
                row["reason"] = "queue full: an older, less urgent message was dropped for it"
            return "queued"
        if pending_d > 0:
            row["reason"] = "held until the history replay of a resumed subscription is sent"
            return "queued"
        mode = sub.mode if sub is not None else None
        if mode is ON_DEMAND and (held_d > 0 or drops_d > 0):
            row["reason"] = "on_demand subscription: kept until the client pulls"
            if drops_d > 0:
                row["reason"] += " (the oldest held message was dropped for it)"
            return "held"
        if mode is BATCH and (held_d > 0 or out_d > 0) and pub.priority != Priority.CRITICAL:
            held = len(sub.held) if sub is not None and sub.held is not None else 0
            row["reason"] = (f"batch subscription: {held} held for its next frame" if held
                             else "batch subscription: its batch frame was written now")
            return "batched"
        if drops_d > 0:
            row["reason"] = "overflow: the queue is full of more urgent messages"
            row["queue_depth"] = conn.queue_depth()
            return "dropped"
        if out_d > 0:
            return "written"
        if coalesced and sub is not None and sub.active and sub.mode is not HISTORICAL \
                and (sub.types is None or pub.type in sub.types):
            row["reason"] = f"in the channel's burst window, written within {self.coalesce_s * 1000:g} ms"
            return "coalesced"
        if not b[5] and (conn.closing or conn.proto.state is not OPEN) and sub is not None:
            row["reason"] = "closed"
            return "dropped"
        return None

    def _tenant_scope(self, pub: Publication) -> Any:
        """Which connections could subscribe to ``pub``'s channel instance (its tenant), as a predicate."""
        g = self.groups.get(pub.group)
        kind = g.type if g is not None else "global"
        if kind == "company":
            return lambda c: c.company_id == pub.company_id
        if kind == "user":
            return lambda c: c.company_id == pub.company_id and c.user_id == pub.user_id
        if kind == "admin":
            return lambda c: c.pool.type == "admin"
        return lambda c: True

    # -- delivery to one connection ------------------------------------------------------------------
    def deliver(self, conn: Conn, out: Outgoing, count: int = 1) -> None:
        """Write now when nothing is queued and the transport has room; queue otherwise."""
        if (conn.outbox is None or not conn.outbox) and conn.breaker is None \
                and conn.proto.state is OPEN and conn.transport.get_write_buffer_size() < self.high_water:
            frame = out.frame
            conn.transport.write(frame)
            conn.msgs_out += count
            conn.bytes_out += len(frame)
            if out.offset and out.channel:
                sub = conn.subs.get(out.channel)
                if sub is not None:  # written in order: this is the position now, epoch included
                    sub.offset = out.offset
                    if out.epoch:
                        sub.epoch = out.epoch
            return
        self._enqueue(conn, out)

    def send_direct(self, conn: Conn, payload: bytes, priority: int = Priority.NORMAL) -> None:
        """A one-off push to one connection (wsctl send, history replay)."""
        self.deliver(conn, Outgoing(payload, priority, None, "", 0, "", _perf()))

    def _enqueue(self, conn: Conn, out: Outgoing) -> None:
        if conn.closing or conn.proto.state is not OPEN:
            return
        ob = conn.outbox
        if ob is None:
            ob = conn.outbox = Outbox(self.buffer_size)
        dropped = ob.push(out, out.priority, out.expires_at)
        if dropped is not None:
            conn.drops_overflow += 1
            conn.overflows += 1
            self.stats.dropped_overflow += 1
            if conn.overflows == 1 or conn.overflows % 100 == 0:
                self.daemon.audit("dropped_overflow", connection_id=conn.id, user_id=conn.user_id,
                                  total=conn.drops_overflow)
            if conn.overflows >= self.overflow_close:
                self.close_slow(conn, "queue overflow")
                return
        if conn.congested_since is None:
            conn.congested_since = self.loop.time()
        if conn.breaker is None or conn.breaker.state is BreakerState.CLOSED:
            self.schedule_drain(conn)

    def schedule_drain(self, conn: Conn) -> None:
        self._dirty.add(conn)
        if self._drain_handle is None:
            self._drain_handle = self.loop.call_soon(self._drain_dirty)

    def on_pause_writing(self, conn: Conn) -> None:
        """The transport went above its high-water mark: open the breaker, queue from now on."""
        now = self.loop.time()
        br = conn.breaker
        if br is None:
            br = conn.breaker = CircuitBreaker(self.breaker_threshold, self.breaker_cooldown)
        if br.state is BreakerState.HALF_OPEN:
            br.record_failure(now)
        else:
            br.trip(now)
        if conn.congested_since is None:
            conn.congested_since = now

    def on_resume_writing(self, conn: Conn) -> None:
        """The transport drained below its low-water mark: let the breaker try again."""
        if conn.state is CONNECTED:
            self.schedule_drain(conn)

    def _drain_dirty(self) -> None:
        self._drain_handle = None
        dirty = self._dirty
        self._dirty = set()
        now = self.loop.time()
        for conn in dirty:
            self._drain(conn, now)

    def _drain(self, conn: Conn, now: float) -> None:
        if conn.proto.state is not OPEN or conn.closing:
            return
        br = conn.breaker
        if br is not None and not br.allow(now):
            # Still cooling down: come back when the breaker may half-open.
            wait = max(0.0, (br.opened_at or now) + self.breaker_cooldown - now)
            self.loop.call_later(wait + 0.001, self.schedule_drain, conn)
            return
        ob = conn.outbox
        transport = conn.transport
        batching = conn.pool.batching.enabled
        max_batch = conn.pool.batching.max_messages
        while ob and transport.get_write_buffer_size() < self.high_water:
            if batching and len(ob) > 1 and ob.peek_priority() != Priority.CRITICAL:
                # Nothing critical is queued (peek): coalesce up to max_batch into one batch frame.
                items = ob.pop_many(now, max_batch)
                if not items:
                    continue
                if len(items) == 1:
                    self._write_item(conn, items[0][0], 1)
                else:
                    payload = _BATCH_HEAD + b",".join(o.payload for o, _ in items) + _BATCH_TAIL
                    frame = text_frame(payload)
                    transport.write(frame)
                    conn.msgs_out += len(items)
                    conn.bytes_out += len(frame)
                    for o, _ in items:
                        self._note_written(conn, o)
                    self.stats.batches += 1
            else:
                item = ob.pop(now)
                if item is None:
                    break
                self._write_item(conn, item[0], 1)
        conn.drops_expired = ob.dropped_expired if ob is not None else conn.drops_expired
        if ob is not None and not ob and transport.get_write_buffer_size() < self.high_water:
            conn.congested_since = None
            conn.overflows = 0
            if br is not None:
                br.record_success(now)
                if br.state is BreakerState.CLOSED:
                    conn.breaker = None

    def _write_item(self, conn: Conn, out: Outgoing, count: int) -> None:
        frame = out.frame
        conn.transport.write(frame)
        conn.msgs_out += count
        conn.bytes_out += len(frame)
        self._note_written(conn, out)
        self.stats.observe_queue_latency(_perf() - out.pub_mono)

    def _note_written(self, conn: Conn, out: Outgoing) -> None:
        if out.offset and out.channel:
            sub = conn.subs.get(out.channel)
            if sub is not None:
                note_position(sub, out.offset, out.epoch)

    # -- reliable delivery ----------------------------------------------------------------------------
    def deliver_reliable(self, conn: Conn, pub: Publication, data: Any, max_retries: int, ack_timeout_s: float,
                         now: float) -> int:
        rs = conn.reliable
        if rs is None:
            rs = conn.reliable = ReliableState()
        seq = rs.next_seq
        rs.next_seq += 1
        payload = encode_push(pub, data, seq=seq)
        rs.unacked[seq] = [payload, pub.priority, now + ack_timeout_s, max_retries, ack_timeout_s]
        out = Outgoing(payload, pub.priority, pub.expires_at, pub.channel, pub.offset, pub.type, _perf())
        out.epoch = pub.epoch
        self.deliver(conn, out)
        return seq

    def ack(self, conn: Conn, seq: int) -> bool:
        rs = conn.reliable
        if rs is None:
            return False
        return rs.unacked.pop(seq, None) is not None

    def _resend_due(self, conn: Conn, now: float) -> None:
        rs = conn.reliable
        if rs is None or not rs.unacked:
            return
        for seq, entry in list(rs.unacked.items()):
            if entry[2] > now:
                continue
            if entry[3] <= 0:
                del rs.unacked[seq]
                rs.given_up += 1
                self.stats.reliable_given_up += 1
                self.daemon.audit("reliable_given_up", connection_id=conn.id, user_id=conn.user_id, seq=seq)
                continue
            entry[3] -= 1
            entry[2] = now + entry[4]
            rs.resent += 1
            self.stats.reliable_resent += 1
            self.deliver(conn, Outgoing(entry[0], entry[1], None, "", 0, "", _perf()))

    # -- closing ----------------------------------------------------------------------------------------
    def close(self, conn: Conn, code: int, reason: str) -> None:
        """Start closing ``conn`` with ``code``; abort the transport if the close cannot be sent in time."""
        if conn.closing:
            return
        conn.closing = True
        conn.close_code = code
        conn.close_reason = reason
        conn.state = DISCONNECTING
        self._dirty.discard(conn)
        self.loop.create_task(self._close(conn, code, reason))

    def close_timeout(self) -> float:
        """How long a close handshake may take before the transport is aborted (seconds)."""
        return max(0.5, self.daemon.config.manager.drain_timeout_ms / 1000.0)

    async def _close(self, conn: Conn, code: int, reason: str) -> None:
        timeout = self.close_timeout()
        try:
            # A close reason is at most 123 bytes of UTF-8: cut by bytes, not characters.
            await asyncio.wait_for(conn.ws.close(code, reason.encode()[:123].decode("utf-8", "ignore")), timeout)
        except (asyncio.TimeoutError, Exception):
            pass
        if conn.ws.transport is not None and not conn.ws.transport.is_closing():
            hard_abort(conn.ws.transport)

    def close_slow(self, conn: Conn, why: str) -> None:
        if conn.closing:
            return
        self.stats.slow_consumers += 1
        lost = conn.queue_depth()
        self.daemon.emit("slow_consumer", connection_id=conn.id, user_id=conn.user_id, pool=conn.pool.id,
                         reason=why, queued=lost)
        self.daemon.audit("slow_consumer", connection_id=conn.id, user_id=conn.user_id, reason=why,
                          queued=lost)
        # Whatever is queued cannot be written: drop it now (counted) so the close frame goes out first.
        if conn.outbox is not None and lost:
            conn.outbox.drain_all()
            self.stats.dropped_on_close += lost
        self.close(conn, errors.SLOW_CONSUMER.code, f"slow consumer: {why}")
        # A client that never reads cannot receive the close frame: abort after a short grace.
        self.loop.call_later(2.0, self._abort_if_open, conn)

    def _abort_if_open(self, conn: Conn) -> None:
        tr = conn.ws.transport
        if tr is not None and not tr.is_closing() and tr.get_write_buffer_size() >= self.high_water:
            hard_abort(tr)

    # -- the periodic sweep: heartbeats, idle, expiry, resends, slow consumers, health ----------------
    async def _sweep_loop(self) -> None:
        period = min(1.0, max(0.05, self.heartbeat_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                self.sweep(self.loop.time(), time.time())
            except Exception:  # the sweep must never die
                log.exception("sweep failed")

    def sweep(self, now: float, wall: float) -> None:
        """One pass over every connection: cheap checks first, so 10,000 idle connections cost little."""
        self.stats.tick(now, self)
        if now - self._memory_swept >= 1.0:  # at most once a second, however short the heartbeat
            self._memory_swept = now
            self.sweep_memory(now)
        idle_before = now - self.idle_s
        slow_before = now - self.slow_s
        rate = self.health_error_rate
        for conn in list(self.conns.values()):
            if conn.closing or conn.state is not CONNECTED:
                continue
            if wall >= conn.exp:
                self.daemon.emit("token_expired", connection_id=conn.id, user_id=conn.user_id)
                self.close(conn, errors.TOKEN_EXPIRED.code, errors.TOKEN_EXPIRED.reason)
                continue
            if conn.last_activity <= idle_before:
                self.daemon.emit("idle_timeout", connection_id=conn.id, user_id=conn.user_id)
                self.close(conn, errors.IDLE_TIMEOUT.code, errors.IDLE_TIMEOUT.reason)
                continue
            if now >= conn.ping_due:
                self._heartbeat(conn, now, wall)
                if conn.closing:
                    continue
            if conn.congested_since is not None:
                if conn.congested_since <= slow_before:
                    self.close_slow(conn, f"congested for {now - conn.congested_since:.1f}s")
                    continue
                if conn.outbox and conn.breaker is None and conn.transport.get_write_buffer_size() == 0:
                    self.schedule_drain(conn)  # safety net: queued, room to write, nobody scheduled
            if conn.reliable is not None:
                self._resend_due(conn, now)
            if conn.errors >= 5 and conn.errors > rate * conn.msgs_in:
                self._recover(conn)

    def sweep_memory(self, now: float) -> None:
        """Free what nobody needs any more: expired sessions and unused channel instances (engine),
        fan-out timestamps of channels quiet for longer than the coalescing window, refilled limiter buckets."""
        self.daemon.engine.sweep()
        last = self._last_fanout
        if last:
            cutoff = _perf() - self.coalesce_s
            stale = [ch for ch, t in last.items() if t <= cutoff]
            for ch in stale:
                del last[ch]
        for name in ("ip_limiter", "user_limiter"):
            lim = getattr(self.daemon, name, None)
            if lim is not None:
                lim.sweep(now)
        self.heap.maybe_trim(now)  # what was just freed goes back to the system (at most every 30 s)

    def check_health(self, conn: Conn) -> None:
        """The sweep's error-rate test for one connection, now (after a frame that cost the daemon dearly)."""
        if not conn.closing and conn.errors >= 5 and conn.errors > self.health_error_rate * conn.msgs_in:
            self._recover(conn)

    def _recover(self, conn: Conn) -> None:
        """The seed's attemptConnectionRecovery: reset the breaker and resync once, then give up with 1011."""
        rate = conn.errors / max(1, conn.msgs_in)
        if conn.health_recoveries >= 1:
            self.daemon.emit("unhealthy", connection_id=conn.id, user_id=conn.user_id, error_rate=round(rate, 3))
            self.close(conn, errors.INTERNAL.code, f"unhealthy: error rate {rate:.0%}")
            return
        conn.health_recoveries += 1
        conn.errors = 0
        if conn.breaker is not None:
            conn.breaker.reset()
        self.daemon.emit("recovery", connection_id=conn.id, user_id=conn.user_id, error_rate=round(rate, 3))
        self.send_direct(conn, _json_encode({"type": "error", "error": {
            "code": "unhealthy", "message": f"error rate {rate:.0%} is above {self.health_error_rate:.0%}: "
                                            "fix the client's frames or the connection will be closed"}}),
                         Priority.CRITICAL)
        if conn.outbox:
            self.schedule_drain(conn)

    def _heartbeat(self, conn: Conn, now: float, wall: float) -> None:
        ws = conn.ws
        if conn.ping_data is not None and conn.ping_data in ws.pending_pings:
            conn.pings_missed += 1
            if conn.pings_missed >= self.missed_allowed:
                self.daemon.emit("heartbeat_timeout", connection_id=conn.id, user_id=conn.user_id,
                                 missed=conn.pings_missed)
                self.close(conn, errors.HEARTBEAT_TIMEOUT.code, errors.HEARTBEAT_TIMEOUT.reason)
                self.loop.call_later(2.0, self._abort_if_still, conn)
                return
        conn.ping_due = now + self.heartbeat_s
        if conn.proto.state is not OPEN:
            return
        self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
        data = struct.pack("!I", self._ping_seq)
        # websockets tracks pings in pending_pings; we give it one shared, already-done future, so a
        # pong schedules no callback: WsdServerConnection.acknowledge_pings calls on_pong directly.
        ws.pending_pings[data] = (self._pong_done, now)
        conn.ping_data = data
        # RTT from a high-resolution clock: loop.time() (what websockets measures with) is
        # millisecond-coarse under uvloop, so a sub-millisecond RTT would read as 0.
        conn.ping_sent_at = time.perf_counter()
        try:
            conn.proto.send_ping(data)
            ws.send_data()
        except Exception:
            conn.errors += 1

    def on_pong(self, conn: Conn, data: bytes) -> None:
        """A pong arrived (called synchronously by the connection): record the heartbeat and RTT."""
        if data != conn.ping_data:
            return
        rtt_ms = (time.perf_counter() - conn.ping_sent_at) * 1000.0
        conn.pings_missed = 0
        conn.last_activity = self.loop.time()  # a pong is activity: a listen-only subscriber is not idle
        conn.last_heartbeat = time.time()
        conn.latency_n += 1
        # Average latency over the connection's life, weighted to the recent (EWMA).
        conn.latency_ms = rtt_ms if conn.latency_n == 1 else conn.latency_ms * 0.8 + rtt_ms * 0.2

    def _abort_if_still(self, conn: Conn) -> None:
        tr = conn.ws.transport
        if tr is not None and not tr.is_closing():
            hard_abort(tr)

    # -- kick --------------------------------------------------------------------------------------------
    def select(self, ids: Iterable[str] = (), user: str = "", company: str = "", pool: str = "") -> list[Conn]:
        ids = list(ids)
        if ids:
            return [c for c in (self.conns.get(i) for i in ids) if c is not None]
        if not (user or company or pool):
            return []
        return [c for c in self.conns.values() if (not user or c.user_id == user)
                and (not company or c.company_id == company) and (not pool or c.pool.id == pool)]

    def kick(self, conns: list[Conn], reason: str) -> int:
        n = 0
        for conn in conns:
            if conn.closing:
                continue
            self.daemon.emit("kick", connection_id=conn.id, user_id=conn.user_id, pool=conn.pool.id,
                             reason=reason)
            self.daemon.audit("kick", connection_id=conn.id, user_id=conn.user_id, reason=reason)
            self.close(conn, errors.KICKED.code, reason or errors.KICKED.reason)
            n += 1
        return n

    # -- history and sessions ---------------------------------------------------------------------
    async def history(self, channel: str, limit: int | None, since: StreamPosition | None) -> Any:
        return await self.daemon.engine.history(channel, limit=limit, since=since)

    def session_state(self, conn: Conn) -> dict[str, Any]:
        subs = [{"channel": s.channel, "group": s.group, "mode": s.mode,
                 "types": sorted(s.types) if s.types is not None else None,
                 "offset": s.offset, "epoch": s.epoch} for s in conn.subs.values()]
        unacked = []
        if conn.reliable is not None:
            unacked = [[seq, e[0].decode(), e[1], e[3], e[4]] for seq, e in sorted(conn.reliable.unacked.items())]
        return {"user_id": conn.user_id, "company_id": conn.company_id, "pool": conn.pool.id, "subs": subs,
                "unacked": unacked, "next_seq": conn.reliable.next_seq if conn.reliable else 1,
                "reconnections": conn.reconnections}


    # -- a shared engine's bus ------------------------------------------------------------------------
    def on_bus_gap(self, channel: str, since: StreamPosition, position: StreamPosition) -> None:
        """The engine's bus missed messages of ``channel`` after ``since`` that its history no longer holds:
        each subscriber here gets a ``recovery`` push (``recovered: false``) before anything later."""
        subs = self.by_channel.get(channel)
        if not subs:
            return
        self.flush_channel(channel)  # what came before the hole goes first
        payload = _json_encode({"type": "recovery", "channel": channel, "recovered": False,
                                "position": {"offset": position.offset, "epoch": position.epoch},
                                "since": {"offset": since.offset, "epoch": since.epoch}})
        for sub in list(subs.values()):
            self.send_direct(sub.conn, payload, Priority.CRITICAL)
