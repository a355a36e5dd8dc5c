"""Replies to a client that pipelines requests: the daemon writes the replies of one loop turn together.

What the client sees must not change: every request answered, in order; its own channel's pushes in offset
order; and replies it was due before a close are written before the close frame. The requests are sent in one
TCP write (tests/rawws.py frames), so one read of the daemon brings them all.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from tests.harness import BASE_CONFIG, make_token
from tests.rawws import OP_CLOSE, OP_TEXT, RawWs, close_code


def masked_text(obj: Any) -> bytes:
    payload = json.dumps(obj).encode()
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | OP_TEXT]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def open_raw(d: Any, pool: str, user: str) -> RawWs:
    raw = await RawWs.open(d.port, f"/ws/{pool}?token={make_token(user, 'acme')}")
    assert raw.status == 101
    assert (await raw.read_json())["type"] == "welcome"
    return raw


async def test_pipelined_requests_get_every_reply_in_order_and_pushes_in_offset_order(wsd_factory):
    d = wsd_factory()
    raw = await open_raw(d, "api", "pub")
    try:
        frames = [masked_text({"op": "subscribe", "id": 0, "channel": "trading-signals"})]
        for i in range(1, 121):
            if i % 3:
                frames.append(masked_text({"op": "publish", "id": i, "channel": "trading-signals", "type": "t",
                                           "data": {"i": i}}))
            else:
                frames.append(masked_text({"op": "ping", "id": i}))
        raw.writer.write(b"".join(frames))  # one write: the daemon reads them together
        replies: list[dict[str, Any]] = []
        pushes: list[dict[str, Any]] = []
        while len(replies) < 121 or len(pushes) < 80:
            m = await raw.read_json()
            if m.get("type") == "message":
                pushes.append(m)
            elif m.get("type") == "batch":
                pushes.extend(m["messages"])
            elif "id" in m:
                replies.append(m)
    finally:
        raw.close()
    assert [r["id"] for r in replies] == list(range(121))
    assert all(r["ok"] for r in replies)
    assert [p["offset"] for p in pushes] == list(range(1, 81))
    assert [p["data"]["i"] for p in pushes] == [i for i in range(1, 121) if i % 3]
    offsets = {r["id"]: r["result"]["offset"] for r in replies if r["id"] % 3}
    assert [offsets[i] for i in sorted(offsets)] == list(range(1, 81))


async def test_replies_due_before_a_close_are_written_before_the_close_frame(wsd_factory):
    """Ten pings in one write with a message rate of 4 (burst 4): the first four are answered, the fifth
    closes with 4008. The four replies come first, then the close frame."""
    d = wsd_factory(base=BASE_CONFIG.replace("messages_per_connection_per_second = 1000",
                                             "messages_per_connection_per_second = 4")
                    .replace("message_burst = 1000", "message_burst = 4"))
    raw = await open_raw(d, "frontend", "alice")
    try:
        raw.writer.write(b"".join(masked_text({"op": "ping", "id": i}) for i in range(10)))
        seen: list[Any] = []
        while True:
            try:
                op, payload = await raw.read_frame()
            except EOFError:
                break
            if op == OP_TEXT:
                seen.append(json.loads(payload).get("id"))
            elif op == OP_CLOSE:
                seen.append(("close", close_code(payload)))
                break
    finally:
        raw.close()
    assert seen == [0, 1, 2, 3, ("close", 4008)]

