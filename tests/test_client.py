"""wsd.client against real daemons: delivery, history, publish, batches, acks, close codes, tokens,
restarts (a new epoch is a Gap), URL failover, dedupe, gap filling; and its pure backoff / close-code table."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port, make_token, wait_for
from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401  # the Redis fixture
from wsd.client import (
    CLOSE_ACTIONS,
    Backoff,
    Client,
    ClientError,
    Gap,
    Kicked,
    Message,
    NotAdmitted,
    Position,
    close_action,
)

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[pools.frontend]
type = "frontend"
path = "/ws/frontend"
batching = { enabled = true, interval_ms = 100, max_messages = 100 }

[pools.api]
type = "api"
path = "/ws/api"

[channels.trading-signals]
type = "company"
history_size = 3
publishers = ["api", "admin"]

[channels.notifications]
type = "user"
publishers = ["api", "admin"]

[[routing.rules]]
id = "orders"
priority = 10
filter = { message_types = ["order"] }
target = { type = "channel", reliable_delivery = true, max_retries = 5, ack_timeout_ms = 5000 }
"""

FAST = {"backoff_base": 0.05, "backoff_cap": 0.2, "connect_timeout": 10, "request_timeout": 5}


async def take(sub: Any, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(sub.__anext__(), timeout)


async def publish(w: Any, n: int, start: int = 1, **kw: Any) -> list[dict[str, Any]]:
    return [await w.ctl("publish", channel="trading-signals/acme", data={"n": i}, **kw)
            for i in range(start, start + n)]


# ----------------------------------------------------------------- pure parts


def test_backoff_is_exponential_with_full_jitter() -> None:
    """Attempt n waits random() * min(cap, base * 2**n): 0 at random()=0, the ceiling at random()=1."""
    top = Backoff(0.5, 4.0, random=lambda: 1.0)
    assert [top.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert Backoff(0.5, 4.0, random=lambda: 0.0).delay(3) == 0.0
    half = Backoff(0.5, 30.0, random=lambda: 0.5)
    assert half.delay(2) == 1.0 and half.delay(1000) == 15.0
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_close_code_table_covers_the_protocol_and_acts_as_documented() -> None:
    """Every close code docs/protocol.md lists has an action; kicked and not-admitted stop, the rest reconnect."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    table = doc.split("## 15. Close codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(c) for c in re.findall(r"^\| (\d{4}) \|", table, re.MULTILINE)}
    assert documented and documented <= set(CLOSE_ACTIONS), documented - set(CLOSE_ACTIONS)
    assert not close_action(4000).reconnect and close_action(4000).error == "kicked"
    assert not close_action(4003).reconnect and close_action(4003).error == "not_admitted"
    assert not close_action(1000).reconnect
    assert close_action(4001).reconnect and close_action(4001).fresh_token
    for code in (1001, 1006, 1011, 1013, 4008, 4009, 4010):
        assert close_action(code).reconnect and not close_action(code).fresh_token, code
    assert close_action(4008).penalty and close_action(1013).failover and close_action(1001).failover
    assert close_action(None) is CLOSE_ACTIONS[1006]
    assert close_action(4999).reconnect  # an unknown code: reconnect with backoff


# ----------------------------------------------------------------- through real daemons


async def test_live_delivery_history_and_publish(wsd_factory) -> None:
    """Messages published through the client reach its subscription in order; history reads the buffer."""
    w = wsd_factory(CONFIG)
    states: list[str] = []
    async with Client([w.url("api")], make_token("pub", "acme"), on_state=states.append, **FAST) as c:
        assert c.state == "open" and c.session_id and c.url == w.url("api")
        sub = await c.subscribe("trading-signals")
        assert sub.channel == "trading-signals/acme"
        sent = [await c.publish("trading-signals", {"x": i}, type="trading_signal", priority="high")
                for i in range(3)]
        got = [await take(sub) for _ in range(3)]
        assert all(isinstance(m, Message) for m in got)
        assert [(m.channel, m.offset, m.epoch, m.type, m.data, m.seq, m.priority) for m in got] == [
            ("trading-signals/acme", s["offset"], s["epoch"], "trading_signal", {"x": i}, None, "high")
            for i, s in enumerate(sent)]
        assert sub.processed == Position(sent[-1]["offset"], sent[-1]["epoch"])
        assert c.positions == {"trading-signals/acme": sub.processed}
        page = await c.history("trading-signals", limit=2)
        assert page.recovered and [m.data for m in page] == [{"x": 1}, {"x": 2}] and len(page) == 2
        assert all(m.history for m in page)
    assert states[:2] == ["connecting", "open"] and states[-1] == "closed" and c.state == "closed"
    # The iterator ends once the client is closed.
    with pytest.raises(StopAsyncIteration):
        await take(sub)


async def test_batch_frames_are_unpacked_in_order(wsd_factory) -> None:
    """A batch-mode subscription's batch frames come out as single messages, in offset order."""
    w = wsd_factory(CONFIG)
    async with Client(w.url("frontend"), make_token("b", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals", mode="batch")
        sent = await publish(w, 3)
        got = [await take(sub) for _ in range(3)]
        assert [(m.offset, m.data) for m in got] == [(s["offset"], {"n": i + 1}) for i, s in enumerate(sent)]
        cid = c.welcome["connection_id"]
        info = await w.ctl("connections.get", id=cid)
        assert info["subscriptions"][0]["mode"] == "batch"


async def test_reliable_message_is_acked_only_once_taken(wsd_factory) -> None:
    """A reliable message stays unacked while it waits in the subscription; taking it sends the ack."""
    w = wsd_factory(CONFIG)
    async with Client(w.url("api"), make_token("rel", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals")
        cid = c.welcome["connection_id"]
        await w.ctl("publish", channel="trading-signals/acme", type="order", data={"qty": 1})

        async def received() -> bool:
            return sub.pending() == 1

        await wait_for(received, timeout=5)
        await c.ping()  # the server handles frames in order: an ack sent on receipt would be counted by now
        assert (await w.ctl("connections.get", id=cid))["reliable"]["unacked"] == 1
        m = await take(sub)
        assert m.seq == 1 and m.type == "order"

        async def acked() -> bool:
            return (await w.ctl("connections.get", id=cid))["reliable"]["unacked"] == 0

        await wait_for(acked, timeout=5)


async def test_kick_stops_the_client(wsd_factory) -> None:
    """4000 ends the client: the iterator raises Kicked after what it held, and nothing reconnects."""
    w = wsd_factory(CONFIG)
    c = Client([w.url("api")], make_token("k", "acme"), **FAST)
    async with c:
        sub = await c.subscribe("trading-signals")
        await publish(w, 1)
        async def received() -> bool:
            return sub.pending() == 1

        await wait_for(received)
        await w.ctl("kick", ids=[c.welcome["connection_id"]], reason="bye")
        assert isinstance(await take(sub), Message)  # what was received before still comes
        with pytest.raises(Kicked) as exc:
            await take(sub)
        assert exc.value.code == 4000 and "bye" in str(exc.value)
        assert c.state == "closed" and c.connections == 1
        with pytest.raises(Kicked):
            await c.publish("trading-signals", {})
    assert (await w.ctl("connections.list"))["total"] == 0


async def test_expired_token_is_replaced_from_the_callable_and_the_session_resumes(wsd_factory) -> None:
    """At exp the server closes 4001; the client asks the callable for a new token and resumes."""
    w = wsd_factory(CONFIG)
    calls: list[str] = []

    async def token() -> str:
        calls.append("t")
        return make_token("exp", "acme", ttl=2)

    async with Client(w.url("api"), token, refresh_before=None, **FAST) as c:
        sub = await c.subscribe("trading-signals")
        first = c.session_id

        async def reconnected() -> bool:
            return c.connections == 2 and c.state == "open"

        await wait_for(reconnected, timeout=8)
        assert len(calls) == 2 and c.session_id == first and c.welcome["resumed"] is True
        await publish(w, 1)
        assert (await take(sub)).data == {"n": 1}


async def test_token_is_refreshed_before_exp_without_reconnecting(wsd_factory) -> None:
    """With a callable, the client sends `refresh` before exp: the connection outlives the first token."""
    w = wsd_factory(CONFIG)
    calls: list[float] = []

    def token() -> str:
        calls.append(0)
        return make_token("ref", "acme", ttl=3)

    async with Client(w.url("api"), token, refresh_before=2, **FAST) as c:
        sub = await c.subscribe("trading-signals")
        await asyncio.sleep(3.5)  # past the first token's exp (refreshed at about 1.5 s)
        assert c.connections == 1 and c.state == "open" and len(calls) >= 2
        await publish(w, 1)
        assert (await take(sub)).data == {"n": 1}


async def test_static_token_refused_at_handshake_is_a_clear_error(wsd_factory) -> None:
    """A token the server refuses (401) with no callable to get another: NotAdmitted, no retry loop."""
    w = wsd_factory(CONFIG)
    with pytest.raises(NotAdmitted, match="401 invalid_token"):
        async with Client(w.url("api"), "not-a-jwt", **FAST):
            pass


async def test_restart_of_memory_engine_is_a_gap_then_new_messages(wsd_factory) -> None:
    """The daemon restarts (new epoch): the client reconnects, yields a Gap from its position, then goes on."""
    port = free_port()
    w = wsd_factory(CONFIG, port=port)
    async with Client(w.url("api"), make_token("r", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals")
        sent = await publish(w, 2)
        assert [(await take(sub)).offset for _ in range(2)] == [1, 2]
        w.stop()
        w2 = wsd_factory(CONFIG, port=port)

        async def back() -> bool:
            return c.connections == 2 and c.state == "open"

        await wait_for(back, timeout=10)
        gap = await take(sub)
        assert isinstance(gap, Gap), gap
        assert gap.channel == "trading-signals/acme" and gap.last == Position(2, sent[0]["epoch"])
        assert "recovered:false" in gap.reason
        new = (await publish(w2, 1, start=3))[0]
        m = await take(sub)
        assert isinstance(m, Message) and (m.offset, m.epoch, m.data) == (1, new["epoch"], {"n": 3})
        assert m.epoch != sent[0]["epoch"]


async def test_failover_to_the_next_url_with_backoff(wsd_factory) -> None:
    """The first URL's port is closed: the client sleeps a jittered backoff and uses the second URL."""
    w = wsd_factory(CONFIG)
    dead = f"ws://127.0.0.1:{free_port()}/ws/api"
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async with Client([dead, w.url("api")], make_token("f", "acme"), backoff_base=0.25, backoff_cap=1.0,
                      random=lambda: 0.5, sleep=sleep, connect_timeout=10) as c:
        assert c.url == w.url("api") and c.state == "open"
        assert slept == [0.125]  # attempt 0: 0.5 * min(1.0, 0.25)
        sub = await c.subscribe("trading-signals")
        await publish(w, 1)
        assert (await take(sub)).data == {"n": 1}


async def test_duplicates_are_dropped_by_epoch_and_offset(wsd_factory) -> None:
    """History sent again for a channel already received is dropped: each (epoch, offset) comes once."""
    w = wsd_factory(CONFIG)
    async with Client(w.url("api"), make_token("d", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals")
        await publish(w, 3)
        assert [(await take(sub)).offset for _ in range(3)] == [1, 2, 3]
        # The server sends the last 3 again (a subscribe with history on the client's own socket).
        ws = c._conn.ws  # type: ignore[union-attr]
        await ws.send(json.dumps({"op": "subscribe", "id": "again", "channel": "trading-signals",
                                  "history": {"limit": 3}}))

        async def dropped() -> bool:
            return c.duplicates_dropped == 3

        await wait_for(dropped, timeout=5)
        await publish(w, 1, start=4)
        m = await take(sub)
        assert (m.offset, m.data) == (4, {"n": 4}) and sub.pending() == 0


async def test_offsets_skipped_by_a_filter_are_filled_not_reported(wsd_factory) -> None:
    """With types=, other types' offsets are skipped: history shows nothing was missed, so no Gap."""
    w = wsd_factory(CONFIG)
    async with Client(w.url("api"), make_token("f2", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals", types=["a"])
        await w.ctl("publish", channel="trading-signals/acme", type="a", data={"n": 1})
        await w.ctl("publish", channel="trading-signals/acme", type="b", data={"n": 2})
        await w.ctl("publish", channel="trading-signals/acme", type="a", data={"n": 3})
        got = [await take(sub) for _ in range(2)]
        assert [(type(m).__name__, m.offset) for m in got] == [("Message", 1), ("Message", 3)]
        assert c.gaps == 0


async def test_offset_jump_history_cannot_fill_is_a_gap(wsd_factory) -> None:
    """A jump whose messages were evicted (history_size 3) is reported as a Gap between the two positions."""
    w = wsd_factory(CONFIG)
    async with Client(w.url("api"), make_token("g", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals", types=["a"])
        await w.ctl("publish", channel="trading-signals/acme", type="a", data={"n": 1})
        first = await take(sub)
        for i in range(2, 6):
            await w.ctl("publish", channel="trading-signals/acme", type="b", data={"n": i})
        await w.ctl("publish", channel="trading-signals/acme", type="a", data={"n": 6})
        gap = await take(sub)
        assert isinstance(gap, Gap), gap
        assert gap.last == first.position and gap.resumed == Position(6, first.epoch)
        assert "recovered:false" in gap.reason
        m = await take(sub)
        assert (m.offset, m.data) == (6, {"n": 6})


async def test_subscribe_since_a_lost_position_is_a_gap(wsd_factory) -> None:
    """subscribe(since=) a position of another epoch: recovered:false becomes a Gap before what is held."""
    w = wsd_factory(CONFIG)
    await publish(w, 2)
    async with Client(w.url("api"), make_token("s", "acme"), **FAST) as c:
        sub = await c.subscribe("trading-signals", since=Position(7, "gone"))
        gap = await take(sub)
        assert isinstance(gap, Gap) and gap.last == Position(7, "gone") and "recovered:false" in gap.reason
        assert [(await take(sub)).data for _ in range(2)] == [{"n": 1}, {"n": 2}]


async def test_dropped_network_resumes_the_session_without_loss(wsd_factory) -> None:
    """The socket dies; what is published meanwhile comes after the resume, once each, with no Gap."""
    w = wsd_factory(CONFIG)
    gate = asyncio.Event()

    async def sleep(s: float) -> None:
        await gate.wait()  # the test decides when the client reconnects

    async with Client(w.url("api"), make_token("net", "acme"), sleep=sleep, connect_timeout=10) as c:
        sub = await c.subscribe("trading-signals")
        await publish(w, 1)
        assert (await take(sub)).offset == 1
        first = c.session_id
        c._conn.ws.transport.abort()  # type: ignore[union-attr]  # a dropped network: no close frame

        async def gone() -> bool:
            return c.state == "connecting" and (await w.ctl("connections.list"))["total"] == 0

        await wait_for(gone, timeout=5)
        await publish(w, 2, start=2)
        gate.set()
        got = [await take(sub) for _ in range(2)]
        assert [(m.offset, m.data) for m in got] == [(2, {"n": 2}), (3, {"n": 3})]
        assert c.session_id == first and c.welcome["resumed"] is True and c.connections == 2
        await publish(w, 1, start=4)
        assert (await take(sub)).offset == 4 and sub.pending() == 0 and c.gaps == 0


async def test_refresh_the_pool_no_longer_admits_stops_with_not_admitted(wsd_factory) -> None:
    """A refreshed token without the admin role on the admin pool: closed 4003, the client stops (NotAdmitted)."""
    w = wsd_factory()
    tokens = [make_token("root", roles=["admin"], ttl=3), make_token("root", roles=[], ttl=60)]

    def token() -> str:
        return tokens.pop(0) if len(tokens) > 1 else tokens[0]

    async with Client(w.url("admin"), token, refresh_before=2, **FAST) as c:
        sub = await c.subscribe("admin-events")
        with pytest.raises(NotAdmitted) as exc:
            await take(sub, timeout=6)
        assert exc.value.code == 4003 and c.state == "closed" and c.connections == 1


async def test_without_fill_gaps_a_jump_is_a_gap_at_once(wsd_factory) -> None:
    """fill_gaps=False: skipped offsets are not looked up, they are yielded as a Gap."""
    w = wsd_factory(CONFIG)
    async with Client(w.url("api"), make_token("nf", "acme"), fill_gaps=False, **FAST) as c:
        sub = await c.subscribe("trading-signals", types=["a"])
        for t in ("a", "b", "a"):
            await w.ctl("publish", channel="trading-signals/acme", type=t, data={})
        got = [await take(sub) for _ in range(3)]
        assert [type(i).__name__ for i in got] == ["Message", "Gap", "Message"]
        assert (got[1].last, got[1].resumed) == (got[0].position, got[2].position)


async def test_messages_outside_subscriptions_go_to_on_other(wsd_factory) -> None:
    """A pool's default subscription and a message sent to the connection reach on_other, not a subscription."""
    w = wsd_factory(CONFIG.replace('path = "/ws/frontend"', 'path = "/ws/frontend"\ndefault_subscriptions = '
                                   '["system-status"]') + '[channels.system-status]\ntype = "global"\n')
    others: list[Message] = []

    async with Client(w.url("frontend"), make_token("o", "acme"), on_other=others.append, **FAST) as c:
        assert c.welcome["subscriptions"] == ["system-status"]
        sub = await c.subscribe("trading-signals")
        await w.ctl("publish", channel="system-status", data={"up": True})
        await w.ctl("send", connection_id=c.welcome["connection_id"], type="note", data={"hi": 1})
        await publish(w, 1)
        assert (await take(sub)).data == {"n": 1}

        async def both() -> bool:
            return len(others) == 2

        await wait_for(both, timeout=5)
        assert {(m.channel, m.type) for m in others} == {("system-status", "message"), ("", "note")}
        assert sub.pending() == 0 and c.others_dropped == 0


async def test_node_shutdown_fails_over_and_resumes_on_the_other_redis_node(wsd_factory, redis_url) -> None:  # noqa: F811
    """Two nodes on Redis: the client's node drains (1001); it moves to the next URL, resumes, loses nothing."""
    toml = CONFIG + engine_toml(redis_url, "c" + secrets.token_hex(3))
    a, b = wsd_factory(toml), wsd_factory(toml)
    gate = asyncio.Event()

    async def sleep(s: float) -> None:
        await gate.wait()

    async with Client([a.url("api"), b.url("api")], make_token("fo", "acme"), sleep=sleep, connect_timeout=10) as c:
        sub = await c.subscribe("trading-signals")
        await publish(b, 1)
        assert (await take(sub)).offset == 1
        first = c.session_id
        a.stop()

        async def away() -> bool:
            return c.state == "connecting"

        await wait_for(away, timeout=10)
        await publish(b, 2, start=2)
        gate.set()
        got = [await take(sub) for _ in range(2)]
        assert [(m.offset, m.data) for m in got] == [(2, {"n": 2}), (3, {"n": 3})], (got, c.welcome)
        assert c.url == b.url("api") and c.session_id == first and c.welcome["resumed"] is True
        assert c.gaps == 0 and c.duplicates_dropped >= 0


async def test_rate_limited_close_reconnects_with_a_longer_backoff(wsd_factory) -> None:
    """4008: the client reconnects and resumes, after a backoff one step longer than a plain drop's."""
    w = wsd_factory(CONFIG, env={"WSD_LIMITS_MESSAGES_PER_CONNECTION_PER_SECOND": "5",
                                 "WSD_LIMITS_MESSAGE_BURST": "5"})
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async with Client(w.url("api"), make_token("rl", "acme"), backoff_base=0.1, backoff_cap=10, random=lambda: 1.0,
                      sleep=sleep, connect_timeout=10, request_timeout=5) as c:
        sub = await c.subscribe("trading-signals")
        with pytest.raises(ClientError):  # ConnectionLost, or a reply that never came
            for _ in range(50):
                await c._request(c._conn, {"op": "ping"})  # type: ignore[arg-type]

        async def back() -> bool:
            return c.connections == 2 and c.state == "open"

        await wait_for(back, timeout=10)
        assert slept == [0.2]  # attempt 0 plus one step for 4008: 1.0 * 0.1 * 2**1
        assert c.welcome["resumed"] is True
        await publish(w, 1)
        assert (await take(sub)).data == {"n": 1}


async def test_burst_of_mixed_priorities_comes_out_once_each_in_offset_order(wsd_factory) -> None:
    """400 concurrent publications of four priorities to a batch subscription: offsets 1..400, once each, no Gap
    (priorities may overtake on the wire; the client restores the order from history in few requests)."""
    w = wsd_factory(CONFIG.replace("history_size = 3", "history_size = 1000"))
    async with Client(w.url("frontend"), make_token("s", "acme"), **FAST) as c, \
            Client(w.url("api"), make_token("p", "acme"), **FAST) as p:
        sub = await c.subscribe("trading-signals", mode="batch")
        prios = ["low", "normal", "high", "critical"]
        await asyncio.gather(*(p.publish("trading-signals", {"i": i}, priority=prios[i % 4]) for i in range(400)))
        got = [await take(sub) for _ in range(400)]
        assert [g.offset for g in got] == list(range(1, 401)) and c.gaps == 0
        assert c.history_fills < 40, c.history_fills


async def test_a_server_whose_history_pages_never_move_on_is_a_gap_not_a_loop() -> None:
    """A hostile or broken server answers `history since` with `more` and a `next` that does not advance: the client
    asks a bounded number of times, reports a Gap, and goes on with the next live message."""
    from websockets.asyncio.server import serve

    history_requests = 0

    async def handler(ws: Any) -> None:
        nonlocal history_requests
        await ws.send(json.dumps({"type": "welcome", "connection_id": "c1", "session_id": "s1", "pool": "api",
                                  "user_id": "alice", "company_id": "acme", "heartbeat_ms": 30000,
                                  "subscriptions": [], "resumed": False, "protocol": "wsd.v1"}))
        async for raw in ws:
            req = json.loads(raw)
            ch = "trading-signals/acme"
            if req.get("op") == "subscribe":
                await ws.send(json.dumps({"id": req["id"], "ok": True, "result": {
                    "channel": ch, "group": "trading-signals", "mode": "realtime", "subscription_id": "x",
                    "position": {"offset": 1, "epoch": "e1"}, "recovered": True}}))
                for off in (2, 9):  # 3..8 are missing: the client asks history for them
                    await ws.send(json.dumps({"type": "message", "channel": ch, "offset": off, "epoch": "e1",
                                              "msg_type": "t", "priority": "normal", "ts": 1.0, "data": {"n": off}}))
            elif req.get("op") == "history":
                history_requests += 1
                await ws.send(json.dumps({"id": req["id"], "ok": True, "result": {
                    "channel": ch, "messages": [], "recovered": True, "position": {"offset": 9, "epoch": "e1"},
                    "more": True, "next": req["since"]}}))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = Client(f"ws://127.0.0.1:{port}/ws/api", token="t", **FAST)
        async with client:
            sub = await client.subscribe("trading-signals")
            items = [await take(sub), await take(sub), await take(sub)]
    assert [type(i).__name__ for i in items] == ["Message", "Gap", "Message"]
    assert items[0].offset == 2 and items[2].offset == 9
    assert "does not move on" in items[1].reason
    assert history_requests <= 2, history_requests
