"""Sessions that resume from the client's position, that a reconnect takes over, and that survive their node.

Real daemons, real clients; the cross-node tests run two nodes on a private redis-server.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
from typing import Any

import msgspec
import pytest

from tests.harness import (
    ControlError,
    closed_with,
    frames_before,
    handshake,
    make_token,
    recv_until,
    request,
    wait_for,
    welcome,
)
from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401  # the redis_url fixture
from wsd.client import Client, TakenOver

_ids = itertools.count(1)
CH = "trading-signals/acme"


def since_param(positions: dict[str, tuple[int, str]]) -> str:
    blob = json.dumps({ch: [off, ep] for ch, (off, ep) in positions.items()}).encode()
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


async def subscribe(ws: Any, channel: str = "trading-signals") -> dict[str, Any]:
    reply = await request(ws, {"op": "subscribe", "id": next(_ids), "channel": channel})
    assert reply["ok"], reply
    return reply["result"]


async def publish(node: Any, n: int, tag: str, channel: str = CH) -> list[dict[str, Any]]:
    return [await node.ctl("publish", channel=channel, data={tag: i}) for i in range(1, n + 1)]


async def messages(ws: Any, n: int) -> list[dict[str, Any]]:
    return [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(n)]


async def gone(node: Any, conn_id: str) -> None:
    async def check() -> bool:
        try:
            await node.ctl("connections.get", id=conn_id)
        except ControlError as exc:
            return exc.code == "not_found"
        return False
    await wait_for(check)


async def up_to_sentinel(node: Any, ws: Any, marker: str) -> list[dict[str, Any]]:
    await node.ctl("publish", channel=CH, data={"sentinel": marker})
    return [m for m in await frames_before(ws, marker) if m.get("type") in ("message", "recovery")]


# -- takeover ---------------------------------------------------------------------------------------------

async def test_a_resume_takes_over_a_session_still_open(wsd):
    """The old connection is closed with 4011 at once, the new one is resumed with its subscriptions and gets
    everything after the old connection's position, then live."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as old:
        w1 = await welcome(old)
        await subscribe(old)
        await publish(wsd, 2, "a")
        assert [m["offset"] for m in await messages(old, 2)] == [1, 2]
        async with wsd.connect(token=token, query={"session": w1["session_id"]}) as new:
            w2 = await welcome(new)
            assert w2["resumed"] is True and w2["session_id"] == w1["session_id"]
            assert CH in w2["subscriptions"] and "system-status" in w2["subscriptions"]
            code, reason = await closed_with(old)
            assert (code, reason) == (4011, "session taken over")
            await publish(wsd, 1, "live")
            got = await up_to_sentinel(wsd, new, "t")
            assert [(m["offset"], m.get("history", False)) for m in got] == [(3, False)]
            info = await wsd.ctl("connections.get", id=w2["connection_id"])
            assert info["metrics"]["reconnection_count"] == 1


async def test_takeover_with_client_positions_replays_what_the_client_did_not_process(wsd):
    """Messages the server wrote to the old connection but the client never processed come again (history)."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as old:
        w1 = await welcome(old)
        await subscribe(old)
        await publish(wsd, 4, "a")
        got = await messages(old, 4)
        epoch = got[0]["epoch"]
        since = since_param({CH: (1, epoch)})  # the client only processed offset 1
        async with wsd.connect(token=token, query={"session": w1["session_id"], "since": since}) as new:
            w2 = await welcome(new)
            assert w2["resumed"] is True
            assert (await closed_with(old))[0] == 4011
            await publish(wsd, 1, "live")
            got = await up_to_sentinel(wsd, new, "p")
            assert [(m["offset"], m.get("history", False)) for m in got] == [
                (2, True), (3, True), (4, True), (5, False)]


async def test_only_the_owner_takes_a_session_over(wsd):
    """Another user (or the same user id in another company) naming the session gets a fresh one; the owner's
    connection stays open and keeps its session."""
    async with wsd.connect(token=make_token("alice", "acme")) as old:
        w1 = await welcome(old)
        await subscribe(old)
        for user, company in (("bob", "acme"), ("alice", "globex")):
            async with wsd.connect(token=make_token(user, company), query={"session": w1["session_id"]}) as other:
                w = await welcome(other)
                assert w["resumed"] is False and w["session_id"] != w1["session_id"]
                assert CH not in w["subscriptions"]
        r = await request(old, {"op": "ping", "id": 99})
        assert r["ok"]
        await publish(wsd, 1, "still")
        assert (await messages(old, 1))[0]["data"] == {"still": 1}


async def test_the_client_stops_when_its_session_is_taken_over(wsd):
    """wsd.client treats 4011 as "another connection won": it stops with TakenOver and does not reconnect."""
    token = make_token("alice", "acme")
    client = Client(wsd.url(), token=token, backoff_base=0.05)
    async with client:
        sub = await client.subscribe("trading-signals")
        async with wsd.connect(token=token, query={"session": client.session_id}) as ws:
            assert (await welcome(ws))["resumed"] is True
            with pytest.raises(TakenOver):
                async with asyncio.timeout(10):
                    async for _ in sub:
                        pass
            assert client.state == "closed" and client.connections == 1

            async def only_the_new_one() -> bool:
                return (await wsd.ctl("connections.list"))["total"] == 1
            await wait_for(only_the_new_one)  # the client did not come back


async def test_a_takeover_is_not_refused_by_the_per_user_connection_limit(wsd_factory):
    """A takeover replaces the old connection: at max_connections_per_user it is admitted, a new one is not."""
    from tests.harness import BASE_CONFIG

    node = wsd_factory(base=BASE_CONFIG.replace("max_connections_per_user = 1000", "max_connections_per_user = 1"))
    token = make_token("alice", "acme")
    async with node.connect(token=token) as old:
        w1 = await welcome(old)
        status, _, body = handshake(node.port, f"/ws/frontend?token={token}")
        assert status == 429 and json.loads(body)["error"] == "too_many_connections"
        async with node.connect(token=token, query={"session": w1["session_id"]}) as new:
            assert (await welcome(new))["resumed"] is True
            assert (await closed_with(old))[0] == 4011


# -- resume from the client's position ---------------------------------------------------------------------

async def test_resume_replays_from_the_position_the_client_gives(wsd):
    """After a drop, `since` makes the replay start after what the client processed, not after what the
    server wrote (messages written into a dying socket are not lost)."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws)
        await publish(wsd, 3, "a")
        got = await messages(ws, 3)
        epoch = got[0]["epoch"]
        ws.transport.abort()
    await gone(wsd, w1["connection_id"])
    await publish(wsd, 1, "away")
    query = {"session": w1["session_id"], "since": since_param({CH: (1, epoch)})}
    async with wsd.connect(token=token, query=query) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is True
        got = await up_to_sentinel(wsd, ws, "s")
        assert [(m["offset"], m.get("history", False)) for m in got] == [(2, True), (3, True), (4, True)]


async def test_resume_without_since_still_replays_from_what_was_written(wsd):
    """A client that gives no positions resumes as before: after the last message written to it."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws)
        await publish(wsd, 2, "a")
        await messages(ws, 2)
        await ws.close(4999)
    await gone(wsd, w1["connection_id"])
    async with wsd.connect(token=token, query={"session": w1["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        got = await up_to_sentinel(wsd, ws, "w")
        assert got == []


@pytest.mark.parametrize("since, words", [
    ("!!!", "not base64url"),
    (base64.urlsafe_b64encode(b"[1,2]").decode(), "JSON object"),
    (base64.urlsafe_b64encode(b'{"trading-signals/acme": [-1, "e"]}').decode(), ">= 0"),
    (base64.urlsafe_b64encode(b'{"trading-signals/acme": {"offset": 1}}').decode(), "JSON object"),
    ("A" * 7000, "at most 6144"),
])
def test_a_bad_since_is_refused_with_400(wsd, since, words):
    token = make_token("alice", "acme")
    status, _, body = handshake(wsd.port, f"/ws/frontend?token={token}&session=x&since={since}")
    reply = json.loads(body)
    assert status == 400 and reply["error"] == "bad_request", (status, body)
    assert words in reply["message"] and "since" in reply["message"]


def test_since_without_session_is_refused(wsd):
    token = make_token("alice", "acme")
    status, _, body = handshake(wsd.port, f"/ws/frontend?token={token}&since={since_param({CH: (1, 'e')})}")
    assert status == 400 and "only taken with session" in json.loads(body)["message"]


def test_since_naming_more_channels_than_a_connection_may_hold_is_refused(wsd_factory):
    from tests.harness import BASE_CONFIG

    node = wsd_factory(base=BASE_CONFIG.replace("[limits]\n", "[limits]\nmax_subscriptions_per_connection = 2\n"))
    token = make_token("alice", "acme")
    since = since_param({f"c{i}": (1, "e") for i in range(3)})
    status, _, body = handshake(node.port, f"/ws/frontend?token={token}&session=x&since={since}")
    assert status == 400 and "at most 2" in json.loads(body)["message"]


# -- sessions that survive their node (Redis) ----------------------------------------------------------------

def stored_session(url: str, prefix: str, sid: str) -> dict[str, Any] | None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        raw = r.get(f"{prefix}:session:{sid}")
    finally:
        r.close()
    return msgspec.json.decode(raw) if raw else None


async def test_a_session_survives_a_kill_9_of_its_node(wsd_factory, redis_url):  # noqa: F811
    """A client of a killed node resumes on another with its session id: resumed, every missed message
    (duplicates allowed, marked history), no gap."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    async with a.connect(token=token) as ws:
        w1 = await welcome(ws)
        sid = w1["session_id"]
        await subscribe(ws)

        async def has_sub() -> bool:
            s = stored_session(redis_url, prefix, sid)
            return s is not None and CH in [x["channel"] for x in s["subs"]]
        await wait_for(has_sub)  # the subscription is written at once, not only at close
        await publish(b, 3, "a")
        got = await messages(ws, 3)
        epoch = got[0]["epoch"]

        async def has_position() -> bool:
            s = stored_session(redis_url, prefix, sid)
            return s is not None and any(x["channel"] == CH and x["offset"] == 3 for x in s["subs"])
        await wait_for(has_position, timeout=5)  # positions at least every second
        a.proc.kill()
        a.proc.wait(5)
    await publish(b, 2, "away")
    async with b.connect(token=token, query={"session": sid}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is True and w2["session_id"] == sid and CH in w2["subscriptions"]
        got = await up_to_sentinel(b, ws, "k")
        offsets = [m["offset"] for m in got if m["type"] == "message"]
        assert offsets[-2:] == [4, 5] and sorted(set(offsets)) == list(range(offsets[0], 6))
        assert all(m.get("history") for m in got) and all(m["epoch"] == epoch for m in got)
        assert not any(m["type"] == "recovery" for m in got)


async def test_positions_a_node_never_flushed_are_replayed_from_the_client_position(wsd_factory,
                                                                                    redis_url):  # noqa: F811
    """Killed before its position was written, the node leaves an older position: the resume replays from it
    (duplicates, marked history), or from the client's `since`, never leaving a hole."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    async with a.connect(token=token) as ws:
        w1 = await welcome(ws)
        sid = w1["session_id"]
        await subscribe(ws)
        await publish(b, 2, "a")
        got = await messages(ws, 2)
        a.proc.kill()
        a.proc.wait(5)
    query = {"session": sid, "since": since_param({CH: (2, got[0]["epoch"])})}
    await publish(b, 1, "away")
    async with b.connect(token=token, query=query) as ws:
        assert (await welcome(ws))["resumed"] is True
        got = await up_to_sentinel(b, ws, "c")
        assert [(m["offset"], m.get("history", False)) for m in got] == [(3, True)]


@pytest.mark.parametrize("how", ["close", "kick"])
async def test_a_normal_close_or_a_kick_ends_a_live_session_in_redis(wsd_factory, redis_url, how):  # noqa: F811
    """1000 or a kick ends the session as it always did: the live session written to Redis is deleted."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    async with a.connect(token=token) as ws:
        w1 = await welcome(ws)
        sid = w1["session_id"]
        await subscribe(ws)

        async def stored() -> bool:
            return stored_session(redis_url, prefix, sid) is not None
        await wait_for(stored)
        if how == "kick":
            await a.ctl("kick", ids=[w1["connection_id"]], reason="bye")
            assert (await closed_with(ws))[0] == 4000
    await gone(a, w1["connection_id"])
    assert stored_session(redis_url, prefix, sid) is None
    async with a.connect(token=token, query={"session": sid}) as ws:
        assert (await welcome(ws))["resumed"] is False


async def test_a_resume_on_another_node_takes_over_the_session_still_open(wsd_factory, redis_url):  # noqa: F811
    """A client that reconnects to node B while node A still holds its old connection: B resumes the session
    (from Redis) at once and A closes the old connection with 4011, keeping nothing of its own."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    async with a.connect(token=token) as old:
        w1 = await welcome(old)
        sid = w1["session_id"]
        await subscribe(old)
        await publish(b, 2, "a")
        got = await messages(old, 2)
        since = since_param({CH: (2, got[0]["epoch"])})
        async with b.connect(token=token, query={"session": sid, "since": since}) as new:
            w2 = await welcome(new)
            assert w2["resumed"] is True and w2["session_id"] == sid and CH in w2["subscriptions"]
            assert await closed_with(old) == (4011, "session taken over")
            await gone(a, w1["connection_id"])
            await publish(b, 1, "live")
            got = await up_to_sentinel(b, new, "x")
            # (live, or from history when the node's bus check saw the position move before the bus message came)
            assert [(m["type"], m["offset"]) for m in got] == [("message", 3)]
            s = stored_session(redis_url, prefix, sid)  # A neither dropped nor overwrote it on its way out
            assert s is not None and CH in [x["channel"] for x in s["subs"]]


async def test_a_takeover_on_one_redis_node_keeps_the_session_stored(wsd_factory, redis_url):  # noqa: F811
    """On one node of a Redis pair the takeover works as on the memory engine and the session stays stored."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    async with a.connect(token=token) as old:
        w1 = await welcome(old)
        await subscribe(old)
        async with a.connect(token=token, query={"session": w1["session_id"]}) as new:
            assert (await welcome(new))["resumed"] is True
            assert (await closed_with(old))[0] == 4011
            await gone(a, w1["connection_id"])
            s = stored_session(redis_url, prefix, w1["session_id"])
            assert s is not None and CH in [x["channel"] for x in s["subs"]]


async def test_the_client_resumes_from_what_it_received(wsd):
    """wsd.client sends its positions when it resumes: the server replays from them, so the client needs no
    `history since` of its own, and the application sees each message once, in order."""
    token = make_token("alice", "acme")
    client = Client(wsd.url(), token=token, backoff_base=0.05)
    async with client:
        sub = await client.subscribe("trading-signals")
        await publish(wsd, 3, "a")
        taken = []
        async with asyncio.timeout(10):
            async for item in sub:
                taken.append(item.offset)
                if len(taken) == 3:
                    break
        since = dict(client._resume_positions())
        assert since[CH].offset == 3
        client._conn.ws.transport.abort()  # type: ignore[union-attr]  # a dropped network: no close frame

        async def resumed() -> bool:
            return client.connections == 2 and client.state == "open"
        await wait_for(resumed, timeout=10)
        assert client.welcome["resumed"] is True
        await publish(wsd, 2, "b")
        async with asyncio.timeout(10):
            async for item in sub:
                taken.append(item.offset)
                if len(taken) == 5:
                    break
        assert taken == [1, 2, 3, 4, 5]
        assert client.history_fills == 0 and client.gaps == 0


async def test_a_takeover_moves_unacked_reliable_messages_to_the_new_connection(wsd_factory):
    """Reliable messages the old connection never acked are sent again, same seq, on the connection that took over."""
    from tests.test_reliable import BASE, CONFIG

    node = wsd_factory(CONFIG.replace("ack_timeout_ms = 300", "ack_timeout_ms = 5000"), base=BASE)
    token = make_token("alice", "acme")
    async with node.connect("mt5", token) as old:
        w1 = await welcome(old)
        await subscribe(old)
        await node.ctl("publish", channel=CH, type="order", data={"o": 1})
        m = await recv_until(old, lambda f: f.get("type") == "message")
        assert m["seq"] == 1
        async with node.connect("mt5", token, query={"session": w1["session_id"]}) as new:
            assert (await welcome(new))["resumed"] is True
            again = await recv_until(new, lambda f: f.get("type") == "message")
            assert again["seq"] == 1 and again["data"] == {"o": 1}
            assert (await closed_with(old))[0] == 4011
            await node.ctl("publish", channel=CH, type="order", data={"o": 2})
            nxt = await recv_until(new, lambda f: f.get("type") == "message" and f.get("data") == {"o": 2})
            assert nxt["seq"] == 2
