"""Delivery: the fan-out hot path, coalescing windows, per-connection outboxes and their drain, batch and
on_demand holding, reliable delivery.

The per-message hot path (``Delivery.fanout``) encodes one frame per message and writes that same
frame to every receiver whose queue is empty and whose transport is below its high-water
mark, as ``websockets.broadcast()`` does, without logging or allocating per receiver. Only
congested receivers take the queued path (priority outbox, circuit breaker, adaptive batch
frames), drained when their transport asks for more (``resume_writing``).

Invariants, each with one owner: ``writable_now`` (may a push be written at once), ``Subscription.advance``
(a subscription's position), ``unexpired`` (held messages past their ttl, counted by whoever drops them).
``Delivery`` is a part of ``Hub`` (hub.py): it uses the hub's connections, subscription index, settings,
stats and event sink.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from wsd.core.breaker import BreakerState, CircuitBreaker
from wsd.core.outbox import PRIORITY_NAMES, Outbox, Priority
from wsd.engine.base import Publication
from wsd.runtime.conn import BATCH, CONNECTED, ON_DEMAND, REALTIME, Conn, ReliableState, Subscription, Unacked
from wsd.runtime.wsadapter import OPEN, text_frame

if TYPE_CHECKING:
    import asyncio

    from wsd.runtime.events import Events
    from wsd.runtime.stats import Stats

_perf = time.perf_counter  # latency figures need sub-millisecond resolution (uvloop's loop.time() is 1 ms)
_json_encode = msgspec.json.Encoder().encode
_BATCH_HEAD = b'{"type":"batch","messages":['
_BATCH_TAIL = b"]}"
#: replies queued in one loop turn (``send_reply``) beyond which they are written at once
REPLY_RUN = 64


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
            f = self._frame = frame_of(self.payload)
        return f


_HEADERS: dict[int, bytes] = {}


def frame_of(payload: bytes) -> bytes:
    """``text_frame(payload)``: one unmasked server text frame. Its header depends only on the payload's
    length, so websockets serializes it once per length (a frame of that many spaces, payload cut off)
    and the header is kept: a frame is then one concatenation, not a ``Frame`` serialized each time."""
    n = len(payload)
    head = _HEADERS.get(n)
    if head is None:
        if len(_HEADERS) >= 4096:
            _HEADERS.clear()  # bounded: lengths come and go with the traffic
        head = _HEADERS[n] = text_frame(b" " * n)[:-n] if n else text_frame(b"")
    return head + payload


HISTORY_TAIL = b',"history":true}'


def stored_push(pub: Publication) -> bytes:
    """The publication's channel push, encoded once and kept on it."""
    payload = pub.payload
    if payload is None:
        payload = pub.payload = encode_push(pub)
    return payload


def encode_push(pub: Publication, data: Any = None, seq: int | None = None, history: bool = False) -> bytes:
    msg: dict[str, Any] = {"type": "message", "channel": pub.channel, "offset": pub.offset, "epoch": pub.epoch,
                           "msg_type": pub.type, "priority": PRIORITY_NAMES[pub.priority], "ts": pub.ts}
    if pub.enc:
        msg["enc"] = pub.enc
    msg["data"] = pub.data if data is None else data
    if seq is not None:
        msg["seq"] = seq
    if history:
        msg["history"] = True
    return _json_encode(msg)


def writable_now(conn: Conn, high_water: int) -> bool:
    """The write-now predicate, the one owner of the rule: a push may be written to ``conn``'s transport at
    once (ahead of nothing, so order holds) when nothing is queued for it, its circuit breaker is closed
    (no breaker), the WebSocket is open, and the transport holds less than ``high_water`` bytes.
    Otherwise it goes through the outbox (``Hub._enqueue``) and is written by the drain, in order.

    ``Hub._fanout_one`` and ``Hub._flush_window`` write this test out inline (a call per receiver would
    cost more than the write); keep them the same as this function.
    """
    return (conn.outbox is None or not conn.outbox) and conn.breaker is None \
        and conn.proto.state is OPEN and conn.transport.get_write_buffer_size() < high_water


def unexpired(items: list[Outgoing], now: float) -> tuple[list[Outgoing], int]:
    """``items`` without those whose ttl ran out by ``now``, and how many were left out.

    The one expiry test for held messages (coalescing windows, batch buffers, on_demand stores; the
    outbox has its own, counted in ``Outbox.dropped_expired``). Whoever drops them counts them:
    ``Hub.count_expired``.
    """
    kept = [o for o in items if o.expires_at is None or o.expires_at > now]
    return kept, len(items) - len(kept)




class Delivery:
    """Fan-out, coalescing, queueing, drain and reliable delivery (a part of ``Hub``)."""

    # What it uses of the hub (set by Hub.__init__ / Hub.configure).
    loop: asyncio.AbstractEventLoop
    events: Events
    stats: Stats
    by_channel: dict[str, dict[str, Subscription]]
    high_water: int
    buffer_size: int
    overflow_close: int
    breaker_threshold: int
    breaker_cooldown: float
    coalesce_s: float
    coalesce_max: int
    last_fanout: dict[str, float]
    _replied: set[Conn]

    def outgoing(self, pub: Publication, now: float, data: Any = None) -> Outgoing:
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
        out = self.outgoing(pub, now)
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
                last = self.last_fanout.get(channel)
                if last is not None and _perf() - last < self.coalesce_s:
                    self._win[channel] = [out]
                    self._win_timer[channel] = self.loop.call_later(self.coalesce_s, self._flush_window, channel)
                    return len(subs)
            n = self._fanout_one(subs, out)
            self.last_fanout[channel] = _perf()
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
        # than the write. They are ``writable_now`` (the write-now predicate) and ``Subscription.advance``
        # (live messages come in order: the message's position is the new one); keep them the same.
        # Tracing (trace_delivery) does not copy them: it observes what this code did.
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
            elif self.deliver_sub(sub, out):
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
        win, expired = unexpired(win, self.now())
        if expired:  # dropped for every subscriber it was held for, and counted for each
            for sub in subs.values():
                sub.conn.drops_expired += expired
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
            # inline: ``writable_now`` and ``Subscription.advance``, as in _fanout_one
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
                elif self.deliver_sub(sub, o):
                    n += 1
        self.stats.coalesced += 1
        self.stats.delivered += n
        done = _perf()
        self.last_fanout[channel] = done
        self.stats.observe_fanout(done - win[0].pub_mono)

    def deliver_sub(self, sub: Subscription, out: Outgoing) -> bool:
        """The slow path of one subscription: type filter, history sync, batch and on_demand modes.
        True when ``out`` was taken (written, queued, held); False when the type filter leaves it out."""
        if sub.types is not None and out.type not in sub.types:
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
        items, expired = unexpired(list(held), self.now())
        held.clear()
        sub.conn.drops_expired += expired
        if not items:
            return
        payload = _BATCH_HEAD + b",".join(o.payload for o in items) + _BATCH_TAIL
        last = items[-1]
        batch = Outgoing(payload, min(o.priority for o in items), None, sub.channel, last.offset, "batch",
                         items[0].pub_mono)
        batch.epoch = last.epoch
        self.deliver(sub.conn, batch, count=len(items))


    # -- delivery to one connection ------------------------------------------------------------------
    def deliver(self, conn: Conn, out: Outgoing, count: int = 1) -> None:
        """Write now when nothing is queued and the transport has room; queue otherwise."""
        if writable_now(conn, self.high_water):
            frame = out.frame
            conn.transport.write(frame)
            conn.msgs_out += count
            conn.bytes_out += len(frame)
            if out.offset and out.channel:
                sub = conn.subs.get(out.channel)
                if sub is not None:
                    sub.advance(out.offset, out.epoch)
            return
        self._enqueue(conn, out)

    def send_direct(self, conn: Conn, payload: bytes, priority: int = Priority.NORMAL) -> None:
        """A one-off push to one connection (wsctl send, history replay)."""
        self.deliver(conn, Outgoing(payload, priority, None, "", 0, "", _perf()))

    def send_reply(self, conn: Conn, payload: bytes) -> None:
        """A reply to a client's request (critical). The first reply a connection gets in a loop turn is
        written at once; further ones in the same turn (a client pipelining requests: one read brings many)
        are queued in order and written together by the drain at the end of the turn: one write for them
        all instead of one each. Anything else for the connection in the meantime queues behind them (the
        outbox is not empty), so nothing is reordered; a close writes them first (``Lifecycle.close``).
        """
        replied = self._replied
        if conn not in replied:
            if not replied:
                self.loop.call_soon(replied.clear)
            replied.add(conn)
            self.deliver(conn, Outgoing(payload, Priority.CRITICAL, None, "", 0, "", _perf()))
            return
        ob = conn.outbox
        if ob is not None and len(ob) >= REPLY_RUN and conn in self._dirty:
            self._drain(conn, self.now())  # a long run: written now, the outbox stays small
        self._enqueue(conn, Outgoing(payload, Priority.CRITICAL, None, "", 0, "", _perf()))

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
                self.events.audit("dropped_overflow", connection_id=conn.id, user_id=conn.user_id,
                                  total=conn.drops_overflow)
            if conn.overflows >= self.overflow_close:
                self.close_slow(conn, "queue overflow")
                return
        if conn.congested_since is None:
            conn.congested_since = self.now()
        if conn.breaker is None or conn.breaker.state is BreakerState.CLOSED:
            self.schedule_drain(conn)

    def schedule_drain(self, conn: Conn) -> None:
        self._dirty.add(conn)
        if self._drain_handle is None:
            self._drain_handle = self.loop.call_soon(self._drain_dirty)

    def on_pause_writing(self, conn: Conn) -> None:
        """The transport went above its high-water mark: open the breaker, queue from now on."""
        now = self.now()
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
        now = self.now()
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
        expired_before = ob.dropped_expired if ob is not None else 0
        batching = conn.pool.batching.enabled
        max_batch = conn.pool.batching.max_messages
        # The frames of one drain pass are written together: one write (one syscall) per pass. ``size``
        # counts them as if none had left yet, so a pass writes at most about one high-water mark.
        hw = self.high_water
        parts: list[bytes] = []
        size = transport.get_write_buffer_size()
        while ob and size < hw:
            if batching and len(ob) > 1 and ob.peek_priority() != Priority.CRITICAL:
                # Nothing critical is queued (peek): coalesce up to max_batch into one batch frame.
                items = ob.pop_many(now, max_batch)
                if not items:
                    continue
                if len(items) == 1:
                    size += self._write_item(conn, items[0][0], 1, parts)
                else:
                    payload = _BATCH_HEAD + b",".join(o.payload for o, _ in items) + _BATCH_TAIL
                    frame = frame_of(payload)
                    parts.append(frame)
                    size += len(frame)
                    conn.msgs_out += len(items)
                    conn.bytes_out += len(frame)
                    for o, _ in items:
                        self._note_written(conn, o)
                    self.stats.batches += 1
            else:
                item = ob.pop(now)
                if item is None:
                    break
                size += self._write_item(conn, item[0], 1, parts)
        if parts:
            transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
            if ob and transport.get_write_buffer_size() < hw:
                self.schedule_drain(conn)  # the estimate stopped the pass, the transport took it all: go on
        if ob is not None:
            conn.drops_expired += ob.dropped_expired - expired_before  # what the pops dropped as expired
        if ob is not None and not ob and transport.get_write_buffer_size() < self.high_water:
            conn.congested_since = None
            conn.overflows = 0
            if br is not None:
                br.record_success(now)
                if br.state is BreakerState.CLOSED:
                    conn.breaker = None

    def _write_item(self, conn: Conn, out: Outgoing, count: int, parts: list[bytes]) -> int:
        """Add ``out``'s frame to the drain pass's ``parts``; its length."""
        frame = out.frame
        parts.append(frame)
        conn.msgs_out += count
        conn.bytes_out += len(frame)
        self._note_written(conn, out)
        self.stats.observe_queue_latency(_perf() - out.pub_mono)
        return len(frame)

    def _note_written(self, conn: Conn, out: Outgoing) -> None:
        if out.offset and out.channel:
            sub = conn.subs.get(out.channel)
            if sub is not None:
                sub.advance(out.offset, out.epoch)

    # -- reliable delivery ----------------------------------------------------------------------------
    def deliver_reliable(self, conn: Conn, pub: Publication, data: Any, max_retries: int, ack_timeout_s: float,
                         now: float) -> int:
        rs = conn.reliable
        if rs is None:
            rs = conn.reliable = ReliableState()
        seq = rs.next_seq
        rs.next_seq += 1
        payload = encode_push(pub, data, seq=seq)
        rs.unacked[seq] = Unacked(payload, pub.priority, now + ack_timeout_s, max_retries, ack_timeout_s)
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
            if entry.due > now:
                continue
            if entry.retries <= 0:
                del rs.unacked[seq]
                rs.given_up += 1
                self.stats.reliable_given_up += 1
                self.events.audit("reliable_given_up", connection_id=conn.id, user_id=conn.user_id, seq=seq)
                continue
            entry.retries -= 1
            entry.due = now + entry.ack_timeout_s
            rs.resent += 1
            self.stats.reliable_resent += 1
            self.deliver(conn, Outgoing(entry.payload, entry.priority, None, "", 0, "", _perf()))

