"""The websockets adapter: websockets' sans-I/O protocol driven per connection, with nothing kept that an open
connection does not need (no instance dict, no task, no handshake request)."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import struct
import weakref

from websockets.frames import Frame, Opcode

from tests.harness import make_token, recv_json, request, welcome
from tests.rawws import OP_CLOSE, OP_TEXT, RawWs, close_code
from wsd.runtime.wsadapter import OPEN, WsdServerConnection, WsdServerProtocol, forget_request

HANDSHAKE = ("GET /ws/api HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
             "Authorization: Bearer secret-token\r\n\r\n").encode()


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client frame (masked, as clients must), fragment of a message unless ``fin``."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_connection_has_no_instance_dict():
    """Every per-connection attribute is a slot: no __dict__ (~1 KiB each at 30 keys) per connection."""
    ws = WsdServerConnection()
    assert not hasattr(ws, "__dict__")
    assert ws.protocol.id == WsdServerProtocol(None).id  # no uuid4 per connection either


def test_an_open_protocol_lets_the_handshake_request_go_and_still_parses_frames():
    proto = WsdServerProtocol(1 << 20)
    proto.receive_data(HANDSHAKE)
    [req] = proto.events_received()
    gone = weakref.ref(req)
    proto.send_response(proto.accept(req))
    assert proto.state is OPEN
    del req
    gc.collect()
    assert gone() is not None  # websockets' parser frame still holds it
    assert forget_request(proto)
    gc.collect()
    assert gone() is None  # and the token in its headers with it
    proto.receive_data(masked(OP_TEXT, b'{"op":"ping"}'))
    [frame] = proto.events_received()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.TEXT and frame.data == b'{"op":"ping"}'


def test_a_client_that_sent_a_frame_before_the_101_keeps_its_parser_and_its_frame():
    """RFC 6455 4.1 says a client waits for the response; one that does not still gets its frame parsed."""
    proto = WsdServerProtocol(1 << 20)
    frame = masked(OP_TEXT, b'{"op":"ping","id":1}')
    proto.receive_data(HANDSHAKE + frame[:5])  # a frame begun, not complete
    [req] = proto.events_received()
    proto.send_response(proto.accept(req))
    assert not forget_request(proto)
    proto.receive_data(frame[5:])
    [got] = proto.events_received()
    assert got.data == b'{"op":"ping","id":1}'


async def test_a_fragmented_message_is_assembled_and_answered(wsd):
    raw = await RawWs.open(wsd.port, f"/ws/api?token={make_token('frag')}")
    assert raw.status == 101
    await raw.read_json()  # welcome
    body = json.dumps({"op": "ping", "id": "in-three-parts"}).encode()
    raw.writer.write(masked(OP_TEXT, body[:5], fin=False) + masked(0x0, body[5:9], fin=False)
                     + masked(0x9, b"ping between fragments") + masked(0x0, body[9:]))
    reply = await raw.read_json()
    assert reply["id"] == "in-three-parts" and reply["ok"]
    raw.close()


async def test_a_message_in_too_many_fragments_closes_1009_and_the_daemon_serves_on(wsd):
    raw = await RawWs.open(wsd.port, f"/ws/api?token={make_token('frags')}")
    await raw.read_json()
    raw.writer.write(masked(OP_TEXT, b"[", fin=False) + masked(0x0, b" ", fin=False) * 4200)
    while True:
        try:
            op, body = await raw.read_frame()
        except EOFError:
            raise AssertionError("closed without a close frame") from None
        if op == OP_CLOSE:
            break
    assert close_code(body) == 1009
    raw.close()
    async with wsd.connect("api", make_token("after")) as ws:
        await welcome(ws)


async def test_a_burst_of_messages_is_served_in_order_while_reading_pauses_and_resumes(wsd):
    """More messages at once than the connection queues (16): reading pauses, resumes, none is lost or reordered."""
    async with wsd.connect("api", make_token("burst")) as ws:
        await welcome(ws)
        for i in range(300):
            await ws.send(json.dumps({"op": "ping", "id": i}))
        got = [(await recv_json(ws))["id"] for _ in range(300)]
        assert got == list(range(300))
        assert (await request(ws, {"op": "ping", "id": "last"}))["ok"]


async def test_a_subscribe_sent_with_the_handshake_waits_for_the_welcome(wsd):
    """Messages that arrive while the connection is being started are served after it, in order."""
    raw = await RawWs.open(wsd.port, f"/ws/api?token={make_token('early')}")
    raw.writer.write(masked(OP_TEXT, json.dumps({"op": "subscribe", "id": 1, "channel": "system-status"}).encode())
                     + masked(OP_TEXT, json.dumps({"op": "ping", "id": 2}).encode()))
    first = await raw.read_json()
    assert first["type"] == "welcome"
    assert (await raw.read_json())["id"] == 1
    assert (await raw.read_json())["id"] == 2
    raw.close()


async def test_a_ping_sent_with_the_request_is_answered_after_the_101_not_before(wsd):
    """websockets queues the pong as soon as it parses the ping: written then, it came before the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", wsd.port)
    writer.write(HANDSHAKE.replace(b"/ws/api", f"/ws/api?token={make_token('pinger')}".encode())
                 .replace(b"Authorization: Bearer secret-token\r\n", b"") + masked(0x9, b"early"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head[:40]
    raw = RawWs(reader, writer, 101, {}, b"")
    assert await raw.read_frame() == (0xA, b"early")  # the pong, then the welcome
    assert (await raw.read_json())["type"] == "welcome"
    raw.close()


async def test_a_ping_sent_with_a_refused_request_gets_the_refusal_only(wsd):
    reader, writer = await asyncio.open_connection("127.0.0.1", wsd.port)
    writer.write(HANDSHAKE.replace(b"Bearer secret-token", b"Bearer not-a-jwt") + masked(0x9, b"early"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401 "), head[:40]
    rest = await asyncio.wait_for(reader.read(), 5)
    assert b"early" not in rest
    writer.close()
