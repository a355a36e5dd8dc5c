"""What a hostile client can do over an admitted connection, against a real daemon.

A flood past the message rate, a token refreshed down to fewer rights, frames nested to break the
decoder, ids with a trailing newline, and every documented error reply of the client ops.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.harness import (
    closed_with,
    frames_before,
    make_token,
    recv_until,
    request,
    wait_for,
    welcome,
)
from tests.rawws import OP_CLOSE, OP_TEXT, RawWs, close_code
from tests.test_redis_engine import redis_url  # noqa: F401  (fixture: a private redis-server)


def audit_records(path: Path, event: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == event:
            out.append(rec)
    return out


def nested(depth: int, leaf: Any = 1) -> Any:
    """A value of ``depth`` nested arrays around ``leaf`` (``nested(0)`` is the leaf)."""
    v = leaf
    for _ in range(depth):
        v = [v]
    return v


# -- a decided close ignores what follows ------------------------------------------------------------------
async def test_rate_limit_flood_is_decided_once_audited_once_and_closed_4008(wsd_factory, tmp_path):
    """2,000 frames at a 5/s limit: close 4008, one audit record, one log line; nothing after is answered."""
    audit = tmp_path / "audit.jsonl"
    w = wsd_factory(env={"WSD_LIMITS_MESSAGES_PER_CONNECTION_PER_SECOND": "5", "WSD_LIMITS_MESSAGE_BURST": "5",
                         "WSD_AUDIT_PATH": str(audit)})
    raw = await RawWs.open(w.port, f"/ws/api?token={make_token('flooder')}")
    assert raw.status == 101
    hello = await raw.read_json()
    assert hello["type"] == "welcome"
    cid = hello["connection_id"]
    for i in range(2000):
        await raw.send_frame(OP_TEXT, json.dumps({"op": "ping", "id": i}).encode())
    replies = []
    while True:
        op, payload = await raw.read_frame(timeout=10)
        if op == OP_CLOSE:
            code = close_code(payload)
            break
        if op == OP_TEXT:
            replies.append(json.loads(payload))
    assert code == 4008
    # Only what the burst allowed was answered; nothing sent after the decision got a reply.
    assert len(replies) <= 5 and all(r["ok"] for r in replies), replies
    await raw.send_frame(OP_CLOSE, payload[:2])
    raw.close()

    async def gone() -> bool:
        return not (await w.ctl("connections.list", user="flooder"))["items"]

    await wait_for(gone, timeout=10)
    recs = [r for r in audit_records(audit, "message_rate_limited") if r["connection_id"] == cid]
    assert len(recs) == 1, recs
    lines = [ln for ln in w.log().splitlines() if "rate_limited" in ln and cid in ln]
    assert len(lines) == 1, lines[:5]


def masked_frames(payload: bytes, count: int) -> bytes:
    """``count`` masked text frames of ``payload``, as one buffer (the mask is zero: XOR leaves bytes as they are)."""
    assert len(payload) < 126
    return (bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload) * count


async def test_one_huge_read_of_tiny_frames_is_cut_off_at_the_decision(wsd_factory, tmp_path):
    """A single 256 KiB write of 20,000 pings: parsed a slice at a time, 4008 once, the rest dropped unparsed;
    another client is served meanwhile and after."""
    audit = tmp_path / "audit.jsonl"
    w = wsd_factory(env={"WSD_LIMITS_MESSAGES_PER_CONNECTION_PER_SECOND": "5", "WSD_LIMITS_MESSAGE_BURST": "5",
                         "WSD_AUDIT_PATH": str(audit)})
    raw = await RawWs.open(w.port, f"/ws/api?token={make_token('bulk')}")
    assert raw.status == 101
    hello = await raw.read_json()
    cid = hello["connection_id"]
    async with w.connect("frontend", make_token("bystander", company="other")) as honest:
        await welcome(honest)
        raw.writer.write(masked_frames(b'{"op":"ping","id":1}', 20000))
        await raw.writer.drain()
        r = await request(honest, {"op": "ping", "id": 7})
        assert r["ok"], r
        replies = 0
        while True:
            op, payload = await raw.read_frame(timeout=10)
            if op == OP_CLOSE:
                assert close_code(payload) == 4008
                break
            replies += op == OP_TEXT
        assert replies <= 5
        raw.close()
        r = await request(honest, {"op": "ping", "id": 8})
        assert r["ok"], r

    async def gone() -> bool:
        return not (await w.ctl("connections.list", user="bulk"))["items"]

    await wait_for(gone, timeout=15)
    assert len([r for r in audit_records(audit, "message_rate_limited") if r["connection_id"] == cid]) == 1
    mgr = (await w.ctl("metrics.get"))["manager"]
    assert mgr["received"] < 1000, mgr["received"]  # the burst and what one slice held, not 20,000
    # what was read after the decision was dropped unparsed, and counted (the rest stayed unread in the kernel):
    # at least the rest of the read whose first 16 KiB slice held the decision
    assert mgr["input_discarded_bytes"] > 16 * 1024, mgr["input_discarded_bytes"]


async def test_frames_after_a_kick_are_not_processed(wsd):
    """After an operator kick is decided, a publish the client still sends is not stored or answered."""
    async with wsd.connect("api", make_token("kicked")) as ws:
        await welcome(ws)
        cid = (await wsd.ctl("connections.list", user="kicked"))["items"][0]["id"]
        await wsd.ctl("kick", ids=[cid], reason="bye")
        for i in range(20):
            try:
                await ws.send(json.dumps({"op": "publish", "id": i, "channel": "trading-signals",
                                          "data": {"after_kick": i}}))
            except Exception:
                break
        code, _ = await closed_with(ws)
    assert code == 4000
    hist = await wsd.ctl("history.get", channel="trading-signals/acme")
    assert not [m for m in hist.get("messages", []) if "after_kick" in json.dumps(m)], hist


# -- rights that outlive the token -------------------------------------------------------------------------
async def test_refresh_drops_subscriptions_the_new_token_does_not_allow(wsd_factory, tmp_path):
    """An admin demoted by refresh loses another tenant's, an admin and another user's channel, told each."""
    audit = tmp_path / "audit.jsonl"
    w = wsd_factory(env={"WSD_AUDIT_PATH": str(audit)})
    foreign = ["trading-signals/globex", "admin-events", "notifications/globex/bob"]
    async with w.connect("api", make_token("root", roles=["admin"])) as ws:
        await welcome(ws)
        for i, ch in enumerate([*foreign, "trading-signals"]):
            r = await request(ws, {"op": "subscribe", "id": i, "channel": ch})
            assert r["ok"], r
        await ws.send(json.dumps({"op": "refresh", "id": "r", "token": make_token("root", roles=[])}))
        seen = []
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if m.get("id") == "r":
                reply = m
                break
            seen.append(m)
        assert reply["ok"], reply
        gone = [m for m in seen if m.get("type") == "unsubscribed"]
        assert sorted(m["channel"] for m in gone) == sorted(foreign), seen
        assert all(m["reason"] == "forbidden" and m["message"] for m in gone)
        for ch in foreign:
            await w.ctl("publish", channel=ch, data={"leak": ch})
        await w.ctl("publish", channel="trading-signals/acme", data={"sentinel": "end"})
        before = await frames_before(ws, "end")
        assert not [m for m in before if m.get("type") == "message"], before
        # A new subscribe is judged by the new token too.
        r = await request(ws, {"op": "subscribe", "id": 9, "channel": "admin-events"})
        assert not r["ok"] and r["error"]["code"] == "forbidden"
    recs = audit_records(audit, "subscriptions_revoked")
    assert len(recs) == 1 and sorted(recs[0]["channels"]) == sorted(foreign), recs


async def test_refresh_with_a_token_the_pool_no_longer_admits_closes_4003(wsd):
    """Admin pool: a refresh token without the admin role (or bound to another pool) closes with 4003."""
    for i, bad in enumerate([make_token("root", roles=[]), make_token("root", roles=["admin"], pool="mt5")]):
        async with wsd.connect("admin", make_token("root", roles=["admin"])) as ws:
            await welcome(ws)
            await ws.send(json.dumps({"op": "refresh", "id": i, "token": bad}))
            reply = await recv_until(ws, lambda m: m.get("id") == i)
            assert not reply["ok"] and reply["error"]["code"] == "forbidden"
            code, reason = await closed_with(ws)
            assert code == 4003 and "not admitted" in reason, (code, reason)


# -- input that breaks the server --------------------------------------------------------------------------
async def test_publish_nested_1000_deep_gets_bad_request_and_nothing_is_stored(wsd):
    """1,000-deep data: an error reply (not a traceback, not a close); history stays readable by others."""
    async with wsd.connect("api", make_token("deep")) as ws:
        await welcome(ws)
        for depth in (1000, 980, 40):
            # Written out by hand: Python's own json module cannot encode 1,000 levels either.
            await ws.send('{"op":"publish","id":%d,"channel":"trading-signals","data":%s1%s}'
                          % (depth, "[" * depth, "]" * depth))
            r = await recv_until(ws, lambda m: m.get("ok") is False)
            assert r["error"]["code"] == "bad_request" and "deeper than" in r["error"]["message"], r
            # The id is salvaged when the decoder can still read the frame (beyond ~900 levels it cannot).
            assert r["id"] in (depth, None), r
        assert (await request(ws, {"op": "ping", "id": "still"}))["ok"]
    async with wsd.connect("api", make_token("reader")) as ws:
        await welcome(ws)
        r = await request(ws, {"op": "history", "id": 1, "channel": "trading-signals"})
        assert r["ok"] and r["result"]["messages"] == []
        # At the default limit (32) a frame may be 32 deep: data 31 deep is stored and served back as sent.
        limit_data = {"a": nested(30)}
        r = await request(ws, {"op": "publish", "id": 2, "channel": "trading-signals", "data": limit_data})
        assert r["ok"], r
        r = await request(ws, {"op": "history", "id": 3, "channel": "trading-signals"})
        assert [m["data"] for m in r["result"]["messages"]] == [limit_data]
    assert "Traceback" not in wsd.log()


async def test_deep_but_allowed_data_round_trips(wsd_factory):
    """limits.max_json_depth = 8: data nested 7 deep is delivered and served from history as sent; 8 is not."""
    w = wsd_factory(env={"WSD_LIMITS_MAX_JSON_DEPTH": "8"})
    data = {"a": nested(6, {"x": "y"})}  # 1 (object) + 6 (arrays) + 1 (inner object) = 8 levels: too deep
    ok_data = {"a": nested(5, {"x": "y"})}  # 7 levels: the frame is then 8 deep, the limit
    async with w.connect("api", make_token("sub")) as sub, w.connect("api", make_token("pub")) as pub:
        await welcome(sub)
        await welcome(pub)
        assert (await request(sub, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        r = await request(pub, {"op": "publish", "id": 1, "channel": "trading-signals", "data": data})
        assert not r["ok"] and r["error"]["code"] == "bad_request", r
        r = await request(pub, {"op": "publish", "id": 2, "channel": "trading-signals", "data": ok_data})
        assert r["ok"], r
        got = await recv_until(sub, lambda m: m.get("type") == "message")
        assert got["data"] == ok_data
        h = await request(sub, {"op": "history", "id": 2, "channel": "trading-signals"})
        assert [m["data"] for m in h["result"]["messages"]] == [ok_data]


async def test_operator_publish_that_could_not_be_sent_again_is_refused(wsd):
    """Operator publishes of data too deep, or not encodable (a lone surrogate), are refused before any store."""
    from tests.harness import ControlError

    bad = [({"data": nested(100)}, "deeper than"), ({"data": {"a": "\ud800"}}, "cannot be encoded"),
           ({"data": {}, "type": "x\ud800"}, "cannot be encoded")]
    for params, words in bad:
        try:
            await wsd.ctl("publish", channel="trading-signals/acme", **params)
        except ControlError as exc:
            assert exc.code == "bad_request" and words in exc.message, exc
        else:
            raise AssertionError(f"{params!r} was accepted")
    hist = await wsd.ctl("history.get", channel="trading-signals/acme")
    assert not hist.get("messages")
    async with wsd.connect("api", make_token("reader")) as ws:
        await welcome(ws)
        r = await request(ws, {"op": "history", "id": 1, "channel": "trading-signals"})
        assert r["ok"] and r["result"]["messages"] == []


async def test_internal_error_answers_internal_closes_1011_and_keeps_the_session(wsd_factory, redis_url):
    """A backend failure while reading history: reply `internal`, close 1011 (never 1000), session resumable.
    (The same failure while publishing is the publication's own: `engine_unavailable`, the connection stays.)"""
    import redis

    w = wsd_factory(env={"WSD_ENGINE_TYPE": "redis", "WSD_ENGINE_URL": redis_url})
    async with w.connect("api", make_token("victim")) as ws:
        hello = await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "notifications"}))["ok"]
        # The history key of the channel holds a value of the wrong type: the engine's write fails.
        r = redis.Redis.from_url(redis_url)
        r.set("wsd:ch:{trading-signals/acme}:hist", "not a stream")
        r.set("wsd:ch:{trading-signals/acme}:meta", "not a hash")
        r.close()
        await ws.send(json.dumps({"op": "publish", "id": 2, "channel": "trading-signals", "data": {}}))
        reply = await recv_until(ws, lambda m: m.get("id") == 2)
        assert not reply["ok"] and reply["error"]["code"] == "engine_unavailable", reply
        assert (await request(ws, {"op": "ping", "id": 3}))["ok"]  # still open
        await ws.send(json.dumps({"op": "history", "id": 4, "channel": "trading-signals"}))
        reply = await recv_until(ws, lambda m: m.get("id") == 4)
        assert not reply["ok"] and reply["error"]["code"] == "internal", reply
        code, _ = await closed_with(ws)
    assert code == 1011

    async def gone() -> bool:
        return not (await w.ctl("connections.list", user="victim"))["items"]

    await wait_for(gone, timeout=10)  # the session is saved when the old connection ends
    async with w.connect("api", make_token("victim"), query={"session": hello["session_id"]}) as ws:
        again = await welcome(ws)
        assert again["resumed"] and again["subscriptions"] == ["notifications/acme/victim"]
    assert w.log().count("internal error serving history") == 1


# -- ids validated exactly ---------------------------------------------------------------------------------
async def test_trailing_newline_in_ids_is_refused(wsd):
    """sub "alice\\n" is a 401 at the handshake; a channel or an admin's instance name with it is refused."""
    from tests.harness import handshake

    status, _, body = handshake(wsd.port, "/ws/api", {"Authorization": "Bearer " + make_token("alice\n")})
    assert status == 401
    err = json.loads(body)
    assert err["error"] == "invalid_token" and "'sub'" in err["message"] and "plain id" in err["message"]
    status, _, body = handshake(wsd.port, "/ws/api",
                                {"Authorization": "Bearer " + make_token("alice", company="acme\n")})
    assert status == 401 and "company_id" in json.loads(body)["message"]
    async with wsd.connect("api", make_token("alice")) as ws:
        await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals\n"})
        assert not r["ok"] and r["error"]["code"] in ("unknown_channel", "bad_request"), r
    async with wsd.connect("admin", make_token("root", roles=["admin"])) as ws:
        await welcome(ws)
        for i, ch in enumerate(["trading-signals/acme\n", "notifications/acme/bob\n"]):
            r = await request(ws, {"op": "subscribe", "id": i, "channel": ch})
            assert not r["ok"] and r["error"]["code"] in ("forbidden", "bad_request"), r


async def test_wsctl_token_refuses_an_id_with_a_trailing_newline(wsd):
    """`wsctl token --user $'alice\\n'` fails with one line naming the parameter; nothing is minted."""
    from tests.test_wsctl import awsctl

    for args in (["--user", "alice\n"], ["--user", "alice", "--company", "acme\n"]):
        r = await awsctl(wsd, "token", *args)
        assert r.rc != 0 and r.out == "", r
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "plain id" in lines[0] and "\\n" in lines[0], r


# -- documented error replies, checked against the code ----------------------------------------------------
async def test_out_of_range_counts_and_offsets_are_bad_request_not_internal(wsd):
    """Counts beyond 2**53 - 1 and negative offsets are `bad_request` naming the field; the connection goes on.

    An unbounded limit used to reach the history buffer and fail there (an internal error and a closed
    connection); a negative `since.offset` was taken as a position.
    """
    huge = 10**20
    frames = [
        ({"op": "subscribe", "channel": "trading-signals", "history": {"limit": huge}}, "$.history.limit"),
        ({"op": "history", "channel": "trading-signals", "limit": huge}, "$.limit"),
        ({"op": "pull", "channel": "trading-signals", "limit": huge}, "$.limit"),
        ({"op": "ack", "seq": huge}, "$.seq"),
        ({"op": "history", "channel": "trading-signals", "since": {"offset": huge, "epoch": "e"}}, "$.since.offset"),
        ({"op": "subscribe", "channel": "trading-signals", "history": {"since": {"offset": -1, "epoch": "e"}}},
         "$.history.since.offset"),
        ({"op": "history", "channel": "trading-signals", "since": {"offset": -1, "epoch": "e"}}, "$.since.offset"),
    ]
    await wsd.ctl("publish", channel="trading-signals/acme", data={"n": 1})
    async with wsd.connect("api", make_token("counter")) as ws:
        await welcome(ws)
        for i, (frame, where) in enumerate(frames):
            r = await request(ws, {**frame, "id": i})
            assert not r["ok"] and r["error"]["code"] == "bad_request", (frame, r)
            assert where in r["error"]["message"], (frame, r)
        assert (await request(ws, {"op": "ping", "id": "alive"}))["ok"]
        r = await request(ws, {"op": "history", "id": "big-ok", "channel": "trading-signals", "limit": 2**53 - 1})
        assert r["ok"] and [m["data"] for m in r["result"]["messages"]] == [{"n": 1}]
    assert "internal error" not in wsd.log()


async def test_deep_frame_with_an_unknown_op_gets_unknown_op(wsd):
    """An unknown op carrying 1,000-deep data: the op is judged first, and the deep rest cannot crash the reply."""
    async with wsd.connect("api", make_token("odd")) as ws:
        await welcome(ws)
        await ws.send('{"op":"teleport","id":5,"data":%s1%s}' % ("[" * 1000, "]" * 1000))
        r = await recv_until(ws, lambda m: m.get("ok") is False)
        assert r["error"]["code"] == "unknown_op" and "teleport" in r["error"]["message"], r
        assert (await request(ws, {"op": "ping", "id": "after"}))["ok"]
    assert "Traceback" not in wsd.log()


def test_config_ids_with_a_trailing_newline_are_refused(tmp_path):
    """A channel group id, a pool id or an engine prefix ending in a newline is a config error, key path named."""
    from wsd.config import ConfigError, load_config

    from tests.harness import SECRET

    text = f"""
[auth]
secret = "{SECRET}"
[engine]
prefix = "wsd\\n"
[channels."news\\n"]
type = "global"
[pools."feed\\n"]
type = "api"
path = "/ws/feed"
"""
    (tmp_path / "wsd.toml").write_text(text)
    try:
        load_config(tmp_path / "wsd.toml", env={})
    except ConfigError as exc:
        errs = exc.errors
    else:
        raise AssertionError("ids ending in a newline were accepted")
    assert any(e.startswith('channels."news\\n"') for e in errs), errs
    assert any(e.startswith('pools."feed\\n"') for e in errs), errs
    assert any(e.startswith("engine.prefix") for e in errs), errs


async def test_library_close_codes_are_the_documented_ones_and_keep_the_session(wsd):
    """Bad UTF-8 in a text frame closes 1007, an unknown opcode 1002 (both documented); the session resumes."""
    from tests.rawws import close_code as code_of

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    for opcode, payload, want in ((OP_TEXT, b'{"op":"ping","id":"\xff"}', 1007), (0x3, b"x", 1002)):
        raw = await RawWs.open(wsd.port, f"/ws/api?token={make_token('utf')}")
        hello = await raw.read_json()
        await raw.send_frame(opcode, payload)
        while True:
            op, body = await raw.read_frame()
            if op == OP_CLOSE:
                break
        assert code_of(body) == want
        raw.close()
        assert f"| {want} |" in doc

        async def gone() -> bool:
            return not (await wsd.ctl("connections.list", user="utf"))["items"]

        await wait_for(gone, timeout=10)  # the session is saved when the old connection ends
        async with wsd.connect("api", make_token("utf"), query={"session": hello["session_id"]}) as ws:
            assert (await welcome(ws))["resumed"]
