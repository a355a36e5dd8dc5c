"""One connection's life through real sockets: heartbeats (a raw peer that never pongs is closed), idle
close 4010, token expiry 4001 and `refresh`, the message rate limit 4008, 1009 for an oversized frame,
and bad client frames answered with an error while the connection stays usable."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.exceptions import ConnectionClosed

from tests.harness import closed_with, http_get, make_token, recv_until, request, welcome
from tests.rawws import OP_CLOSE, OP_PING, RawWs, close_code

FAST_HEARTBEAT = {"WSD_MANAGER_HEARTBEAT_INTERVAL_MS": "200"}


async def test_peer_that_never_pongs_is_closed_after_missed_pongs(wsd_factory):
    """A raw client that sees the pings and never answers is closed with 1011 after 3 missed pongs."""
    w = wsd_factory(env=FAST_HEARTBEAT)
    raw = await RawWs.open(w.port, f"/ws/api?token={make_token('mute')}")
    try:
        assert raw.status == 101
        assert (await raw.read_json())["type"] == "welcome"
        started = time.monotonic()
        pings, code = 0, None
        while True:
            try:
                op, payload = await raw.read_frame(timeout=3)
            except EOFError:
                break
            if op == OP_PING:
                pings += 1
            elif op == OP_CLOSE:
                code = close_code(payload)
                break
        elapsed = time.monotonic() - started
    finally:
        raw.close()
    assert pings >= 3, pings
    assert code == 1011
    assert elapsed < 2.0, elapsed
    events = (await w.ctl("events.recent", limit=50))["events"]
    assert any(e["event"] == "heartbeat_timeout" and e["user_id"] == "mute" for e in events)


async def test_answering_client_stays_and_reports_heartbeat_metrics(wsd_factory):
    """A websockets client (it pongs) stays connected across several heartbeats, with latency recorded."""
    w = wsd_factory(env=FAST_HEARTBEAT)
    async with w.connect("api", make_token("pong")) as ws:
        cid = (await welcome(ws))["connection_id"]
        seen: set[float] = set()

        async def beats() -> bool:
            m = (await w.ctl("connections.get", id=cid))["metrics"]
            if m["last_heartbeat"]:
                seen.add(m["last_heartbeat"])
            return len(seen) >= 4

        # The background loop only runs while this task awaits, so poll the control socket.
        deadline = asyncio.get_running_loop().time() + 5
        while not await beats():
            assert asyncio.get_running_loop().time() < deadline, f"only {len(seen)} heartbeats"
            await asyncio.sleep(0.05)
        m = (await w.ctl("connections.get", id=cid))["metrics"]
        assert m["pings_missed"] == 0 and m["avg_latency_ms"] > 0
        assert abs(m["last_heartbeat"] - time.time()) < 5
        assert (await request(ws, {"op": "ping", "id": 1}))["ok"]


async def test_idle_connection_closed_4010_and_traffic_keeps_it_open(wsd_factory):
    """connection_timeout_ms=1000: a client sending frames stays past it; a silent one is closed 4010."""
    w = wsd_factory(env={"WSD_MANAGER_CONNECTION_TIMEOUT_MS": "1000"})
    async with w.connect("api", make_token("idle")) as ws:
        await welcome(ws)
        for i in range(9):  # 9 x 0.2 s of traffic: longer than the idle timeout
            assert (await request(ws, {"op": "ping", "id": i}))["ok"]
            await asyncio.sleep(0.2)
        started = time.monotonic()
        code, reason = await closed_with(ws, timeout=5)
    assert code == 4010 and "idle" in reason
    assert time.monotonic() - started < 3


async def test_token_expiry_closes_4001(wsd_factory):
    """A connection whose token expires is closed with 4001 at exp."""
    w = wsd_factory()
    token = make_token("short", ttl=2)
    exp = jwt_exp(token)
    async with w.connect("api", token) as ws:
        await welcome(ws)
        code, reason = await closed_with(ws, timeout=6)
    assert code == 4001 and "expired" in reason
    assert time.time() >= exp - 0.5


async def test_refresh_with_same_user_keeps_connection_past_exp(wsd_factory):
    """`refresh` with a new token for the same user moves exp: the connection lives past the old exp."""
    w = wsd_factory()
    token = make_token("fresh", ttl=2)
    old_exp = jwt_exp(token)
    async with w.connect("api", token) as ws:
        await welcome(ws)
        new = make_token("fresh", ttl=120)
        reply = await request(ws, {"op": "refresh", "id": 1, "token": new})
        assert reply["ok"] and reply["result"]["exp"] == jwt_exp(new)
        await asyncio.sleep(max(0.0, old_exp - time.time()) + 1.2)  # past the old exp plus one sweep
        assert (await request(ws, {"op": "ping", "id": 2}))["ok"]


async def test_refresh_with_another_users_token_is_refused(wsd_factory):
    """`refresh` with another user's valid token is an error and the old exp still closes with 4001."""
    w = wsd_factory()
    async with w.connect("api", make_token("victim", ttl=2)) as ws:
        await welcome(ws)
        reply = await request(ws, {"op": "refresh", "id": 1, "token": make_token("intruder", ttl=120)})
        assert not reply["ok"] and reply["error"]["code"] == "forbidden"
        bad = await request(ws, {"op": "refresh", "id": 2, "token": "not-a-jwt"})
        assert not bad["ok"] and bad["error"]["code"] == "invalid_token"
        code, _ = await closed_with(ws, timeout=6)
    assert code == 4001


async def test_refresh_must_pass_the_pool_admission_again(wsd):
    """`refresh` with a token the pool would not admit ends the connection (4003); a good one is taken."""
    async with wsd.connect("admin", make_token("root", roles=["admin"])) as ws:
        await welcome(ws)
        demoted = make_token("root", roles=[])
        reply = await request(ws, {"op": "refresh", "id": 2, "token": demoted})
        assert not reply["ok"] and reply["error"]["code"] == "forbidden"
        code, _ = await closed_with(ws)
        assert code == 4003
    async with wsd.connect("admin", make_token("root", roles=["admin"])) as ws:
        await welcome(ws)
        renewed = make_token("root", roles=["admin"], ttl=7200)
        ok = await request(ws, {"op": "refresh", "id": 3, "token": renewed})
        assert ok["ok"]
        cid = (await wsd.ctl("connections.list", user="root"))["items"][0]["id"]
        assert (await wsd.ctl("connections.get", id=cid))["auth"]["roles"] == ["admin"]


async def test_message_rate_limit_closes_4008(wsd_factory):
    """5 msgs/s with a burst of 5: 20 pings sent at once close the connection with 4008."""
    w = wsd_factory(env={"WSD_LIMITS_MESSAGES_PER_CONNECTION_PER_SECOND": "5",
                         "WSD_LIMITS_MESSAGE_BURST": "5"})
    async with w.connect("api", make_token("fast")) as ws:
        await welcome(ws)
        for i in range(20):
            try:
                await ws.send(json.dumps({"op": "ping", "id": i}))
            except ConnectionClosed:
                break
        code, reason = await closed_with(ws, timeout=5)
    assert code == 4008 and "rate" in reason
    status, _ = http_get(w.port, "/healthz")
    assert status == 200


async def test_oversized_frame_closes_1009(wsd_factory):
    """server.max_message_bytes=1024: a 2000-byte frame closes the connection with 1009."""
    w = wsd_factory(env={"WSD_SERVER_MAX_MESSAGE_BYTES": "1024"})
    async with w.connect("api", make_token("big")) as ws:
        await welcome(ws)
        assert (await request(ws, {"op": "ping", "id": "x" * 900}))["ok"]  # under the cap: fine
        await ws.send(json.dumps({"op": "ping", "id": "y" * 2000}))
        code, _ = await closed_with(ws, timeout=5)
    assert code == 1009
    async with w.connect("api", make_token("after")) as ws:  # the daemon is unharmed
        await welcome(ws)


async def test_bad_frames_get_error_replies_and_connection_stays(wsd):
    """Malformed JSON, an unknown op, a wrong field type and a binary frame each get an error reply."""
    async with wsd.connect("api", make_token("sloppy")) as ws:
        await welcome(ws)

        async def error_reply() -> dict:
            return await recv_until(ws, lambda m: m.get("ok") is False)

        await ws.send("{not json")
        assert (await error_reply())["error"]["code"] == "bad_request"
        await ws.send(json.dumps({"op": "teleport", "id": 7}))
        e = await error_reply()
        assert e["error"]["code"] == "unknown_op" and e["id"] == 7
        await ws.send(json.dumps({"op": "subscribe", "id": 8, "channel": 123}))
        e = await error_reply()
        assert e["error"]["code"] == "bad_request" and e["id"] == 8
        await ws.send(b"\x00\x01binary")
        assert (await error_reply())["error"]["code"] == "bad_request"
        assert (await request(ws, {"op": "ping", "id": 9}))["ok"]
        cid = (await wsd.ctl("connections.list", user="sloppy"))["items"][0]["id"]
        assert (await wsd.ctl("connections.get", id=cid))["metrics"]["errors"] == 4
    status, _ = http_get(wsd.port, "/healthz")
    assert status == 200


def jwt_exp(token: str) -> float:
    import jwt

    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_app_level_pings_count_as_answers_to_the_servers_pings(wsd_factory):
    """A client that cannot see ping frames (it never pongs) but sends `{"op":"ping"}` once per heartbeat
    interval stays connected well past the 3 missed pongs that close a mute one."""
    w = wsd_factory(env=FAST_HEARTBEAT)
    raw = await RawWs.open(w.port, f"/ws/api?token={make_token('mql5')}")
    try:
        assert raw.status == 101
        assert (await raw.read_json())["type"] == "welcome"
        pings, replies, n = 0, 0, 0
        while pings < 8:  # 8 server pings at 200 ms, none ponged: a mute client is closed after 3
            op, payload = await raw.read_frame(timeout=3)
            assert op != OP_CLOSE, f"closed with {close_code(payload)} after {pings} pings"
            if op == OP_PING:
                pings += 1
                n += 1
                await raw.send_frame(0x1, json.dumps({"op": "ping", "id": n}).encode())
            elif b'"pong"' in payload:
                replies += 1
        assert replies >= 6, replies
    finally:
        raw.close()
