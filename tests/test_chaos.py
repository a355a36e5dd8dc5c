"""Chaos, short form: two nodes on one real redis-server with AOF, a steady publisher on company and user channels,
four ``wsd.client`` applications, and in turn a ``kill -9`` of the node the applications are on, a Redis restart, a
Redis pause (SIGSTOP) and a black-holed connection. Every acknowledged publication reaches every subscribed
application exactly once and in order (tests/chaos.py does the work; benchmarks/chaos.py is the long form)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from tests.chaos import FAULTS, Chaos, Proxy
from tests.harness import REDIS_MISSING, make_token, tool_missing, wait_for



@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    if shutil.which("redis-server") is None:
        tool_missing(REDIS_MISSING)


async def _true(v: bool) -> bool:
    return v


@pytest.mark.timeout(120)
async def test_no_acknowledged_publication_is_lost_through_four_faults(tmp_path):
    """kill -9 of a node, Redis killed and restarted on its AOF, Redis paused, a connection black-holed: nothing
    acknowledged is lost, duplicated or reordered, and no Gap is reported (Redis kept everything)."""
    async with Chaos(workdir=tmp_path) as chaos:
        await chaos.steady()
        for fault in FAULTS:
            await chaos.inject(fault)
        await chaos.finish()
        report = chaos.report()
    print(json.dumps(report, indent=1))
    rows = report["phases"]
    # every fault really happened and was seen
    assert rows["kill"]["reconnects"] >= 3, report  # the three applications of the killed node came back
    assert rows["redis_restart"]["refused"] >= 1 and rows["redis_pause"]["refused"] >= 1, report
    assert report["refused"].keys() <= {"engine_unavailable", "node_unreachable"}, report
    assert rows["blackhole"]["proxied_reconnects"] >= 1, report
    for name, row in rows.items():
        assert row["acknowledged"] >= 20, (name, report)
    total = report["total"]
    assert total["lost"] == 0, report["lost_detail"]
    assert total["out_of_order"] == 0 and total["delivered_twice"] == 0, report
    assert total["delivered"] + total["in_gap"] == total["expected"]
    # With Redis persisting every write and the history buffers far from full, no hole is ever unfillable.
    assert total["gaps"] == 0 and total["in_gap"] == 0, report


async def test_a_black_holed_connection_is_noticed_by_the_client_keepalive(wsd):
    """A connection that silently stops forwarding is closed by the client's own ping timeout; the client
    reconnects (here through the healed proxy) and gets what was published meanwhile, once each."""
    from wsd.client import Client, Gap

    proxy = await Proxy(wsd.port).start()
    client = Client([f"ws://127.0.0.1:{proxy.port}/ws/frontend"], token=make_token("alice", "acme"),
                    ping_interval=0.2, ping_timeout=0.5, backoff_base=0.1, open_timeout=2)
    try:
        async with client:
            sub = await client.subscribe("trading-signals")
            items = aiter(sub)
            await wsd.ctl("publish", channel=sub.channel, type="t", data={"i": 0})
            assert (await asyncio.wait_for(anext(items), 5)).data == {"i": 0}
            assert proxy.blackhole() == 1
            await wsd.ctl("publish", channel=sub.channel, type="t", data={"i": 1})  # written into the black hole
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await wait_for(lambda: _true(client.state != "open"), timeout=5)
            # ping_interval + ping_timeout + the 2 s closing handshake, not the 20 s + 20 s defaults
            assert loop.time() - t0 < 4.5
            proxy.restore()
            await wait_for(lambda: _true(client.connections == 2), timeout=10)
            await wsd.ctl("publish", channel=sub.channel, type="t", data={"i": 2})
            got = [await asyncio.wait_for(anext(items), 5) for _ in range(2)]
            assert not any(isinstance(g, Gap) for g in got), got
            assert [m.data for m in got] == [{"i": 1}, {"i": 2}]
            assert sub.pending() == 0
    finally:
        await proxy.stop()

