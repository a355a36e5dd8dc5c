"""The Redis bus per channel instance: a node receives a channel's publications only while it has subscribers of
it (plus broadcasts and rule-routed ones on the shared bus), subscribes at the first subscriber, leaves the
channel's bus after a grace, and a subscriber arriving in the middle of a stream misses nothing.

Every test runs its own redis-server on a free port and real daemons; what Redis subscribes is read from Redis
itself (``PUBSUB NUMSUB``)."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from typing import Any


from tests.chaos import RedisServer
from tests.harness import make_token, recv_json, recv_until, request, wait_for, welcome




def engine_toml(url: str, prefix: str) -> str:
    return f'[engine]\ntype = "redis"\nurl = "{url}"\nprefix = "{prefix}"\n'


def nodes(wsd_factory, redis_server: RedisServer, n: int = 2, extra: str = "") -> tuple[list[Any], str]:
    prefix = "t" + secrets.token_hex(3)
    return [wsd_factory(engine_toml(redis_server.url, prefix) + extra) for _ in range(n)], prefix


def numsub(redis_server: RedisServer, prefix: str, channel: str) -> int:
    """How many connections Redis has subscribed to the channel instance's own bus."""
    name = f"{prefix}:ch:{{{channel}}}:bus"
    return int(dict(redis_server.client().pubsub_numsub(name))[name.encode()])


async def bus(node: Any) -> dict[str, Any]:
    return (await node.ctl("metrics.get", local=True))["bus"]  # this node alone (the default is the cluster)


async def subscribed(ws: Any, channel: str = "trading-signals", rid: int = 1) -> dict[str, Any]:
    r = await request(ws, {"op": "subscribe", "id": rid, "channel": channel})
    assert r["ok"], r
    return r["result"]


async def test_a_node_without_subscribers_receives_none_of_a_channels_publications(wsd_factory, redis_server):
    """Publications to a channel with subscribers only on A reach A's bus; B, which publishes them, receives none
    (its metric stays at 0), and both nodes count what they received in ``wsctl metrics`` and Prometheus."""
    (a, b), prefix = nodes(wsd_factory, redis_server)
    async with a.connect(pool="api", token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        await subscribed(ws)
        a0, b0 = await bus(a), await bus(b)
        for i in range(20):
            await b.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": i})
        got = [(await recv_until(ws, lambda m: m.get("type") == "message"))["data"]["i"] for _ in range(20)]
        assert got == list(range(20))
        a1, b1 = await bus(a), await bus(b)
        assert a1["messages_channel"] - a0["messages_channel"] == 20
        assert b1["messages_channel"] == b0["messages_channel"] == 0, "a node without subscribers got the channel"
        assert b1["channels"] == 0 and a1["channels"] == 1
        assert numsub(redis_server, prefix, "trading-signals/acme") == 1
        prom = await b.ctl("metrics.prometheus")
        text = prom if isinstance(prom, str) else prom.get("text", "")
        assert 'wsd_bus_messages_total{bus="channel"} 0.0' in text
        out = subprocess.run([sys.executable, "-m", "wsctl", "--socket", a.socket, "metrics"], capture_output=True,
                             text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert "channel buses 20" in out.stdout and "1 subscribed" in out.stdout


async def test_a_broadcast_and_a_rule_routed_publication_reach_every_node(wsd_factory, redis_server):
    """What is not for one channel's subscribers travels on the shared bus: a broadcast, and a publication that a
    routing rule sends to every connection, reach a node that has no subscriber of the channel."""
    rule = ('\n[[routing.rules]]\nid = "alerts"\npriority = 10\nfilter = { message_types = ["alert"] }\n'
            'target = { type = "broadcast" }\n')
    (a, b), prefix = nodes(wsd_factory, redis_server, extra=rule)
    async with a.connect(pool="api", token=make_token("bob", "globex")) as ws:
        await welcome(ws)
        await b.ctl("broadcast", type="notice", data={"n": 1})
        m = await recv_until(ws, lambda m: m.get("type") == "message")
        assert m["data"] == {"n": 1}
        await b.ctl("publish", channel="trading-signals/acme", type="alert", data={"n": 2})
        m = await recv_until(ws, lambda m: m.get("type") == "message")
        assert m["data"] == {"n": 2} and m["channel"] == "trading-signals/acme"
        # an ordinary publication to that channel stays on its own bus: nobody on A subscribes to it
        await b.ctl("publish", channel="trading-signals/acme", type="sig", data={"n": 3})
        await asyncio.sleep(0.3)
        st = await bus(a)
        assert st["messages_channel"] == 0 and st["messages_shared"] >= 2
        assert numsub(redis_server, prefix, "trading-signals/acme") == 0


async def test_a_channels_bus_is_kept_for_a_grace_then_left(wsd_factory, redis_server):
    """The first subscriber subscribes the channel's bus (one SUBSCRIBE however many come and go); after the
    last one leaves the bus stays for the grace period, so a subscriber coming back costs nothing, then it is left;
    a later subscriber subscribes again and gets what is published from then on."""
    from wsd.engine.redis import BUS_GRACE_S

    (a, b), prefix = nodes(wsd_factory, redis_server)
    ch = "trading-signals/acme"
    async with a.connect(pool="api", token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        assert numsub(redis_server, prefix, ch) == 0
        await subscribed(ws)
        assert numsub(redis_server, prefix, ch) == 1  # confirmed before the subscribe was answered
        first = (await bus(a))["subscribes"]
        for i in range(10):  # a flapping subscriber
            r = await request(ws, {"op": "unsubscribe", "id": 100 + i, "channel": "trading-signals"})
            assert r["ok"], r
            await subscribed(ws, rid=200 + i)
        r = await request(ws, {"op": "unsubscribe", "id": 2, "channel": "trading-signals"})
        assert r["ok"]
        left_at = time.monotonic()
        assert (await bus(a))["subscribes"] == first, "a flapping subscriber made SUBSCRIBE commands"
        await asyncio.sleep(BUS_GRACE_S / 2)
        assert numsub(redis_server, prefix, ch) == 1, "the bus was left before the grace period"

        async def gone() -> bool:
            return numsub(redis_server, prefix, ch) == 0

        await wait_for(gone, timeout=BUS_GRACE_S + 5)
        assert time.monotonic() - left_at >= BUS_GRACE_S - 0.1
        st = await bus(a)
        assert st["unsubscribes"] >= 1 and st["channels"] == 0
        await b.ctl("publish", channel=ch, type="sig", data={"i": 0})  # while A has left: not received there
        await asyncio.sleep(0.2)
        assert (await bus(a))["messages_channel"] == st["messages_channel"]
        res = await subscribed(ws, rid=3)
        assert res["position"]["offset"] == 1
        assert numsub(redis_server, prefix, ch) == 1
        await b.ctl("publish", channel=ch, type="sig", data={"i": 1})
        m = await recv_until(ws, lambda m: m.get("type") == "message")
        assert (m["offset"], m["data"]) == (2, {"i": 1})


async def test_a_subscriber_arriving_during_a_stream_misses_nothing(wsd_factory, redis_server):
    """Node B publishes a steady stream to channels nobody subscribes to; a first subscriber of each arrives on
    node A in the middle of it. Each gets every publication after the position its subscribe reply names, once
    and in order, with no recovery: the window between its arrival and Redis confirming A's SUBSCRIBE loses
    nothing. A second subscriber with ``since`` a position just before it gets history from there, then live."""
    (a, b), prefix = nodes(wsd_factory, redis_server)
    companies = [f"c{i}" for i in range(6)]
    acked: dict[str, list[tuple[int, str]]] = {c: [] for c in companies}
    stop = asyncio.Event()

    async def publish(company: str) -> None:
        i = 0
        while not stop.is_set():
            r = await b.ctl("publish", channel=f"trading-signals/{company}", type="sig", data={"i": i})
            acked[company].append((r["offset"], r["epoch"]))
            i += 1
            await asyncio.sleep(0.005)

    async def read_to(ws: Any, last: int, frames: list[dict[str, Any]]) -> None:
        while not frames or frames[-1]["offset"] < last:
            f = await recv_json(ws, timeout=5)
            for m in f["messages"] if f.get("type") == "batch" else [f]:
                if m.get("type") in ("message", "recovery"):
                    frames.append(m)

    pubs = [asyncio.create_task(publish(c)) for c in companies]
    results: list[tuple[str, Any, int, list[dict[str, Any]]]] = []
    late: Any = None
    try:
        async def some() -> bool:
            return all(len(v) >= 5 for v in acked.values())

        await wait_for(some, timeout=10)
        for c in companies:
            ws = await a.connect(pool="api", token=make_token("u-" + c, c)).__aenter__()
            await welcome(ws)
            res = await subscribed(ws)
            results.append((c, ws, res["position"]["offset"], []))
            if late is None:
                # a second subscriber of the first channel, from just before the first one's position: history
                # (well within the 100 messages the channel keeps), then live
                late = await a.connect(pool="api", token=make_token("late", c)).__aenter__()
                await welcome(late)
                since = {"offset": results[0][2] - 1, "epoch": acked[c][0][1]}
                r = await request(late, {"op": "subscribe", "id": 1, "channel": "trading-signals",
                                         "history": {"since": since}})
                assert r["ok"] and r["result"]["recovered"] is True, r
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*pubs)
    try:
        for c, ws, start, frames in results:
            last = acked[c][-1][0]
            await read_to(ws, last, frames)
            assert not [m for m in frames if m["type"] == "recovery"], frames
            offsets = [m["offset"] for m in frames]
            assert start >= 5 and offsets == list(range(start + 1, last + 1)), f"{c}: from {start}: {offsets}"
        frames = []
        await read_to(late, acked[companies[0]][-1][0], frames)
        assert [m["offset"] for m in frames] == list(range(results[0][2], acked[companies[0]][-1][0] + 1))
    finally:
        for _, ws, _, _ in results:
            await ws.close()
        if late is not None:
            await late.close()
    st = await bus(a)
    assert st["gaps"] == 0
    assert (await bus(b))["messages_channel"] == 0


def test_the_publish_script_touches_one_hash_slot():
    """The Lua publish script names only the channel instance's keys (one hash tag: one Redis Cluster slot); the
    bus it publishes on is an argument, the instance's own bus carrying the same hash tag."""
    from wsd.engine import redis as r

    assert "KEYS[3]" not in r._PUBLISH and "KEYS[1]" in r._PUBLISH and "KEYS[2]" in r._PUBLISH
    eng = r.RedisEngine("redis://127.0.0.1:1/0", "wsd")
    ch = "notifications/acme/alice"
    tag = "{" + ch + "}"
    assert tag in eng._meta(ch) and tag in eng._hist(ch) and tag.encode() in eng.channel_bus(ch)
    assert json.dumps(eng.channel_bus(ch).decode()) == '"wsd:ch:{notifications/acme/alice}:bus"'


async def test_a_late_subscribe_confirmation_is_caught_up_from_history(redis_server):
    """Redis confirms a channel's SUBSCRIBE late (here: redis-py sends it only when the test lets it): the first
    subscriber's position is read anyway after the bounded wait, and what is published between that read and the
    confirmation is delivered from history once the confirmation comes, in order, before what follows."""
    from wsd.engine.base import Publication
    from wsd.engine.redis import OP_TIMEOUT_S, RedisEngine

    prefix = "t" + secrets.token_hex(3)
    ch = "trading-signals/acme"
    node = RedisEngine(redis_server.url, prefix)
    other = RedisEngine(redis_server.url, prefix)
    node.in_use = lambda c: c == ch  # a subscriber here
    got: list[tuple[int, Any]] = []
    await node.start(lambda pub, scope=None: got.append((pub.offset, pub.data)))
    await other.start(lambda pub, scope=None: None)
    gate = asyncio.Event()
    send = node._pubsub.subscribe

    async def held_subscribe(*names: Any) -> Any:  # the library call, held back: Redis confirms late
        await gate.wait()
        return await send(*names)

    node._pubsub.subscribe = held_subscribe
    try:
        async def publish(i: int) -> int:
            p = Publication(id=str(i), channel=ch, group="trading-signals", type="sig", priority=2, data={"i": i},
                            ts=time.time(), company_id="acme")
            await other.publish(p, 100, 0)
            return p.offset

        assert [await publish(i) for i in range(3)] == [1, 2, 3]
        t0 = time.monotonic()
        res = await node.history(ch, limit=0)  # the first subscriber's position read
        assert time.monotonic() - t0 >= OP_TIMEOUT_S * 0.9 and res.position.offset == 3
        assert [await publish(i) for i in range(3, 5)] == [4, 5]  # before the bus is confirmed
        gate.set()

        async def caught_up() -> bool:
            return [o for o, _ in got] == [4, 5]

        await wait_for(caught_up, timeout=5)
        assert await publish(5) == 6

        async def live() -> bool:
            return [o for o, _ in got] == [4, 5, 6]

        await wait_for(live, timeout=5)
        assert [d["i"] for _, d in got] == [3, 4, 5]
        assert node.bus_stats["late_confirms"] == 1 and node.bus_stats["filled"] == 2
        assert node.bus_stats["gaps"] == 0
    finally:
        gate.set()
        await other.stop()
        await node.stop()
