"""Reliable delivery through real clients: per-connection seq, resends until ack or max_retries, resume.

The daemon's sweep runs every heartbeat_interval_ms / 4 (here 100 ms), which is when due resends go out.
Where a test must show that something did NOT happen, it waits for a connection that never acks to
be given up (so every deadline has passed) and then reads up to a sentinel.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from tests.harness import BASE_CONFIG, Wsd, closed_with, make_token, recv_json, request, wait_for, welcome

BASE = BASE_CONFIG.replace("heartbeat_interval_ms = 30000", "heartbeat_interval_ms = 400")

CONFIG = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["mt5", "api", "admin"]

[[routing.rules]]
id = "orders"
priority = 10
filter = { message_types = ["order"] }
target = { type = "channel", reliable_delivery = true, max_retries = 2, ack_timeout_ms = 300 }
"""


async def joined(w: Wsd, user: str, pool: str = "mt5", **query: str) -> tuple[Any, dict[str, Any]]:
    """A client subscribed to its company's trading-signals: (ws, welcome)."""
    ws = await w.connect(pool, make_token(user, "acme"), query=query)
    hello = await welcome(ws)
    if not hello.get("resumed"):
        assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
    return ws, hello


def messages(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in frames:
        if f.get("type") == "batch":
            out.extend(f["messages"])
        elif f.get("type") == "message":
            out.append(f)
    return out


async def before_sentinel(w: Wsd, ws: Any, conn_id: str) -> list[dict[str, Any]]:
    """The messages a client gets before a sentinel sent to it now (batches flattened)."""
    mark = secrets.token_hex(4)
    await w.ctl("send", connection_id=conn_id, type="sentinel", data={"mark": mark})
    got: list[dict[str, Any]] = []
    while True:
        f = await recv_json(ws)
        for m in messages([f]):
            if m.get("msg_type") == "sentinel" and m["data"] == {"mark": mark}:
                return got
            got.append(m)


async def next_message(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        ms = messages([await recv_json(ws, timeout)])
        if ms:
            assert len(ms) == 1, ms
            return ms[0]


async def test_unacked_message_is_resent_with_same_seq_then_given_up(wsd_factory):
    """An unacked reliable message is resent twice with its seq (max_retries=2), then given up."""
    w = wsd_factory(CONFIG, base=BASE)
    ws, hello = await joined(w, "alice")
    cid = hello["connection_id"]
    try:
        res = await w.ctl("publish", channel="trading-signals/acme", type="order", data={"qty": 3})
        first = await next_message(ws)
        assert first["seq"] == 1 and first["data"] == {"qty": 3} and first["offset"] == res["offset"]
        again = [await next_message(ws, 3) for _ in range(2)]
        assert [(m["seq"], m["data"], m["offset"]) for m in again] == [(1, {"qty": 3}, res["offset"])] * 2

        async def given_up() -> bool:
            return (await w.ctl("connections.get", id=cid))["reliable"]["given_up"] == 1

        await wait_for(given_up, timeout=5)
        assert await before_sentinel(w, ws, cid) == []  # no third resend
        c = await w.ctl("connections.get", id=cid)
        assert c["reliable"] == {"next_seq": 2, "unacked": 0, "resent": 2, "given_up": 1}
        q = (await w.ctl("metrics.get"))["queues"]
        assert q["reliable_resent"] == 2 and q["reliable_given_up"] == 1
        # The next reliable message on this connection takes the next seq.
        await w.ctl("publish", channel="trading-signals/acme", type="order", data={"qty": 4})
        nxt = await next_message(ws)
        assert (nxt["seq"], nxt["data"]) == (2, {"qty": 4})
        await ws.send(json.dumps({"op": "ack", "seq": 2}))
    finally:
        await ws.close()


async def test_ack_stops_resends(wsd_factory):
    """An ack stops resends: acking at once gives one copy, after one resend two; seq per connection."""
    w = wsd_factory(CONFIG, base=BASE)
    prompt, p_hello = await joined(w, "alice")
    late, l_hello = await joined(w, "bob")
    never, n_hello = await joined(w, "carol")  # never acks: once it is given up, every deadline has passed
    try:
        # An earlier reliable message only to `late` (its seq 1) shows numbering is per connection.
        assert (await request(prompt, {"op": "unsubscribe", "id": 2, "channel": "trading-signals"}))["ok"]
        assert (await request(never, {"op": "unsubscribe", "id": 2, "channel": "trading-signals"}))["ok"]
        await w.ctl("publish", channel="trading-signals/acme", type="order", data={"n": 0})
        m0 = await next_message(late)
        assert m0["seq"] == 1
        await late.send(json.dumps({"op": "ack", "seq": 1}))
        for i, ws in ((3, prompt), (4, never)):
            assert (await request(ws, {"op": "subscribe", "id": i, "channel": "trading-signals"}))["ok"]

        res = await w.ctl("publish", channel="trading-signals/acme", type="order", data={"n": 1})
        assert res["delivered"] == 3
        p1 = await next_message(prompt)
        assert (p1["seq"], p1["data"]) == (1, {"n": 1})
        await prompt.send(json.dumps({"op": "ack", "seq": 1}))
        l1 = await next_message(late)
        assert (l1["seq"], l1["data"]) == (2, {"n": 1})
        l2 = await next_message(late, 3)
        assert (l2["seq"], l2["data"]) == (2, {"n": 1})
        await late.send(json.dumps({"op": "ack", "seq": 2}))

        async def never_given_up() -> bool:
            return (await w.ctl("connections.get", id=n_hello["connection_id"]))["reliable"]["given_up"] == 1

        await wait_for(never_given_up, timeout=5)
        assert await before_sentinel(w, prompt, p_hello["connection_id"]) == []
        assert await before_sentinel(w, late, l_hello["connection_id"]) == []
        assert [m["seq"] for m in await before_sentinel(w, never, n_hello["connection_id"])] == [1, 1, 1]
        rp = (await w.ctl("connections.get", id=p_hello["connection_id"]))["reliable"]
        rl = (await w.ctl("connections.get", id=l_hello["connection_id"]))["reliable"]
        assert (rp["resent"], rp["unacked"], rp["given_up"]) == (0, 0, 0)
        assert (rl["resent"], rl["unacked"], rl["given_up"]) == (1, 0, 0)
        # Acking a seq that is not outstanding, with an id, gets an error reply.
        reply = await request(prompt, {"op": "ack", "id": 9, "seq": 1})
        assert reply["ok"] is False and reply["error"]["code"] == "not_found"
    finally:
        for ws in (prompt, late, never):
            await ws.close()


async def test_unacked_reliable_message_survives_resume(wsd_factory):
    """An unacked reliable message comes again with its seq after a ?session= resume; an ack ends it."""
    w = wsd_factory(CONFIG.replace("ack_timeout_ms = 300", "ack_timeout_ms = 5000"), base=BASE)
    ws, hello = await joined(w, "alice")
    res = await w.ctl("publish", channel="trading-signals/acme", type="order", data={"qty": 7})
    first = await next_message(ws)
    assert first["seq"] == 1
    ws.transport.abort()  # a dropped network: no close frame, the daemon sees 1006 and keeps the session

    async def gone() -> bool:
        return (await w.ctl("connections.list"))["total"] == 0

    await wait_for(gone, timeout=5)
    ws2, hello2 = await joined(w, "alice", session=hello["session_id"])
    try:
        assert hello2["resumed"] is True and hello2["session_id"] == hello["session_id"]
        assert hello2["subscriptions"] == ["trading-signals/acme"]
        again = await before_sentinel(w, ws2, hello2["connection_id"])
        assert [(m["seq"], m["data"], m["offset"]) for m in again] == [(1, {"qty": 7}, res["offset"])]
        r = (await w.ctl("connections.get", id=hello2["connection_id"]))["reliable"]
        assert r["unacked"] == 1 and r["next_seq"] == 2
        await ws2.send(json.dumps({"op": "ack", "seq": 1}))

        async def acked() -> bool:
            return (await w.ctl("connections.get", id=hello2["connection_id"]))["reliable"]["unacked"] == 0

        await wait_for(acked, timeout=5)
        # A new reliable message continues the session's numbering.
        await w.ctl("publish", channel="trading-signals/acme", type="order", data={"qty": 8})
        nxt = await next_message(ws2)
        assert (nxt["seq"], nxt["data"]) == (2, {"qty": 8})
    finally:
        await ws2.close()


async def test_acks_of_a_reliable_burst_are_not_charged_past_the_message_rate(wsd_factory):
    """A burst of reliable messages far above the client's message rate: acking each one does not get the careful
    client closed with 4008 (an ack that settles a sent message is owed); other frames past the rate still are."""
    w = wsd_factory(CONFIG, base=BASE, env={"WSD_LIMITS_MESSAGES_PER_CONNECTION_PER_SECOND": "2",
                                            "WSD_LIMITS_MESSAGE_BURST": "3"})
    ws, hello = await joined(w, "alice")
    try:
        for i in range(30):
            await w.ctl("publish", channel="trading-signals/acme", type="order", data={"n": i})
        seqs = []
        while len(seqs) < 30:
            m = await next_message(ws)
            if m.get("seq") not in seqs:
                seqs.append(m["seq"])
                await ws.send(json.dumps({"op": "ack", "seq": m["seq"]}))
        await wait_for(lambda: _unacked_is(w, hello["connection_id"], 0))
        # An ack of nothing outstanding is charged like any frame: the rate still holds.
        for _ in range(10):
            await ws.send(json.dumps({"op": "ack", "seq": 999}))
        code, _ = await closed_with(ws)
        assert code == 4008
    finally:
        await ws.close()


async def _unacked_is(w: Wsd, cid: str, n: int) -> bool:
    return (await w.ctl("connections.get", id=cid))["reliable"]["unacked"] == n
