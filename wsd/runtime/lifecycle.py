"""Connection-lifecycle policy: closing, the periodic sweep (token expiry, idle, heartbeats, slow consumers,
reliable resends, health), recovery and kicks. Every lifecycle event and audit record the hub reports is
decided here. ``Lifecycle`` is a part of ``Hub`` (hub.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from wsd import errors
from wsd.core.outbox import Priority
from wsd.runtime import session as saved
from wsd.runtime.conn import CONNECTED, DISCONNECTING, Conn
from wsd.runtime.wsadapter import OPEN, hard_abort, ping, start_close

if TYPE_CHECKING:
    from wsd.runtime.events import Events
    from wsd.runtime.stats import Stats

log = logging.getLogger("wsd.hub")

_perf = time.perf_counter
_json_encode = msgspec.json.Encoder().encode


#: connections the periodic sweep looks at in one go before it lets the loop serve others
SWEEP_SLICE = 1000


class Lifecycle:
    """When a connection is closed, pinged, recovered or kicked (a part of ``Hub``)."""

    # What it uses of the hub (set by Hub.__init__ / Hub.configure).
    loop: asyncio.AbstractEventLoop
    events: Events
    stats: Stats
    engine: Any
    conns: dict[str, Conn]
    by_user: dict[str, set[Conn]]
    limiters: tuple[Any, ...]
    heap: Any
    high_water: int
    heartbeat_s: float
    missed_allowed: int
    idle_s: float
    slow_s: float
    health_error_rate: float
    drain_timeout_s: float
    coalesce_s: float
    last_fanout: dict[str, float]
    session_ttl: float
    _session_flush: asyncio.Task[None] | None
    _sessions_flushed: float
    _sessions_failing: bool

    # -- closing ----------------------------------------------------------------------------------------
    def close(self, conn: Conn, code: int, reason: str) -> None:
        """Start closing ``conn`` with ``code``; abort the transport if the close cannot be sent in time."""
        if conn.closing:
            return
        if conn in self._dirty and conn.outbox:
            self._drain(conn, self.now())  # written before the close frame: what was due this turn (replies)
        conn.closing = True
        conn.close_code = code
        conn.close_reason = reason
        conn.state = DISCONNECTING
        self._dirty.discard(conn)
        start_close(conn, code, reason, self.close_timeout())

    def close_timeout(self) -> float:
        """How long a close handshake may take before the transport is aborted (seconds)."""
        return max(0.5, self.drain_timeout_s)

    def close_slow(self, conn: Conn, why: str) -> None:
        if conn.closing:
            return
        self.stats.slow_consumers += 1
        lost = conn.queue_depth()
        self.events.emit("slow_consumer", connection_id=conn.id, user_id=conn.user_id, pool=conn.pool.id,
                         reason=why, queued=lost)
        self.events.audit("slow_consumer", connection_id=conn.id, user_id=conn.user_id, reason=why,
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
                # The pass over the connections is cut in slices of SWEEP_SLICE, the loop serving everyone else
                # between them: at 10,000 connections one whole pass would hold every delivery up for tens of
                # milliseconds once a second, which is what a p99 latency sees.
                conns = self._sweep_start(self.now())
                for i in range(0, len(conns), SWEEP_SLICE):
                    if i:
                        await asyncio.sleep(0)
                    self._sweep_conns(conns[i:i + SWEEP_SLICE], self.now(), time.time())
            except Exception:  # the sweep must never die
                log.exception("sweep failed")

    def sweep(self, now: float, wall: float) -> None:
        """One pass over every connection: cheap checks first, so 10,000 idle connections cost little."""
        self._sweep_conns(self._sweep_start(now), now, wall)

    def _sweep_start(self, now: float) -> list[Conn]:
        """The sweep's once-per-pass work (stats, memory, live sessions); the connections to look at."""
        self.stats.tick(now, self)
        if now - self._memory_swept >= 1.0:  # at most once a second, however short the heartbeat
            self._memory_swept = now
            self.sweep_memory(now)
        # Once a second: the sweep's own 1 s sleep may wake a hair early (a coarse loop clock), hence 0.9.
        if self.engine.durable_sessions and self.session_ttl > 0 and now - self._sessions_flushed >= 0.9:
            self._sessions_flushed = now
            self.flush_sessions(now)
        return list(self.conns.values())

    def _sweep_conns(self, conns: list[Conn], now: float, wall: float) -> None:
        """The sweep's checks of ``conns``: token expiry, idle, heartbeat, slow consumer, resends, health."""
        idle_before = now - self.idle_s
        slow_before = now - self.slow_s
        rate = self.health_error_rate
        for conn in conns:
            if conn.closing or conn.state is not CONNECTED:
                continue
            if wall >= conn.exp:
                self.events.emit("token_expired", connection_id=conn.id, user_id=conn.user_id)
                self.close(conn, errors.TOKEN_EXPIRED.code, errors.TOKEN_EXPIRED.reason)
                continue
            if conn.last_activity <= idle_before:
                self.events.emit("idle_timeout", connection_id=conn.id, user_id=conn.user_id)
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

    # -- live sessions in a durable engine -------------------------------------------------------------
    # With an engine whose sessions outlive this process (Redis), a live connection's session is written as
    # it changes, so a client of a node that dies resumes on another: at once when its subscriptions change
    # (persist_session), and its positions by this sweep, at most once a second per connection, all dirty
    # sessions in one batch (one Redis pipeline). Dirtiness is found here by comparing a mark of the positions
    # (session.mark), not flagged where positions move: the fan-out loop moves them inline for every receiver,
    # and even a flag there would be per-receiver work on the hot path. An unchanged session is written again
    # once a third of the session TTL has passed, which keeps it from expiring while the connection lives.
    def flush_sessions(self, now: float) -> None:
        """Write every live session whose positions moved (or whose TTL needs refreshing), in one batch."""
        task = self._session_flush
        if task is not None and not task.done():
            return  # the engine is slow: the next sweep writes what changes meanwhile
        refresh_before = now - self.session_ttl / 3
        batch: list[tuple[str, str, bytes]] = []
        written: list[Conn] = []
        for conn in self.conns.values():
            if conn.closing or conn.state is not CONNECTED or not conn.session_saved_at:
                continue  # closing: the handler writes or drops it; not started yet: _start writes it
            m = saved.mark(conn)
            if m == conn.session_mark and conn.session_saved_at > refresh_before:
                continue
            state = saved.capture(conn)
            batch.append((conn.session_id, state.owner, saved.encode(state)))
            conn.session_mark = m
            conn.session_saved_at = now
            written.append(conn)
        if batch:
            self._session_flush = self.loop.create_task(self._write_sessions(batch, written))

    async def _write_sessions(self, batch: list[tuple[str, str, bytes]], written: list[Conn]) -> None:
        try:
            await self.engine.save_live_sessions(batch, self.session_ttl)
        except Exception as exc:  # noqa: BLE001  # the engine is down: write them again at the next sweep
            if not self._sessions_failing:  # once per outage, not once a second
                self._sessions_failing = True
                log.warning("writing %d live sessions failed (retried every second until it works): %s",
                            len(batch), exc)
            for conn in written:
                conn.session_mark = None
        else:
            if self._sessions_failing:
                self._sessions_failing = False
                log.info("writing live sessions works again (%d written)", len(batch))

    async def settle_sessions(self) -> None:
        """Wait for the live-session write in flight, so a write that follows is not overtaken by an older one."""
        task = self._session_flush
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def persist_session(self, conn: Conn) -> None:
        """Write ``conn``'s live session now (its subscriptions changed), with a durable engine."""
        if not self.engine.durable_sessions or self.session_ttl <= 0 or conn.closing or conn.taken_over:
            return  # (a session TTL of 0 means no resume at all)
        await self.settle_sessions()
        m = saved.mark(conn)
        state = saved.capture(conn)
        conn.session_mark = m
        conn.session_saved_at = self.now()
        try:
            await self.engine.save_live_sessions([(conn.session_id, state.owner, saved.encode(state))],
                                                 self.session_ttl)
        except Exception as exc:  # noqa: BLE001  # the sweep writes it again
            if not self._sessions_failing:  # once per outage (the sweep's next success says it is over)
                self._sessions_failing = True
                log.warning("writing the session of connection %s failed (retried every second until it "
                            "works): %s", conn.id, exc)
            conn.session_mark = None

    def session_holder(self, session_id: str, user_id: str) -> Conn | None:
        """The live connection of ``user_id`` on this node holding ``session_id``, if any."""
        for conn in self.by_user.get(user_id, ()):
            if conn.session_id == session_id and not conn.taken_over:
                # One closing with 1000 or kicked ends its session: that is not resumed, so not taken over.
                if conn.closing and conn.close_code in (1000, 4000):
                    return None
                return conn
        return None

    def session_ending(self, session_id: str, user_id: str, company_id: str) -> bool:
        """A connection here holding ``session_id`` is closing with 1000 or kicked: its session ends, so it is
        not resumed (even while the close handshake goes on and the engine still has it)."""
        return any(c.session_id == session_id and c.company_id == company_id and not c.taken_over
                   and c.closing and c.close_code in (1000, 4000) for c in self.by_user.get(user_id, ()))

    def take_over(self, conn: Conn) -> None:
        """``conn``'s session was resumed by another connection: close it with 4011; it neither keeps nor
        ends the session (the other connection owns it now). It gives its seat up at once (its pool's count
        and its user's): the one that took over holds it, even while this close waits for a client that never
        answers."""
        if not conn.taken_over and conn.id in self.conns:
            self.pool_counts[conn.pool.id] -= 1
        conn.taken_over = True
        self.close(conn, errors.TAKEN_OVER.code, errors.TAKEN_OVER.reason)

    def on_takeover(self, session_id: str, owner: str) -> None:
        """Another node resumed ``session_id`` of ``owner`` (tenant/user): end a connection here still holding it."""
        company, _, user = owner.partition("/")
        conn = self.session_holder(session_id, user)
        if conn is not None and conn.company_id == company:
            self.take_over(conn)

    def sweep_memory(self, now: float) -> None:
        """Free what nobody needs any more: expired sessions and unused channel instances (engine),
        fan-out timestamps of channels quiet for longer than the coalescing window, refilled limiter buckets."""
        self.engine.sweep()
        last = self.last_fanout
        if last:
            cutoff = _perf() - self.coalesce_s
            stale = [ch for ch, t in last.items() if t <= cutoff]
            for ch in stale:
                del last[ch]
        for lim in self.limiters:
            lim.sweep(now)
        self.heap.maybe_trim(now)  # what was just freed goes back to the system (at most every 30 s)

    def check_health(self, conn: Conn) -> None:
        """The sweep's error-rate test for one connection, now (after a frame that cost the daemon dearly)."""
        if not conn.closing and conn.errors >= 5 and conn.errors > self.health_error_rate * conn.msgs_in:
            self._recover(conn)

    def _recover(self, conn: Conn) -> None:
        """Recover an unhealthy connection: reset the breaker and resync once, then give up with 1011."""
        rate = conn.errors / max(1, conn.msgs_in)
        if conn.health_recoveries >= 1:
            self.events.emit("unhealthy", connection_id=conn.id, user_id=conn.user_id, error_rate=round(rate, 3))
            self.close(conn, errors.INTERNAL.code, f"unhealthy: error rate {rate:.0%}")
            return
        conn.health_recoveries += 1
        conn.errors = 0
        if conn.breaker is not None:
            conn.breaker.reset()
        self.events.emit("recovery", connection_id=conn.id, user_id=conn.user_id, error_rate=round(rate, 3))
        self.send_direct(conn, _json_encode({"type": "error", "error": {
            "code": "unhealthy", "message": f"error rate {rate:.0%} is above {self.health_error_rate:.0%}: "
                                            "fix the client's frames or the connection will be closed"}}),
                         Priority.CRITICAL)
        if conn.outbox:
            self.schedule_drain(conn)

    def _heartbeat(self, conn: Conn, now: float, wall: float) -> None:
        if conn.ping_data is not None:  # the last ping is unanswered (a pong clears it)
            conn.pings_missed += 1
            if conn.pings_missed >= self.missed_allowed:
                self.events.emit("heartbeat_timeout", connection_id=conn.id, user_id=conn.user_id,
                                 missed=conn.pings_missed)
                self.close(conn, errors.HEARTBEAT_TIMEOUT.code, errors.HEARTBEAT_TIMEOUT.reason)
                self.loop.call_later(2.0, self._abort_if_still, conn)
                return
        conn.ping_due = now + self.heartbeat_s
        if conn.proto.state is not OPEN:
            return
        self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
        data = struct.pack("!I", self._ping_seq)
        conn.ping_data = data
        # RTT from a high-resolution clock: loop.time() (what websockets measures with) is
        # millisecond-coarse under uvloop, so a sub-millisecond RTT would read as 0.
        conn.ping_sent_at = time.perf_counter()
        try:
            ping(conn, data)
        except Exception:
            conn.errors += 1

    def on_pong(self, conn: Conn, data: bytes) -> None:
        """A pong arrived (called synchronously by the connection): record the heartbeat and RTT."""
        if data != conn.ping_data:
            return
        rtt_ms = (time.perf_counter() - conn.ping_sent_at) * 1000.0
        conn.ping_data = None  # answered
        conn.pings_missed = 0
        conn.last_activity = self.now()  # a pong is activity: a listen-only subscriber is not idle
        conn.last_heartbeat = time.time()
        conn.latency_n += 1
        # Average latency over the connection's life, weighted to the recent (EWMA).
        conn.latency_ms = rtt_ms if conn.latency_n == 1 else conn.latency_ms * 0.8 + rtt_ms * 0.2

    def on_app_ping(self, conn: Conn) -> None:
        """A ``{"op":"ping"}`` request: the answer of a client that cannot see ping frames (an MQL5 terminal, a
        browser tab's app-level keepalive) counts as a heartbeat, so its connection is not closed for missed pongs."""
        conn.pings_missed = 0
        conn.last_heartbeat = time.time()

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
            self.events.emit("kick", connection_id=conn.id, user_id=conn.user_id, pool=conn.pool.id,
                             reason=reason)
            self.events.audit("kick", connection_id=conn.id, user_id=conn.user_id, reason=reason)
            self.close(conn, errors.KICKED.code, reason or errors.KICKED.reason)
            if self.engine.durable_sessions and self.session_ttl > 0 and not conn.taken_over:
                # A kick ends the session now, not when the close handshake is over: a client that holds back
                # its answer must not resume the live session meanwhile (here, or on another node).
                self.loop.create_task(self._end_session(conn.session_id))
            n += 1
        return n

    async def _end_session(self, session_id: str) -> None:
        try:
            await self.settle_sessions()
            await self.engine.drop_session(session_id)
        except Exception as exc:  # noqa: BLE001  # the handler drops it again once the connection is gone
            log.warning("ending the session of a kicked connection failed: %s", exc)

