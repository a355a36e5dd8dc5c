"""Breaking the per-channel Redis bus: bursts of first subscribers, a Redis restart under many channel buses,
subscribe / unsubscribe churn. Real redis-server, real daemons."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.harness import make_token, recv_until, request, wait_for, welcome
from tests.test_cluster import prefix  # noqa: F401  # the fixture


async def test_many_first_subscribers_at_once_all_get_their_position(wsd_factory, redis_server, prefix):
    """150 clients arrive on a node at once (as after a node restart), each the first subscriber of its own channel
    instance: every subscribe succeeds (the node reads 150 positions at once; more commands in flight than the Redis
    client keeps connections must wait for one, never fail), and each gets what is published next."""
    toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n'
    a, b = wsd_factory(toml), wsd_factory(toml)
    n = 150

    async def one(i: int) -> tuple[Any, dict[str, Any]]:
        ws = await a.connect(pool="api", token=make_token(f"u{i}", f"co{i}")).__aenter__()
        await welcome(ws)
        return ws, await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}, timeout=20)

    got = await asyncio.gather(*(one(i) for i in range(n)))
    try:
        failed = [r for _, r in got if not r.get("ok")]
        assert not failed, f"{len(failed)} of {n} subscribes failed: {failed[0]}"
        for i in (0, n - 1):
            await b.ctl("publish", channel=f"trading-signals/co{i}", type="sig", data={"i": i})
            m = await recv_until(got[i][0], lambda f: f.get("type") == "message", timeout=5)
            assert m["data"] == {"i": i}
        assert "Too many connections" not in a.log()
    finally:
        await asyncio.gather(*(ws.close() for ws, _ in got))



async def test_a_channels_wide_and_own_bus_publications_arrive_in_offset_order(wsd_factory, redis_server, prefix):
    """Two nodes publish to one channel at once, alternating a type a rule broadcasts (the shared bus) and an
    ordinary one (the channel's own bus): a subscriber on a third node gets every offset once, in order, no
    recovery, whichever bus each came by."""
    rule = ('\n[[routing.rules]]\nid = "alerts"\npriority = 10\nfilter = { message_types = ["alert"] }\n'
            'target = { type = "broadcast" }\n')
    toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n' + rule
    a, b, c = (wsd_factory(toml) for _ in range(3))
    ws = await c.connect(pool="api", token=make_token("sub", "acme")).__aenter__()
    await welcome(ws)
    r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
    assert r["ok"], r
    start = r["result"]["position"]["offset"]
    n = 40

    async def publish(node: Any, tag: str) -> list[int]:
        offs = []
        for i in range(n):
            res = await node.ctl("publish", channel="trading-signals/acme", type="alert" if i % 2 else "sig",
                                 data={"p": tag, "i": i})
            offs.append(res["offset"])
        return offs

    done = await asyncio.gather(publish(a, "a"), publish(b, "b"))
    last = max(max(o) for o in done)
    got: list[dict[str, Any]] = []
    while not got or got[-1].get("offset", 0) < last:
        f = await recv_until(ws, lambda m: m.get("type") in ("message", "recovery", "batch"), timeout=10)
        for m in f["messages"] if f.get("type") == "batch" else [f]:
            if m.get("type") in ("message", "recovery"):
                got.append(m)
    assert not [m for m in got if m["type"] == "recovery"], got
    assert [m["offset"] for m in got] == list(range(start + 1, last + 1))
    st = (await c.ctl("metrics.get", local=True))["bus"]
    assert st["gaps"] == 0 and st["messages_shared"] >= n and st["messages_channel"] >= n, st
    await ws.close()


async def test_a_first_subscriber_during_a_redis_restart_gets_live_messages_and_no_error_is_logged(redis_server,
                                                                                                   caplog):
    """A channel's first subscriber arrives while Redis restarts: its position is read once Redis is back, what is
    published next reaches it, no gap is reported, and the node logs the outage as such (warnings), not as an
    unexpected error with a traceback."""
    import logging
    import secrets
    import time

    from wsd.engine.base import Publication
    from wsd.engine.redis import RedisEngine

    prefix = "t" + secrets.token_hex(3)
    node, other = RedisEngine(redis_server.url, prefix), RedisEngine(redis_server.url, prefix)
    subs: set[str] = set()
    node.in_use = subs.__contains__
    got: list[tuple[str, int]] = []
    gaps: list[str] = []
    node.on_gap = lambda ch, since, now: gaps.append(ch)
    await node.start(lambda pub, scope=None: got.append((pub.channel, pub.offset)))
    await other.start(lambda pub, scope=None: None)

    async def publish(ch: str) -> int:
        p = Publication(id=secrets.token_hex(4), channel=ch, group="notifications", type="t", priority=2,
                        data={}, ts=time.time(), company_id="acme")
        for _ in range(50):
            try:
                await other.publish(p, 100, 0)
                return p.offset
            except Exception:
                await asyncio.sleep(0.1)
        raise AssertionError("redis did not come back")

    caplog.set_level(logging.WARNING, logger="wsd.engine.redis")
    try:
        for i, down_s in enumerate((0.1, 0.4, 0.8)):
            ch = f"notifications/acme/r{i}"
            assert await publish(ch) == 1
            subs.add(ch)
            redis_server.kill()
            reading = asyncio.ensure_future(node.history(ch, limit=0))
            await asyncio.sleep(down_s)
            redis_server.start()
            res = await reading
            assert res.position.offset == 1
            assert [await publish(ch) for _ in range(3)] == [2, 3, 4]

            async def arrived() -> bool:
                return [o for c, o in got if c == ch] == [2, 3, 4]

            await wait_for(arrived, timeout=10)
        assert not gaps
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not errors, [r.getMessage() for r in errors]
    finally:
        await other.stop()
        await node.stop()


async def test_a_subscriber_arriving_mid_stream_gets_no_message_twice_with_a_coalescing_window(wsd_factory,
                                                                                                 redis_server, prefix):
    """Messages of a busy channel are held for a coalescing window (here 300 ms) before they are written. Subscribers
    arriving on node A in the middle of a stream from node B each get every offset after the position their subscribe
    reply names, once: a message at or below that position held in the window while the reply was built is not
    written after it."""
    from tests.harness import BASE_CONFIG

    base = BASE_CONFIG.replace("[manager]\n", "[manager]\ncoalesce_window_ms = 300\n", 1)
    toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n'
    a, b = wsd_factory(toml, base=base), wsd_factory(toml, base=base)
    watcher = await a.connect(pool="api", token=make_token("w", "acme")).__aenter__()
    await welcome(watcher)
    assert (await request(watcher, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
    stop = asyncio.Event()
    offsets: list[int] = []

    async def stream() -> None:
        i = 0
        while not stop.is_set():
            offsets.append((await b.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": i}))["offset"])
            i += 1
            await asyncio.sleep(0.01)

    pub = asyncio.get_running_loop().create_task(stream())
    subs: list[tuple[Any, int]] = []
    try:
        for k in range(6):
            await asyncio.sleep(0.15)
            ws = await a.connect(pool="api", token=make_token(f"s{k}", "acme")).__aenter__()
            await welcome(ws)
            r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
            assert r["ok"], r
            subs.append((ws, r["result"]["position"]["offset"]))
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await pub
    last = offsets[-1]
    try:
        for ws, start in subs:
            got: list[int] = []
            while not got or got[-1] < last:
                f = await recv_until(ws, lambda m: m.get("type") in ("message", "batch", "recovery"), timeout=5)
                got += [m["offset"] for m in (f["messages"] if f.get("type") == "batch" else [f])
                        if m.get("type") == "message"]
            assert got == list(range(start + 1, last + 1)), f"from {start}: {got}"
    finally:
        for ws, _ in subs:
            await ws.close()
        await watcher.close()
