"""The hub in-process: fan-out, queueing under congestion, drain, ttl expiry and the sweep, driven by a fake
transport (it records writes and can be made to hold bytes, like a peer that stopped reading) and a
hand-moved clock. No daemon, no sockets, no sleeps: each test takes milliseconds.

The hub, the engine (memory), the outbox, the breaker and the event sink are the real ones; only the
WebSocket connection under a ``Conn`` is a stand-in, with the few attributes the hub uses.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from wsd import errors
from wsd.config import load_config
from wsd.core.auth import Claims
from wsd.core.channels import Principal
from wsd.core.outbox import Priority
from wsd.engine.memory import MemoryEngine
from wsd.runtime.conn import Conn
from wsd.runtime.daemon import PoolRuntime
from wsd.runtime.events import Events
from wsd.runtime.hub import Hub
from wsd.runtime.wsadapter import OPEN

HIGH_WATER = 64 * 1024
CHANNEL = "system-status"


class FakeTransport:
    """Records what is written; ``hold()`` makes it report a full buffer, ``release()`` an empty one."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def hold(self) -> None:
        self.buffered = HIGH_WATER

    def release(self) -> None:
        self.buffered = 0

    def messages(self) -> list[dict[str, Any]]:
        """The text frames written, decoded (server frames: unmasked, payloads under 64 KiB here)."""
        out = []
        for data in self.writes:
            i = 0
            while i < len(data):
                n = data[i + 1] & 0x7F
                head = 2
                if n == 126:
                    n = int.from_bytes(data[i + 2:i + 4], "big")
                    head = 4
                out.append(json.loads(data[i + head:i + head + n]))
                i += head + n
        return out


class FakeProtocol:
    def __init__(self) -> None:
        self.state = OPEN
        self.pings: list[bytes] = []

    def send_ping(self, data: bytes) -> None:
        self.pings.append(data)


class FakeWs:
    """What the hub uses of the connection (wsadapter.WsdServerConnection)."""

    def __init__(self) -> None:
        self.protocol = FakeProtocol()
        self.transport = FakeTransport()
        self.closed: tuple[int, str] | None = None

    def send_data(self) -> None:
        pass

    def close_soon(self, code: int, reason: str, timeout: float) -> None:
        self.closed = (code, reason)
        self.transport.aborted = True


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def config(**manager: Any) -> Any:
    cfg = load_config(None, env={})
    m = {"write_high_water_bytes": HIGH_WATER, "coalesce_window_ms": 0, **manager}
    return msgspec.structs.replace(cfg, manager=msgspec.structs.replace(cfg.manager, **m))


class Rig:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.clock = Clock()
        self.events = Events()
        self.engine = MemoryEngine()
        self.hub = Hub(cfg, self.engine, self.events, clock=self.clock)
        self.pool = PoolRuntime("mt5", cfg.pools["mt5"], cfg)
        self.n = 0

    def connect(self, *, subscribe: bool = True, exp: float = 4e9) -> tuple[Conn, FakeWs]:
        self.n += 1
        ws = FakeWs()
        claims = Claims(f"u{self.n}", "acme", (), "mt5", exp, {})
        principal = Principal(claims.user_id, "acme", frozenset(), "mt5", "mt5_client", False)
        conn = Conn(f"c{self.n}", ws, self.pool, claims, principal, "s", self.clock(), 0.0)  # type: ignore[arg-type]
        self.hub.register(conn)
        if subscribe:
            self.hub.add_subscription(conn, CHANNEL, CHANNEL, "realtime", None)
        return conn, ws

    async def publish(self, data: Any, *, ttl_s: float | None = None, priority: int = Priority.NORMAL
                      ) -> dict[str, Any]:
        return await self.hub.publish(channel=CHANNEL, group=CHANNEL, msg_type="tick", data=data,
                                      priority=priority, ttl_s=ttl_s, source="test")

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events.log if e["event"] == kind]


async def settle() -> None:
    """Let callbacks scheduled with call_soon run (the drain, close tasks): one loop turn each."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
async def rig() -> Rig:
    return Rig(config())


async def test_fanout_writes_one_shared_frame_to_every_receiver_and_moves_their_position(rig):
    a, wa = rig.connect()
    b, wb = rig.connect()
    r = await rig.publish({"px": 1})
    assert r["delivered"] == 2
    assert wa.transport.writes == wb.transport.writes and len(wa.transport.writes) == 1
    msg = wa.transport.messages()[0]
    assert msg["data"] == {"px": 1} and msg["offset"] == r["offset"]
    assert a.subs[CHANNEL].offset == b.subs[CHANNEL].offset == r["offset"]
    assert a.msgs_out == b.msgs_out == 1


async def test_a_congested_receiver_is_queued_and_drained_in_order_on_resume(rig):
    fast, wf = rig.connect()
    slow, ws = rig.connect()
    ws.transport.hold()
    rig.hub.on_pause_writing(slow)  # the transport went above its high-water mark
    for i in range(3):
        await rig.publish(i)
    await settle()
    assert [m["data"] for m in wf.transport.messages()] == [0, 1, 2]
    assert ws.transport.writes == [] and slow.queue_depth() == 3
    assert slow.congested_since == rig.clock()
    ws.transport.release()
    rig.clock.advance(rig.hub.breaker_cooldown + 0.01)  # the breaker may half-open
    rig.hub.on_resume_writing(slow)
    await settle()
    assert [m["data"] for m in ws.transport.messages()] == [0, 1, 2]
    assert slow.queue_depth() == 0 and slow.congested_since is None and slow.breaker is None
    assert slow.subs[CHANNEL].offset == fast.subs[CHANNEL].offset


async def test_the_breaker_keeps_the_queue_until_its_cooldown_has_passed(rig):
    slow, ws = rig.connect()
    ws.transport.hold()
    rig.hub.on_pause_writing(slow)
    await rig.publish("x")
    ws.transport.release()
    rig.hub.on_resume_writing(slow)
    await settle()
    assert ws.transport.writes == [] and slow.queue_depth() == 1  # still cooling down


async def test_a_queued_message_past_its_ttl_is_dropped_and_counted(rig):
    slow, ws = rig.connect()
    ws.transport.hold()
    rig.hub.on_pause_writing(slow)
    await rig.publish("old", ttl_s=1.0)
    await rig.publish("new")
    rig.clock.advance(max(2.0, rig.hub.breaker_cooldown + 0.01))
    ws.transport.release()
    rig.hub.on_resume_writing(slow)
    await settle()
    assert [m["data"] for m in ws.transport.messages()] == ["new"]
    assert slow.drops_expired == 1
    rig.hub.unregister(slow)
    assert rig.hub.stats.dropped_expired == 1  # kept once the connection is gone


async def test_a_coalesced_message_past_its_ttl_is_dropped_and_counted_for_each_receiver():
    rig = Rig(config(coalesce_window_ms=10_000, coalesce_max_messages=100))
    a, wa = rig.connect()
    b, wb = rig.connect()
    await rig.publish("first")                 # written at once, starts the burst window
    await rig.publish("short", ttl_s=1.0)      # held in the window
    await rig.publish("long")
    rig.clock.advance(2.0)
    rig.hub.flush_channel(CHANNEL)
    for w in (wa, wb):
        assert [m["data"] for m in w.transport.messages()] == ["first", "long"]
    assert a.drops_expired == b.drops_expired == 1


async def test_overflow_drops_the_least_urgent_and_counts_it():
    rig = Rig(config(message_buffer_size=2, overflow_close_count=1000))
    slow, ws = rig.connect()
    ws.transport.hold()
    rig.hub.on_pause_writing(slow)
    for i in range(3):
        await rig.publish(i)
    assert slow.queue_depth() == 2 and slow.drops_overflow == 1 and rig.hub.stats.dropped_overflow == 1


async def test_sweep_closes_an_idle_connection_with_4010(rig):
    conn, ws = rig.connect()
    rig.clock.advance(rig.hub.idle_s + 1)
    conn.ping_due = rig.clock() + 100  # no heartbeat due in this pass
    rig.hub.sweep(rig.clock(), 0.0)
    await settle()
    assert conn.closing and conn.close_code == errors.IDLE_TIMEOUT.code
    assert ws.closed == (errors.IDLE_TIMEOUT.code, errors.IDLE_TIMEOUT.reason)
    assert [e["connection_id"] for e in rig.events_of("idle_timeout")] == [conn.id]


async def test_sweep_closes_a_connection_whose_token_expired_with_4001(rig):
    _, ws = rig.connect(exp=500.0)
    rig.hub.sweep(rig.clock(), 501.0)
    await settle()
    assert ws.closed is not None and ws.closed[0] == errors.TOKEN_EXPIRED.code
    assert rig.events_of("token_expired")


async def test_sweep_pings_and_closes_after_the_allowed_missed_pongs(rig):
    conn, ws = rig.connect()
    missed = rig.hub.missed_allowed
    for i in range(missed + 1):
        rig.clock.advance(rig.hub.heartbeat_s)  # a heartbeat is due
        conn.last_activity = rig.clock()  # not idle: only the heartbeat decides
        rig.hub.sweep(rig.clock(), 0.0)
        if i < missed:
            assert len(ws.protocol.pings) == i + 1 and not conn.closing
    await settle()
    assert conn.closing and conn.close_code == errors.HEARTBEAT_TIMEOUT.code
    assert rig.events_of("heartbeat_timeout")[0]["missed"] == missed


async def test_a_pong_keeps_the_connection_and_records_the_heartbeat(rig):
    conn, ws = rig.connect()
    for _ in range(rig.hub.missed_allowed + 2):
        rig.clock.advance(rig.hub.heartbeat_s)
        conn.last_activity = rig.clock()
        rig.hub.sweep(rig.clock(), 0.0)
        rig.hub.on_pong(conn, ws.protocol.pings[-1])  # what the connection does when the pong arrives
    assert not conn.closing and conn.pings_missed == 0 and conn.latency_n == rig.hub.missed_allowed + 2


async def test_sweep_closes_a_slow_consumer_with_4009_and_counts_what_it_lost(rig):
    slow, ws = rig.connect()
    ws.transport.hold()
    rig.hub.on_pause_writing(slow)
    await rig.publish("a")
    await rig.publish("b")
    rig.clock.advance(rig.hub.slow_s + 1)
    slow.last_activity = rig.clock()
    slow.ping_due = rig.clock() + 100
    rig.hub.sweep(rig.clock(), 0.0)
    await settle()
    assert slow.close_code == errors.SLOW_CONSUMER.code
    assert rig.hub.stats.dropped_on_close == 2 and rig.hub.stats.slow_consumers == 1
    assert rig.events_of("slow_consumer")[0]["queued"] == 2


async def test_kick_closes_with_4000_and_reports_it(rig):
    a, wa = rig.connect()
    _, wb = rig.connect()
    assert rig.hub.kick(rig.hub.select(user=a.user_id), "maintenance") == 1
    await settle()
    assert wa.closed == (errors.KICKED.code, "maintenance") and wb.closed is None
    assert [e["connection_id"] for e in rig.events_of("kick")] == [a.id]


async def test_an_unhealthy_connection_is_warned_once_then_closed_with_1011(rig):
    conn, ws = rig.connect()
    conn.msgs_in, conn.errors = 10, 9
    rig.hub.check_health(conn)
    assert not conn.closing and conn.errors == 0
    assert ws.transport.messages()[-1]["error"]["code"] == "unhealthy"
    conn.msgs_in, conn.errors = 20, 9
    rig.hub.check_health(conn)
    await settle()
    assert conn.close_code == errors.INTERNAL.code
    assert [e["event"] for e in rig.events.log] == ["recovery", "unhealthy"]


# -- a subscription's position ------------------------------------------------------------------------------------
async def test_a_position_rises_within_an_epoch_and_restarts_in_a_new_one(rig):
    conn, _ = rig.connect()
    sub = conn.subs[CHANNEL]
    sub.advance(5, "e1")
    sub.advance(3, "e1")      # written late (a queued message): never moves back
    assert (sub.offset, sub.epoch) == (5, "e1")
    sub.advance(2, "e2")      # another epoch: the old offset means nothing there
    assert (sub.offset, sub.epoch) == (2, "e2")
    sub.advance(7, "")        # no stream: the epoch stays
    assert (sub.offset, sub.epoch) == (7, "e2")
    sub.restart(1, "e3")
    assert (sub.offset, sub.epoch) == (1, "e3")


# -- the session format -------------------------------------------------------------------------------------------
def test_a_session_encodes_as_the_json_older_versions_kept():
    """The stored JSON is unchanged: a session kept by an older wsd resumes, and the other way round."""
    from wsd.runtime import session as saved

    old = {"user_id": "alice", "company_id": "acme", "pool": "mt5",
           "subs": [{"channel": "trading-signals/acme", "group": "trading-signals", "mode": "realtime",
                     "types": None, "offset": 12, "epoch": "ab12"}],
           "unacked": [[3, '{"type":"message"}', 1, 2, 5.0]], "next_seq": 4, "reconnections": 1}
    s = saved.decode(json.dumps(old).encode())
    assert s is not None and s.subs[0].offset == 12 and s.unacked[0].payload == '{"type":"message"}'
    assert json.loads(saved.encode(s)) == old
    assert s.owner == "acme/alice"


@pytest.mark.parametrize("blob", [b"", b"[]", b'{"subs": []}', b'{"user_id": "a", "subs": [{"offset": "x"}]}',
                                  b'{"user_id": "a", "unacked": [[1, "p"]]}'])
def test_a_damaged_session_is_no_session(blob):
    from wsd.runtime import session as saved

    assert saved.decode(blob) is None


async def test_capture_keeps_positions_and_unacked_messages(rig):
    from wsd.runtime import session as saved

    conn, _ = rig.connect()
    r = await rig.publish("x")
    pub_seq = rig.hub.deliver_reliable(conn, _publication(r["offset"]), "x", 3, 5.0, rig.clock())
    s = saved.decode(saved.encode(saved.capture(conn)))
    assert s is not None and s.user_id == conn.user_id and s.next_seq == pub_seq + 1
    assert [(x.channel, x.offset) for x in s.subs] == [(CHANNEL, r["offset"])]
    assert [(u.seq, u.retries, u.ack_timeout_s) for u in s.unacked] == [(pub_seq, 3, 5.0)]


def _publication(offset: int) -> Any:
    from wsd.engine.base import Publication

    return Publication(id="p", channel=CHANNEL, group=CHANNEL, type="tick", priority=Priority.NORMAL, data="x",
                       ts=0.0, offset=offset)
