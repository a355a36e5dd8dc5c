"""Breaking the per-channel Redis bus: bursts of first subscribers, a Redis restart under many channel buses,
subscribe / unsubscribe churn. Real redis-server, real daemons."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.harness import make_token, recv_until, request, welcome
from tests.test_cluster import prefix, redis_server  # noqa: F401


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

