"""The delivery pipeline through real sockets: slow consumers, priority, batching, expiry, overflow.

A "stalled" client is a raw TCP socket with a small receive buffer (SO_RCVBUF set before connect) that
completes the WebSocket handshake, subscribes, and then stops reading: the daemon's transport write
buffer climbs above `manager.write_high_water_bytes`, the connection's breaker opens and further
messages wait in its priority outbox. Reading again lets the transport drain, which drains the outbox.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import struct
from typing import Any

import pytest

from tests.harness import BASE_CONFIG, Wsd, make_token, recv_json, request, wait_for, welcome

CHANNELS = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["mt5", "api", "admin"]
history_size = 10
"""


def base(**manager: Any) -> str:
    """The harness config with extra ``[manager]`` keys."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in manager.items())
    return BASE_CONFIG.replace("[manager]\n", "[manager]\n" + lines, 1)


class Ctl:
    """One persistent control-socket connection, for publishing thousands of messages quickly."""

    def __init__(self, w: Wsd) -> None:
        self.w = w
        self.n = 0

    async def __aenter__(self) -> Ctl:
        self.reader, self.writer = await asyncio.open_unix_connection(self.w.socket)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def __call__(self, method: str, **params: Any) -> Any:
        self.n += 1
        self.writer.write(json.dumps({"id": self.n, "method": method, "params": params}).encode() + b"\n")
        reply = json.loads(await asyncio.wait_for(self.reader.readline(), 10))
        assert reply["id"] == self.n and "error" not in reply, reply
        return reply["result"]


class RawClient:
    """A WebSocket client on a bare non-blocking socket: it reads only when the test says so."""

    def __init__(self, w: Wsd, token: str, rcvbuf: int = 4096) -> None:
        self.w = w
        self.token = token
        self.rcvbuf = rcvbuf
        self.buf = b""
        self.sock: socket.socket | None = None

    async def open(self) -> dict[str, Any]:
        """Handshake, read the welcome; returns it."""
        loop = asyncio.get_running_loop()
        s = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", self.w.port)), 5)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET /ws/frontend?token={self.token} HTTP/1.1\r\nHost: 127.0.0.1:{self.w.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(s, req.encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += await self._recv(5)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        w = await self.next_json()
        assert w["type"] == "welcome", w
        return w

    async def _recv(self, timeout: float) -> bytes:
        assert self.sock is not None
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), timeout)
        if not chunk:
            raise EOFError("server closed the TCP connection")
        return chunk

    async def send_json(self, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.sock is not None
        await asyncio.get_running_loop().sock_sendall(self.sock, head + mask + masked)

    async def next_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next (opcode, payload) from the server (unmasked, unfragmented frames)."""
        while True:
            if len(self.buf) >= 2:
                n = self.buf[1] & 0x7F
                pos = 2
                if n == 126:
                    n, pos = (struct.unpack("!H", self.buf[2:4])[0], 4) if len(self.buf) >= 4 else (-1, 0)
                elif n == 127:
                    n, pos = (struct.unpack("!Q", self.buf[2:10])[0], 10) if len(self.buf) >= 10 else (-1, 0)
                if n >= 0 and len(self.buf) >= pos + n:
                    op, payload = self.buf[0] & 0x0F, self.buf[pos : pos + n]
                    self.buf = self.buf[pos + n :]
                    return op, payload
            self.buf += await self._recv(timeout)

    async def next_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text frame as JSON (pings are skipped; a close frame raises)."""
        while True:
            op, payload = await self.next_frame(timeout)
            if op == 0x1:
                return json.loads(payload)
            if op == 0x8:
                raise ConnectionError(
                    f"close frame {struct.unpack('!H', payload[:2])[0] if payload else None}"
                )

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.send_json(frame)
        while True:
            m = await self.next_json()
            if m.get("id") == frame["id"]:
                return m

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def flatten(frame: dict[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    """The messages of a push: (message, arrived inside a batch frame)."""
    if frame.get("type") == "batch":
        return [(m, True) for m in frame["messages"]]
    if frame.get("type") == "message":
        return [(frame, False)]
    return []


async def read_messages(
    raw: RawClient, until: Any, timeout: float = 10.0
) -> list[tuple[dict[str, Any], bool]]:
    """Read the stalled client again until ``until(messages)`` holds; every message with its batch flag."""
    got: list[tuple[dict[str, Any], bool]] = []
    async with asyncio.timeout(timeout):
        while not until(got):
            got.extend(flatten(await raw.next_json(timeout)))
    return got


async def stalled_client(w: Wsd, user: str = "stall") -> tuple[RawClient, str]:
    """A raw client subscribed to its trading-signals instance that will not read from now on."""
    raw = RawClient(w, make_token(user, "acme"))
    cid = (await raw.open())["connection_id"]
    reply = await raw.request({"op": "subscribe", "id": 1, "channel": "trading-signals"})
    assert reply["ok"] and reply["result"]["channel"] == "trading-signals/acme"
    return raw, cid


async def congest(
    ctl: Ctl, cid: str, priority: str = "low", size: int = 65536, at_least: int = 1, limit: int = 1000
) -> int:
    """Publish fillers until at least ``at_least`` wait in the connection's outbox; how many were published.

    The kernel absorbs a lot first: Linux autotunes a socket's send buffer up to net.ipv4.tcp_wmem's
    maximum (4 MiB by default) even when the peer's window is closed, so big fillers get there faster.
    """
    pad = "f" * size
    for i in range(limit):
        await ctl(
            "publish",
            channel="trading-signals/acme",
            type="filler",
            priority=priority,
            data={"i": i, "pad": pad},
        )
        c = await ctl("connections.get", id=cid)
        if c["queue"]["depth"] >= at_least:
            assert c["breaker"]["state"] == "open" and c["breaker"]["opened_count"] >= 1
            return i + 1
    raise AssertionError(f"connection {cid} never congested after {limit} messages")


async def test_stalled_client_does_not_slow_a_healthy_one(wsd_factory):
    """A client that stops reading is closed with 4009; a healthy one gets every message in order."""
    w = wsd_factory(
        CHANNELS,
        base=base(write_high_water_bytes=16384, message_buffer_size=100, slow_consumer_timeout_ms=1000),
    )
    raw, stalled_id = await stalled_client(w)
    got: list[int] = []
    offsets: list[int] = []
    async with w.connect(token=make_token("healthy", "acme"), max_size=None) as ws:
        await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]

        async def reader() -> None:
            while True:
                for m, _ in flatten(await recv_json(ws, 15)):
                    if m["msg_type"] == "bulk":
                        got.append(m["offset"])

        task = asyncio.create_task(reader())
        # ~1 KB messages: at least 2,000, and on until the stalled client is seen congested (the kernel's
        # autotuned send buffer swallows up to net.ipv4.tcp_wmem max first), at most 12,000.
        pad = "x" * 1000
        loop = asyncio.get_running_loop()
        started = loop.time()
        congested_at = None
        async with Ctl(w) as ctl:
            while len(offsets) < 2000 or congested_at is None:
                assert len(offsets) < 12000, "the stalled client never congested"
                offsets.append(
                    (
                        await ctl(
                            "publish",
                            channel="trading-signals/acme",
                            type="bulk",
                            data={"i": len(offsets), "pad": pad},
                        )
                    )["offset"]
                )
                if congested_at is None and len(offsets) % 50 == 0:
                    c = await ctl("connections.get", id=stalled_id)
                    if c["breaker"]["state"] != "closed" or c["queue"]["depth"]:
                        congested_at = len(offsets)

        async def all_in() -> bool:
            assert not task.done() or task.cancelled(), task.exception()
            return len(got) >= len(offsets)

        await wait_for(all_in, timeout=20)
        task.cancel()
        elapsed = loop.time() - started
        assert got == offsets and all(b == a + 1 for a, b in itertools.pairwise(got))
        assert elapsed < 20

        async def closed_4009() -> bool:
            evs = (await w.ctl("events.recent", limit=500))["events"]
            return any(
                e["event"] == "disconnect" and e["connection_id"] == stalled_id and e["code"] == 4009
                for e in evs
            )

        await wait_for(closed_4009, timeout=10)
        evs = (await w.ctl("events.recent", limit=500))["events"]
        slow = [e for e in evs if e["event"] == "slow_consumer" and e["connection_id"] == stalled_id]
        assert len(slow) == 1
        m = await w.ctl("metrics.get")
        assert m["queues"]["slow_consumers"] == 1 and m["manager"]["closed_by_code"].get("4009") == 1
        # The healthy client is still served after the stalled one is gone.
        res = await w.ctl("publish", channel="trading-signals/acme", type="after", data={})
        assert res["delivered"] == 1
        assert (await recv_json(ws))["msg_type"] == "after"
    # The stalled socket, reading again, finds the connection reset: the daemon aborted it with SO_LINGER 0,
    # so the megabytes the kernel still held for it were discarded, not trickled out to a dead reader.
    read = 0
    try:
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(10):
                while True:
                    await raw.next_json()
                    read += 1
        assert read < 64, f"{read} messages trickled out after the abort"  # ~ its 8 KiB receive buffer
    finally:
        raw.close()


async def test_critical_overtakes_queued_low_messages(wsd_factory):
    """A critical message overtakes queued low ones; the breaker opens and closes; queued lows batch."""
    w = wsd_factory(
        CHANNELS,
        base=base(
            write_high_water_bytes=16384,
            message_buffer_size=100,
            slow_consumer_timeout_ms=60000,
            breaker_cooldown_ms=100,
        ),
    )
    raw, cid = await stalled_client(w)
    try:
        async with Ctl(w) as ctl:
            fillers = await congest(ctl, cid, at_least=1)
            for i in range(20):
                await ctl(
                    "publish", channel="trading-signals/acme", type="low", priority="low", data={"i": i}
                )
            crit = await ctl(
                "publish",
                channel="trading-signals/acme",
                type="alert",
                priority="critical",
                data={"halt": True},
            )
            c = await ctl("connections.get", id=cid)
        # What waits in the outbox right now: the critical one and the newest `queued_low` low ones
        # (FIFO within a class; nothing drained, nothing dropped). Only those are promised to be overtaken:
        # what was written before the congestion is already in the transport or kernel buffers.
        by = c["queue"]["by_priority"]
        assert by["critical"] == 1 and c["breaker"]["state"] == "open"
        assert c["queue"]["dropped_overflow"] == 0
        queued_low = by["low"]
        assert queued_low >= 20  # every "low" message was published after the outbox had one filler waiting
        got = await read_messages(
            raw, lambda g: any(m["msg_type"] == "low" and m["data"]["i"] == 19 for m, _ in g)
        )
        order = [m["offset"] for m, _ in got]
        all_lows = list(range(crit["offset"] - fillers - 20, crit["offset"]))
        queued = set(all_lows[-queued_low:])
        pos = order.index(crit["offset"])
        assert queued.isdisjoint(order[:pos]), "a queued low message came before the critical one"
        # Everything else keeps its channel order, nothing is lost or duplicated.
        assert [o for o in order if o != crit["offset"]] == all_lows and order.count(crit["offset"]) == 1
        batched = {m["offset"] for m, b in got if b}
        assert queued - {crit["offset"]} <= batched, "queued non-critical messages were not coalesced"
        assert not [m for m, b in got if m["offset"] == crit["offset"] and b], "critical went into a batch"

        async def breaker_closed() -> bool:
            c = await w.ctl("connections.get", id=cid)
            return c["breaker"]["state"] == "closed" and c["queue"]["depth"] == 0

        await wait_for(breaker_closed, timeout=10)
        assert (await w.ctl("metrics.get"))["manager"]["batches"] >= 1
        # Back on the direct path: a new message arrives as a plain message frame.
        await w.ctl("publish", channel="trading-signals/acme", type="fresh", data={})
        while True:
            m = await raw.next_json()
            if m.get("type") == "message" and m["msg_type"] == "fresh":
                break
    finally:
        raw.close()


async def test_expired_message_is_dropped_before_drain(wsd_factory):
    """A message whose ttl_s runs out while it waits in a congested outbox is never written and is counted."""
    w = wsd_factory(
        CHANNELS,
        base=base(
            write_high_water_bytes=16384,
            coalesce_window_ms=0,  # this test inspects the outbox right after each publish
            message_buffer_size=100,
            slow_consumer_timeout_ms=60000,
            breaker_cooldown_ms=100,
        ),
    )
    raw, cid = await stalled_client(w)
    try:
        async with Ctl(w) as ctl:
            await congest(ctl, cid)
            short = await ctl(
                "publish", channel="trading-signals/acme", type="quote", data={"n": 1}, ttl_s=0.3
            )
            keep = await ctl("publish", channel="trading-signals/acme", type="quote", data={"n": 2}, ttl_s=60)
            c = await ctl("connections.get", id=cid)
            assert c["queue"]["by_priority"]["normal"] >= 2
        await asyncio.sleep(0.5)  # let the ttl elapse while the client still does not read
        got = await read_messages(raw, lambda g: any(m["offset"] == keep["offset"] for m, _ in g))
        assert short["offset"] not in [m["offset"] for m, _ in got]
        c = await w.ctl("connections.get", id=cid)
        assert c["queue"]["dropped_expired"] == 1
        assert (await w.ctl("metrics.get"))["queues"]["dropped_expired"] == 1
    finally:
        raw.close()

    async def gone() -> bool:
        return (await w.ctl("connections.list"))["total"] == 0

    await wait_for(gone)
    # Still counted once the connection is gone: a counter never goes down.
    m = await w.ctl("metrics.get")
    assert m["queues"]["dropped_expired"] == 1 and m["manager"]["dropped_expired"] == 1


async def test_overflow_drops_lowest_priority_first(wsd_factory):
    """A full outbox drops its oldest lowest-priority messages for newer important ones, counting each."""
    cap = 20
    w = wsd_factory(
        CHANNELS,
        base=base(
            write_high_water_bytes=16384,
            coalesce_window_ms=0,  # this test inspects the outbox right after each publish
            message_buffer_size=cap,
            slow_consumer_timeout_ms=60000,
            breaker_cooldown_ms=100,
        ),
    )
    raw, cid = await stalled_client(w)
    try:
        async with Ctl(w) as ctl:
            await congest(ctl, cid, priority="high")
            depth = (await ctl("connections.get", id=cid))["queue"]["depth"]
            lows = [
                (
                    await ctl(
                        "publish", channel="trading-signals/acme", type="low", priority="low", data={"i": i}
                    )
                )["offset"]
                for i in range(5)
            ]
            normals = [
                (await ctl("publish", channel="trading-signals/acme", type="normal", data={"i": i}))["offset"]
                for i in range(cap - depth - 5)
            ]
            c = await ctl("connections.get", id=cid)
            assert c["queue"]["depth"] == cap and c["queue"]["dropped_overflow"] == 0
            highs = [
                (
                    await ctl(
                        "publish", channel="trading-signals/acme", type="high", priority="high", data={"i": i}
                    )
                )["offset"]
                for i in range(3)
            ]
            c = await ctl("connections.get", id=cid)
        assert c["queue"]["dropped_overflow"] == 3 and c["queue"]["depth"] == cap
        assert c["queue"]["by_priority"]["low"] == 2
        assert (await w.ctl("metrics.get"))["queues"]["dropped_overflow"] == 3
        got = await read_messages(raw, lambda g: any(m["offset"] == lows[-1] for m, _ in g))
        seen = [m["offset"] for m, _ in got]
        assert set(lows[:3]).isdisjoint(seen), "the oldest low messages should have been dropped"
        assert set(lows[3:]) | set(normals) | set(highs) <= set(seen)
        # Drained by priority: the high ones first, the surviving lows last.
        assert max(seen.index(o) for o in highs) < min(seen.index(o) for o in normals)
        assert max(seen.index(o) for o in normals) < min(seen.index(o) for o in lows[3:])
    finally:
        raw.close()


async def test_repeated_overflow_closes_with_4009(wsd_factory):
    """A connection whose outbox keeps overflowing is closed as a slow consumer (4009), drops counted."""
    w = wsd_factory(
        CHANNELS,
        base=base(
            write_high_water_bytes=16384,
            message_buffer_size=5,
            slow_consumer_timeout_ms=60000,
            overflow_close_count=10,
        ),
    )
    raw, cid = await stalled_client(w)
    try:
        async with Ctl(w) as ctl:
            await congest(ctl, cid)
            for i in range(20):
                await ctl("publish", channel="trading-signals/acme", type="more", data={"i": i})

        async def closed() -> bool:
            evs = (await w.ctl("events.recent", limit=200))["events"]
            return any(e["event"] == "disconnect" and e["connection_id"] == cid for e in evs)

        await wait_for(closed, timeout=10)
        evs = (await w.ctl("events.recent", limit=200))["events"]
        slow = [e for e in evs if e["event"] == "slow_consumer" and e["connection_id"] == cid]
        assert len(slow) == 1 and "overflow" in slow[0]["reason"]
        gone = [e for e in evs if e["event"] == "disconnect" and e["connection_id"] == cid]
        assert gone[0]["code"] == 4009
        q = (await w.ctl("metrics.get"))["queues"]
        assert q["dropped_overflow"] >= 10 and q["slow_consumers"] == 1
    finally:
        raw.close()


async def test_control_socket_sources(wsd_factory):
    """Control-socket publish (type/priority/ttl_s), narrowed broadcast and send reach the right clients."""
    w = wsd_factory(CHANNELS)
    a = await w.connect("frontend", make_token("alice", "acme"))
    b = await w.connect("mt5", make_token("bob", "acme"))
    c = await w.connect("frontend", make_token("carol", "globex"))
    try:
        ids = [(await welcome(x))["connection_id"] for x in (a, b, c)]
        assert (await request(a, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        res = await w.ctl(
            "publish",
            channel="trading-signals/acme",
            type="signal",
            priority="high",
            ttl_s=30,
            data={"px": 1},
        )
        m = await recv_json(a)
        assert (m["msg_type"], m["priority"], m["data"], m["offset"]) == (
            "signal",
            "high",
            {"px": 1},
            res["offset"],
        )

        res = await w.ctl("broadcast", data={"b": 1}, type="notice", pool="frontend", company="acme")
        assert res["delivered"] == 1
        res = await w.ctl(
            "broadcast", data={"b": 2}, type="notice", pools=["frontend", "mt5"], priority="critical"
        )
        assert res["delivered"] == 3
        res = await w.ctl("send", connection_id=ids[2][:8], data={"d": 1}, type="direct")
        # the cluster's fields too (one node here: this one, nobody missing)
        assert res == {"delivered": 1, "connection_id": ids[2], "node": "ws-manager-v1", "nodes": ["ws-manager-v1"],
                       "missing": []}
        got_a = [await recv_json(a), await recv_json(a)]
        assert [(x["msg_type"], x["data"]) for x in got_a] == [("notice", {"b": 1}), ("notice", {"b": 2})]
        assert got_a[1]["priority"] == "critical"
        assert [(x["msg_type"], x["data"]) for x in [await recv_json(b)]] == [("notice", {"b": 2})]
        got_c = [await recv_json(c), await recv_json(c)]
        assert [(x["msg_type"], x["data"]) for x in got_c] == [("notice", {"b": 2}), ("direct", {"d": 1})]
    finally:
        for x in (a, b, c):
            await x.close()


async def test_connection_health_is_reported(wsd_factory):
    """connections.get reports health: ping-RTT latency, throughput, error rate and uptime."""
    w = wsd_factory(
        CHANNELS, base=BASE_CONFIG.replace("heartbeat_interval_ms = 30000", "heartbeat_interval_ms = 200")
    )
    async with w.connect(token=make_token("alice", "acme")) as ws:
        cid = (await welcome(ws))["connection_id"]
        await ws.send("not json")
        assert (await recv_json(ws))["ok"] is False
        for i in range(3):
            assert (await request(ws, {"op": "ping", "id": i}))["ok"]

        async def measured() -> bool:
            return (await w.ctl("connections.get", id=cid))["health"]["latency_ms"] > 0

        await wait_for(measured, timeout=5)
        h = (await w.ctl("connections.get", id=cid))["health"]
        assert set(h) >= {"latency_ms", "throughput_msgs_s", "error_rate", "uptime_s"}
        assert 0 < h["latency_ms"] < 1000
        assert h["throughput_msgs_s"] > 0
        assert h["error_rate"] == 0.25  # 1 bad frame out of 4 received
        assert h["uptime_s"] >= 0.2
