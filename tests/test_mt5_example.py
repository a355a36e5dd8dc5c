"""The MetaTrader 5 client of examples/mt5/ (README.md, WsdClient.mq5), played byte for byte over a raw socket.

MQL5 cannot be compiled here, so this test does what the sketch does, in the same order: the absolute-form
request line with the token in the URL, no extension, subprotocol or Origin header, masked text frames only,
pongs to the server's pings, an app-level `{"op":"ping"}`, acks for reliable messages, `batch` frames, and a
session resumed with `session` + `since` after the connection dropped. Every frame the server sends it is
checked: final, no RSV bit (so never compressed), never binary.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable
from typing import Any

from tests.harness import BASE_CONFIG, Wsd, make_token
from tests.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWs, close_code

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Server pings every 0.3 s, so the test sees several and must answer them; signals are reliable (seq + ack)
# and reach terminals with only the fields an expert advisor reads, as in examples/configs/production.toml.
CONFIG = BASE_CONFIG.replace("heartbeat_interval_ms = 30000", "heartbeat_interval_ms = 300")
RULES = """
[[routing.rules]]
id = "trading-signals"
priority = 50
stop = true
filter = { message_types = ["trading_signal"], channels = ["trading-signals"] }
target = { type = "group", group_id = "trading-signals", reliable_delivery = true, max_retries = 3, ack_timeout_ms = 2000 }
pool_transforms = { mt5 = { include_fields = ["symbol", "side", "price", "volume"] } }
"""


class Mt5Client(RawWs):
    """What WsdClient.mq5 does, frame by frame."""

    key: str
    seen_ops: list[int]
    pings_answered: int
    acks: list[int]
    last: dict[str, tuple[int, str]]
    next_id: int
    inbox: list[dict[str, Any]]  # every channel message handled, in order, duplicates dropped

    @classmethod
    async def connect_mt5(cls, w: Wsd, token: str, session: str = "", since: str = "") -> Mt5Client:
        query = f"token={token}" + (f"&session={session}" if session else "") + (f"&since={since}" if since else "")
        target = f"ws://127.0.0.1:{w.port}/ws/mt5?{query}"  # absolute form, as the sketch sends it
        key = base64.b64encode(os.urandom(16)).decode()
        c = await cls.open(w.port, target, {"Sec-WebSocket-Key": key})
        c.key = key
        c.seen_ops, c.pings_answered, c.acks, c.last, c.next_id, c.inbox = [], 0, [], {}, 1, []
        return c

    async def read_checked(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame, checked as the sketch checks it: FIN set, RSV bits clear, text/ping/pong/close."""
        async with asyncio.timeout(timeout):
            b1, b2 = await self.reader.readexactly(2)
            n = b2 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
        op = b1 & 0x0F
        self.seen_ops.append(op)
        assert b1 & 0x80, "a fragmented frame"
        assert b1 & 0x70 == 0, f"RSV bits set (compressed?): {b1:#04x}"
        assert b2 & 0x80 == 0, "a masked server frame"
        assert op in (OP_TEXT, OP_PING, OP_PONG, OP_CLOSE), f"opcode {op}"
        assert op not in (OP_BINARY, OP_CONT)
        return op, payload

    async def next_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text frame as JSON; pings are answered with a pong carrying their payload on the way."""
        while True:
            op, payload = await self.read_checked(timeout)
            if op == OP_PING:
                await self.send_frame(OP_PONG, payload)
                self.pings_answered += 1
            elif op == OP_TEXT:
                return json.loads(payload.decode("utf-8"))
            elif op == OP_CLOSE:
                raise EOFError(f"closed by the server: {close_code(payload)}")

    async def handle_until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """Read frames as the sketch's OnTimer does (ack reliable messages, track positions, unpack batches, keep
        the channel messages in ``inbox``) until one matches ``pred``; that frame."""
        async with asyncio.timeout(timeout):
            while True:
                f = await self.next_json()
                if await self._handle(f, self.inbox, pred):
                    return f

    async def messages(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The first ``n`` channel messages not yet taken from the inbox (reading on until they are there)."""
        if len(self.inbox) < n:
            await self.handle_until(lambda f: len(self.inbox) >= n, timeout)
        out, self.inbox[:] = self.inbox[:n], self.inbox[n:]
        return out

    async def _handle(self, f: dict[str, Any], handled: list[dict[str, Any]],
                      pred: Callable[[dict[str, Any]], bool]) -> bool:
        items = f["messages"] if f.get("type") == "batch" else [f]
        for m in items:
            if m.get("type") != "message":
                continue
            if "seq" in m:
                await self.send_text({"op": "ack", "seq": m["seq"]})
                self.acks.append(m["seq"])
            last = self.last.get(m["channel"])
            if last and last[1] == m["epoch"] and m["offset"] <= last[0]:
                continue  # a duplicate after a resume: dropped by (channel, epoch, offset)
            self.last[m["channel"]] = (m["offset"], m["epoch"])
            handled.append(m)
        return pred(f)

    async def send_text(self, obj: dict[str, Any]) -> None:
        await self.send_frame(OP_TEXT, json.dumps(obj, separators=(",", ":")).encode())

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = {**obj, "id": self.next_id}
        self.next_id += 1
        await self.send_text(obj)
        return await self.handle_until(lambda f: f.get("id") == obj["id"] and "ok" in f)

    def since(self, channel: str) -> str:
        """The `since` query value for the one channel the sketch tracks: base64url, no padding, of
        {"channel": [offset, "epoch"]}."""
        offset, epoch = self.last[channel]
        raw = json.dumps({channel: [offset, epoch]}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


async def test_the_mt5_client_as_documented(wsd_factory: Callable[..., Wsd]) -> None:
    w = wsd_factory(RULES, base=CONFIG)
    token = make_token("trader1", "acme")

    c = await Mt5Client.connect_mt5(w, token)
    # the handshake the sketch checks: 101, the accept for its key, and nothing negotiated
    assert c.status == 101, c.body
    assert "sec-websocket-extensions" not in c.headers and "sec-websocket-protocol" not in c.headers
    assert c.headers["sec-websocket-accept"] == _accept(c.key)
    welcome = await c.next_json()
    assert welcome["type"] == "welcome" and welcome["pool"] == "mt5" and welcome["resumed"] is False
    session = welcome["session_id"]

    sub = await c.request({"op": "subscribe", "channel": "trading-signals"})
    assert sub["ok"] and sub["result"]["channel"] == "trading-signals/acme"
    sub = await c.request({"op": "subscribe", "channel": "notifications", "mode": "batch"})
    assert sub["ok"] and sub["result"]["channel"] == "notifications/acme/trader1"

    pong = await c.request({"op": "ping"})
    assert pong["ok"] and isinstance(pong["result"]["pong"], float)

    # a signal published by the terminal itself comes back reliable, shaped for the mt5 pool: acked
    reply = await c.request({"op": "publish", "channel": "trading-signals", "type": "trading_signal",
                             "data": {"symbol": "EURUSD", "side": "buy", "price": 1.0841, "chart": "big"}})
    assert reply["ok"], reply
    got = await c.messages(1)
    assert got[0]["data"] == {"symbol": "EURUSD", "side": "buy", "price": 1.0841} and got[0]["offset"] == 1
    assert c.acks == [got[0]["seq"]]

    # batch mode: three notifications arrive as one batch frame, in order
    for i in range(3):
        await w.ctl("publish", channel="notifications/acme/trader1", type="note", data={"i": i})
    await c.handle_until(lambda f: f.get("type") == "batch")
    got = await c.messages(3)
    assert [m["data"]["i"] for m in got] == [0, 1, 2]

    # heartbeats: the server's pings are answered, so the connection outlives several missed-pong windows
    try:
        await c.handle_until(lambda f: False, timeout=1.5)  # five heartbeat periods of reading and answering
    except TimeoutError:
        pass
    assert c.pings_answered >= 3

    # the network drops (no close frame): the session is kept; two signals are published meanwhile
    c.writer.transport.abort()
    await asyncio.sleep(0)
    for px in (1.0850, 1.0860):
        await w.ctl("publish", channel="trading-signals/acme", type="trading_signal",
                    data={"symbol": "EURUSD", "side": "sell", "price": px})

    # resume with the session and the positions processed: the missed signals come first, then live ones
    r = await Mt5Client.connect_mt5(w, token, session=session, since=c.since("trading-signals/acme"))
    r.last = dict(c.last)
    assert r.status == 101, r.body
    welcome = await r.next_json()
    assert welcome["resumed"] is True and welcome["session_id"] == session
    assert set(welcome["subscriptions"]) == {"trading-signals/acme", "notifications/acme/trader1"}
    got = await r.messages(2)
    assert [(m["offset"], m["data"]["price"]) for m in got] == [(2, 1.0850), (3, 1.0860)]
    assert all(m.get("history") for m in got)
    await w.ctl("publish", channel="trading-signals/acme", type="trading_signal",
                data={"symbol": "EURUSD", "side": "buy", "price": 1.0870})
    got = await r.messages(1)
    assert got[0]["offset"] == 4 and "history" not in got[0] and "seq" in got[0]

    # a normal close (1000) ends the session: the server echoes it, and a later resume starts afresh
    await r.send_frame(OP_CLOSE, struct.pack("!H", 1000))
    while True:
        op, payload = await r.read_checked()
        if op == OP_CLOSE:
            assert close_code(payload) == 1000
            break
    r.close()
    again = await Mt5Client.connect_mt5(w, token, session=session)
    assert (await again.next_json())["resumed"] is False
    again.close()

    for client in (c, r, again):
        assert OP_BINARY not in client.seen_ops and OP_CONT not in client.seen_ops


async def test_mt5_pool_negotiates_no_compression_even_when_offered(wsd_factory: Callable[..., Wsd]) -> None:
    """A library that offers permessage-deflate anyway gets none on the mt5 pool (compression = false)."""
    w = wsd_factory("[manager.compression]\ncompress_min_bytes = 0\n", base=CONFIG.replace(
        "[manager]\n", "[manager]\nenable_compression = true\n"))
    c = await RawWs.open(w.port, f"ws://127.0.0.1:{w.port}/ws/mt5?token={make_token()}",
                         {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
    assert c.status == 101 and "sec-websocket-extensions" not in c.headers
    c.close()
    f = await RawWs.open(w.port, f"/ws/frontend?token={make_token()}",
                         {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
    assert "permessage-deflate" in f.headers.get("sec-websocket-extensions", "")  # the check can fail
    f.close()


async def test_a_refused_mt5_handshake_is_a_status_and_a_json_body(wsd_factory: Callable[..., Wsd]) -> None:
    """What the sketch prints when the server says no: the status line and the JSON body's error code."""
    w = wsd_factory(base=CONFIG)
    c = await Mt5Client.connect_mt5(w, make_token(secret="another-secret-0123456789-0123456789-abcdef"))
    assert c.status == 401 and json.loads(c.body)["error"] == "invalid_token"
    c.close()
    c = await RawWs.open(w.port, f"ws://127.0.0.1:{w.port}/ws/mt5")
    assert c.status == 401 and json.loads(c.body)["error"] == "missing_token"
    c.close()
