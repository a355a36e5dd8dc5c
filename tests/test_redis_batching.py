"""The Redis engine batches publications: those made in one loop turn go to Redis in one pipeline of script calls.

What a publisher and a subscriber can tell: one channel's publications keep their order (offsets, history, the
bus), a publish is acknowledged only once Redis stored it, and a Redis error fails exactly the publications it
hit, with ``engine_unavailable``, never the others of the batch. Against a real redis-server on a free port
(tests/chaos.py ``RedisServer``: it can be paused and killed).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from tests.harness import make_token, recv_until, request, wait_for, welcome
from wsd.engine.base import ENGINE_UNAVAILABLE, EngineUnavailable, Publication
from wsd.engine.redis import OP_TIMEOUT_S, RedisEngine




@pytest.fixture
async def engine(redis_server) -> AsyncIterator[tuple[RedisEngine, list[Publication]]]:
    """A started engine and the publications its bus brought back (the publisher's node delivers from the bus)."""
    got: list[Publication] = []
    eng = RedisEngine(redis_server.url, prefix="b" + secrets.token_hex(3))
    eng.in_use = lambda channel: True  # a node whose clients subscribe to every channel: it follows each one's bus
    await eng.start(lambda pub, scope=None: got.append(pub))
    yield eng, got
    await eng.stop()


def pub(channel: str, i: int) -> Publication:
    return Publication(id=secrets.token_hex(8), channel=channel, group=channel.split("/")[0], type="t",
                       priority=2, data={"i": i}, ts=time.time())


def count_is(items: list[Any], n: int) -> Any:
    async def check() -> bool:
        return len(items) >= n

    return check


async def publish_all(eng: RedisEngine, pubs: list[Publication]) -> list[Any]:
    """Publish every one of ``pubs`` in the same loop turn; each one's outcome (None, or the exception)."""
    return list(await asyncio.gather(*(eng.publish(p, 100, 3600) for p in pubs), return_exceptions=True))


async def test_one_turn_of_publications_keeps_each_channels_order(engine):
    eng, got = engine
    chans = ["notifications/acme/a", "notifications/acme/b", "trading-signals/acme"]
    pubs = [pub(chans[i % 3], i) for i in range(60)]  # interleaved: a b c a b c ...
    for ch in chans:  # what a subscribe does first: the channel's bus is live before its position is read
        await eng.history(ch, limit=0)
    outcomes = await publish_all(eng, pubs)
    assert outcomes == [None] * 60
    for ch in chans:
        mine = [p for p in pubs if p.channel == ch]
        assert [p.offset for p in mine] == list(range(1, 21)), ch  # numbered in the order they were made
        hist = await eng.history(ch)
        stored = [msgspec.json.decode(bytes(p.data))["i"] for p in hist.publications]  # read back still encoded
        assert stored == [p.data["i"] for p in mine]
        assert [p.offset for p in hist.publications] == list(range(1, 21))
    await wait_for(count_is(got, 60))
    for ch in chans:  # the bus brings each channel's publications in offset order
        assert [p.offset for p in got if p.channel == ch] == list(range(1, 21))


async def test_a_publish_is_acknowledged_only_once_redis_stored_it(engine, redis_server):
    eng, _ = engine
    ch = "notifications/acme/a"
    redis_server.pause()
    try:
        tasks = [asyncio.ensure_future(eng.publish(pub(ch, i), 100, 3600)) for i in range(5)]
        done, _ = await asyncio.wait(tasks, timeout=0.4)
        assert not done  # Redis has not run the script: nobody is told "stored"
    finally:
        redis_server.resume()
    await asyncio.gather(*tasks)
    r = redis_server.client()
    try:
        assert r.llen(f"{eng.prefix}:ch:{{{ch}}}:hist") == 5
    finally:
        r.close()


async def test_a_redis_error_fails_only_the_publications_it_hit(engine, redis_server):
    eng, got = engine
    bad = "notifications/acme/broken"
    r = redis_server.client()
    try:
        r.set(f"{eng.prefix}:ch:{{{bad}}}:meta", "not a hash")  # the script's HGET fails there: WRONGTYPE
    finally:
        r.close()
    pubs = [pub("notifications/acme/a", 0), pub(bad, 1), pub("notifications/acme/a", 2), pub(bad, 3),
            pub("trading-signals/acme", 4)]
    for ch in ("notifications/acme/a", "trading-signals/acme"):
        await eng.history(ch, limit=0)  # their buses are live (what a subscribe does first)
    outcomes = await publish_all(eng, pubs)
    assert outcomes[0] is None and outcomes[2] is None and outcomes[4] is None
    for i in (1, 3):
        assert isinstance(outcomes[i], EngineUnavailable)
        assert outcomes[i].code == ENGINE_UNAVAILABLE
        assert "not acknowledged" in outcomes[i].message
    assert [pubs[0].offset, pubs[2].offset, pubs[4].offset] == [1, 2, 1]
    await wait_for(count_is(got, 3))
    assert sorted(p.data["i"] for p in got) == [0, 2, 4]  # the refused ones were never shared


async def test_redis_gone_fails_every_publication_of_the_batch_within_the_bound(engine, redis_server):
    eng, _ = engine
    redis_server.kill()
    started = time.monotonic()
    outcomes = await publish_all(eng, [pub("notifications/acme/a", i) for i in range(20)])
    assert all(isinstance(o, EngineUnavailable) and o.code == ENGINE_UNAVAILABLE for o in outcomes)
    assert time.monotonic() - started < OP_TIMEOUT_S + 2.0


async def test_a_paused_redis_fails_publications_after_the_bound_and_later_ones_succeed(engine, redis_server):
    eng, _ = engine
    ch = "notifications/acme/a"
    redis_server.pause()
    try:
        started = time.monotonic()
        outcomes = await publish_all(eng, [pub(ch, i) for i in range(10)])
        waited = time.monotonic() - started
    finally:
        redis_server.resume()
    assert all(isinstance(o, EngineUnavailable) for o in outcomes)
    assert OP_TIMEOUT_S - 0.1 <= waited < OP_TIMEOUT_S + 2.0
    p = pub(ch, 99)
    await eng.publish(p, 100, 3600)  # the engine is usable again at once
    assert p.offset >= 1


async def test_publications_are_sent_again_after_redis_lost_its_scripts(engine, redis_server):
    eng, _ = engine
    ch = "notifications/acme/a"
    assert await publish_all(eng, [pub(ch, 0)]) == [None]
    r = redis_server.client()
    try:
        r.script_flush()  # as after a restart: every EVALSHA answers NOSCRIPT
    finally:
        r.close()
    pubs = [pub(ch, i) for i in range(1, 11)]
    assert await publish_all(eng, pubs) == [None] * 10
    assert [p.offset for p in pubs] == list(range(2, 12))


async def test_concurrent_publishers_each_keep_their_order_and_the_channel_has_no_gap(wsd_factory, redis_server):
    """Through a real daemon: eight api clients publish to one channel at once (their publications share
    pipelines); each gets an ``ok`` reply per request, and a subscriber gets every one, offsets 1..N without a
    gap, each publisher's messages in the order it sent them."""
    prefix = "b" + secrets.token_hex(3)
    d = wsd_factory(f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n')
    n_pub, per = 8, 25
    async with d.connect(token=make_token("sub", "acme")) as sub:
        await welcome(sub)
        assert (await request(sub, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]

        async def publisher(k: int) -> list[dict[str, Any]]:
            async with d.connect("api", token=make_token(f"p{k}", "acme")) as ws:
                await welcome(ws)
                for i in range(per):  # pipelined: all sent before any reply is read
                    await ws.send(f'{{"op":"publish","id":{i},"channel":"trading-signals","type":"t",'
                                  f'"data":{{"k":{k},"i":{i}}}}}')
                return [await recv_until(ws, lambda m, i=i: m.get("id") == i) for i in range(per)]

        replies = await asyncio.gather(*(publisher(k) for k in range(n_pub)))
        assert all(r["ok"] for rs in replies for r in rs), [r for rs in replies for r in rs if not r["ok"]][:3]
        msgs = [await recv_until(sub, lambda m: m.get("type") == "message") for _ in range(n_pub * per)]
    assert [m["offset"] for m in msgs] == list(range(1, n_pub * per + 1))
    for k in range(n_pub):
        assert [m["data"]["i"] for m in msgs if m["data"]["k"] == k] == list(range(per))
