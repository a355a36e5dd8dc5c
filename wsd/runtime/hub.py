"""The hub: every live connection, the subscription index, publishing and routing.

``Hub`` is made of three parts: this module (registry, subscriptions, publish, routing rules, history
read back, explain and trace), ``Delivery`` (delivery.py: the fan-out hot path, coalescing, outboxes,
drain, reliable delivery) and ``Lifecycle`` (lifecycle.py: closing, the sweep, heartbeats, recovery,
kicks). The daemon builds it with its collaborators (config, engine, event sink, limiters, clock); it
never calls back into the daemon. A disconnected session's format is session.py's.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from wsd import errors
from wsd.config import data_schema_of, sealers_of
from wsd.core.channels import ChannelError
from wsd.core.encryption import ALGORITHM
from wsd.core.frames import encode_publishable
from wsd.core.history import StreamPosition
from wsd.core.outbox import PRIORITY_NAMES, Priority
from wsd.core.router import Route, RoutedMessage, RuleTable
from wsd.core.schema import OVER_BUDGET
from wsd.engine.base import Publication
from wsd.runtime.conn import (
    BATCH,
    CONNECTED,
    DISCONNECTED,
    HISTORICAL,
    ON_DEMAND,
    REALTIME,
    Conn,
    Subscription,
)
from wsd.runtime.delivery import (
    HISTORY_TAIL,
    Delivery,
    Outgoing,
    encode_push,
    stored_push,
)
from wsd.runtime.heap import HeapTrimmer
from wsd.runtime.lifecycle import Lifecycle
from wsd.runtime.stats import Stats
from wsd.runtime.wsadapter import OPEN

if TYPE_CHECKING:
    from wsd.engine.base import Engine
    from wsd.runtime.events import Events

_perf = time.perf_counter  # latency figures need sub-millisecond resolution (uvloop's loop.time() is 1 ms)
_floor = math.floor  # a publication's ts is rounded to the microsecond as floor(x * 1e6 + 0.5) / 1e6: round(x, 6)
#                      gives the same number at five times the cost
_CANON_MODES = {m: m for m in (REALTIME, BATCH, ON_DEMAND, HISTORICAL)}


class InvalidData(ChannelError):
    """A publication whose data fails its channel group's ``data_schema``: the reply's code is ``invalid_data``."""

    def __init__(self, message: str, costly: bool = False) -> None:
        super().__init__(errors.INVALID_DATA, message)
        self.costly = costly  # validating it used the whole time budget: a client's frame error


class Hub(Delivery, Lifecycle):
    """Connections, subscriptions, publish and delivery for one daemon process."""

    def __init__(self, config: Any, engine: Engine, events: Events, *, limiters: Iterable[Any] = (),
                 clock: Callable[[], float] | None = None) -> None:
        """A hub for ``config`` (the running settings), storing and reading through ``engine``, reporting to
        ``events`` (``emit``/``audit``). ``limiters`` are swept by ``sweep_memory``. ``clock`` is the
        monotonic clock (the event loop's by default; tests pass a hand-moved one)."""
        self.engine = engine
        self.events = events
        self.loop = asyncio.get_running_loop()
        self.now = clock if clock is not None else self.loop.time
        self.conns: dict[str, Conn] = {}
        self.by_channel: dict[str, dict[str, Subscription]] = {}
        self.by_user: dict[str, set[Conn]] = {}
        self.pool_counts: dict[str, int] = {}
        self.stats = Stats()
        self._dirty: set[Conn] = set()
        self._replied: set[Conn] = set()  # connections answered in this loop turn (Delivery.send_reply)
        self._id_pool = ""  # random hex digits publication ids are cut from (publication_id)
        self._id_at = 0
        self._drain_handle: asyncio.Handle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ping_seq = 0
        self._win: dict[str, list[Outgoing]] = {}
        self._win_timer: dict[str, asyncio.TimerHandle] = {}
        self.last_fanout: dict[str, float] = {}
        self.heap = HeapTrimmer()
        self._memory_swept = 0.0
        self._session_flush: asyncio.Task[None] | None = None
        self._sessions_flushed = 0.0
        self._sessions_failing = False
        self.configure(config, limiters=limiters)

    # -- configuration -------------------------------------------------------------------------------
    def configure(self, cfg: Any, *, limiters: Iterable[Any] = ()) -> None:
        """Take the settings of ``cfg`` (at start and at each reload) and hand the engine its part."""
        self.limiters = tuple(limiters)
        self.max_json_depth = cfg.limits.max_json_depth
        self.drain_timeout_s = cfg.manager.drain_timeout_ms / 1000.0
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
        self.sealers = sealers_of(cfg)  # encrypted channel groups: group id -> Sealer of its current key
        engine = self.engine
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
        if not conn.taken_over:  # (a taken-over connection gave its seat up when it was taken over)
            self.pool_counts[conn.pool.id] -= 1
        for sub in list(conn.subs.values()):
            self._unindex(sub)
        self._dirty.discard(conn)
        conn.state = DISCONNECTED
        # The manager's expiry count is the closed connections' plus the live ones' (metrics.py): keep
        # this connection's drops once it leaves, so the counter never goes down.
        self.stats.dropped_expired += conn.drops_expired
        self.stats.retire(conn)  # its pool keeps its counts: per-pool counters never go down
        lost = conn.queue_depth()
        if lost:
            conn.outbox.drain_all()  # type: ignore[union-attr]
            self.stats.dropped_on_close += lost
            self.events.audit("undelivered_on_close", connection_id=conn.id, user_id=conn.user_id,
                              count=lost, code=conn.close_code)

    def user_connections(self, user_id: str, company_id: str | None = None) -> int:
        """Open connections of ``user_id`` (of ``company_id`` only, when given: user ids are per tenant)."""
        s = self.by_user.get(user_id)
        if not s:
            return 0
        # (one taken over is closing and holds no seat: the connection that took its session over does)
        return sum(1 for c in s if not c.taken_over and (company_id is None or c.company_id == company_id))

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
        problem, raw = encode_publishable(msg_type, data, self.max_json_depth)
        if problem is not None:
            raise ChannelError(errors.BAD_REQUEST, problem)
        if channel and self.schemas:
            schema = self.schemas.get(group)
            if schema is not None:
                self._check_data(schema, channel, msg_type, data, source)
        enc = ""
        if channel and self.sealers:
            sealer = self.sealers.get(group)
            if sealer is not None:
                # Once per publication, before anything is stored or sent: history, the engine and every
                # receiver get the same envelope (the schema above checked the plaintext).
                data, enc = sealer.seal(channel, data), ALGORITHM
                raw = msgspec.json.encode(data)  # what is sent is the envelope, not the plaintext checked above
        now = self.now()
        wall = time.time()
        pub = Publication(id=self.publication_id(), channel=channel, group=group, type=msg_type,
                          priority=priority, data=data, ts=_floor(wall * 1e6 + 0.5) / 1e6, ttl_s=ttl_s, source=source,
                          user_id=user_id, company_id=company_id,
                          expires_at=(now + ttl_s) if ttl_s else None, enc=enc)
        self.stats.published += 1
        engine = self.engine
        gcfg = self.groups.get(group) if channel else None
        size = gcfg.history_size if gcfg is not None else 0
        ttl = float(gcfg.history_ttl_s) if gcfg is not None else 0.0
        if engine.shared:
            # A shared engine numbers the message and hands it to every node, this one included, so all
            # nodes deliver one channel's messages in the same order; the count is not known here.
            scope = {"broadcast": broadcast, "pools": tuple(pools), "companies": tuple(companies)}
            if channel and not broadcast and self.rules.may_reach_beyond(pub):
                scope["wide"] = True  # to every node, not only those with subscribers of the channel
            await engine.publish(pub, size, ttl, scope)
            return {"id": pub.id, "channel": channel, "offset": pub.offset, "epoch": pub.epoch,
                    "delivered": None, "shared": True}
        if gcfg is not None:
            await engine.publish(pub, size, ttl)
        pub.payload = encode_push(pub, msgspec.Raw(raw))  # data as checked above: not encoded twice
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

    def publication_id(self) -> str:
        """A new publication id: 16 random hex digits, as ``secrets.token_hex(8)`` gives, cut from a pool
        of random bytes read 512 ids at a time (one read of the OS's random source for 512 publications)."""
        i = self._id_at
        if i >= len(self._id_pool):
            self._id_pool = secrets.token_hex(4096)
            i = 0
        self._id_at = i + 16
        return self._id_pool[i:i + 16]

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
        problem = schema.problem_quoted_and_not(data)
        if problem is None:
            return
        path, reason, unquoted = problem
        self.stats.invalid_data += 1
        # jsonschema's reasons quote the value: an encrypted group's plaintext is never kept, not even in audit
        self.events.audit("invalid_data", source=source, channel=channel, msg_type=msg_type[:100], path=path,
                          reason=unquoted if channel.split("/")[0] in self.sealers else reason)
        raise InvalidData(f"data does not match the schema of {channel.split('/')[0]}: at {path}: {reason}",
                          costly=reason == OVER_BUDGET)

    def on_remote(self, pub: Publication, scope: dict[str, Any] | None = None) -> None:
        """A publication from the shared engine's bus (any node, this one included): deliver locally."""
        now = self.now()
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
            out = self.outgoing(pub, now)
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
                        plain = self.outgoing(pub, now)
                    self.deliver(conn, plain)
                else:
                    # One encode per (rule, pool): never per receiver.
                    key = (id(route), conn.pool.id)
                    out = cache.get(key)
                    if out is None:
                        out = cache[key] = self.outgoing(pub, now, route.apply(pub.data, conn.pool.id))
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
        pub.decode_raw()  # read back from a shared engine still encoded: rules see data
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

    # -- history and sessions ---------------------------------------------------------------------
    async def history(self, channel: str, limit: int | None, since: StreamPosition | None) -> Any:
        return await self.engine.history(channel, limit=limit, since=since)

    # -- a shared engine's bus ------------------------------------------------------------------------
    def on_bus_gap(self, channel: str, since: StreamPosition, position: StreamPosition) -> None:
        """The engine's bus missed messages of ``channel`` after ``since`` that its history no longer holds:
        each subscriber here gets a ``recovery`` push (``recovered: false``) before anything later."""
        subs = self.by_channel.get(channel)
        if not subs:
            return
        self.flush_channel(channel)  # what came before the hole goes first
        payload = msgspec.json.encode({"type": "recovery", "channel": channel, "recovered": False,
                                "position": {"offset": position.offset, "epoch": position.epoch},
                                "since": {"offset": since.offset, "epoch": since.epoch}})
        for sub in list(subs.values()):
            self.send_direct(sub.conn, payload, Priority.CRITICAL)
