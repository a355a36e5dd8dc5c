"""Breaking the cluster-wide control channel and the per-channel bus: a Redis restart under the cluster, a node
that dies and comes back under `wsctl events -f`, a late reply, a flapping subscriber storm. Real redis-server, real
daemons, the real wsctl."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from tests.harness import make_token, recv_until, request, wait_for, welcome
from tests.test_cluster import ROOT, SLACK_S, WSCTL, cluster, connect, node_ids, ok, prefix, wsctl  # noqa: F401
from wsd.engine.base import CONTROL_DEADLINE_S


async def test_control_channel_answers_again_after_a_redis_restart(cluster, redis_server):
    """Redis restarts under a cluster: while it is down a request returns within the deadline (never hangs), and once
    it is back every node answers again (their control channels subscribed again), without any node restarting."""
    a, b, c = cluster
    ids = await node_ids(cluster)
    conns = [await connect(n, f"r{i}") for i, n in enumerate(cluster)]
    for ws in conns:  # each connection's start (its default subscriptions read from Redis) is over
        assert (await request(ws, {"op": "ping", "id": 1}))["ok"]
    redis_server.kill()
    t0 = time.monotonic()
    try:
        res = await a.ctl("connections.list")
        assert res["nodes"] == [ids[0]], res
    except Exception as exc:  # an error reply is fine: a hang is not
        assert "deadline" in str(exc) or "redis" in str(exc).lower(), exc
    assert time.monotonic() - t0 < CONTROL_DEADLINE_S + SLACK_S + 1.0
    redis_server.start()

    async def all_answer() -> bool:
        res = await a.ctl("connections.list")
        return res["missing"] == [] and res["total"] == 3 and sorted(res["nodes"]) == sorted(ids)

    await wait_for(all_answer, timeout=15, step=0.3)
    res = ok(await wsctl(c, "--json", "connections")).json()
    assert res["total"] == 3 and res["missing"] == [], res
    for ws in conns:
        await ws.close()


async def test_events_follow_survives_a_node_dying_and_a_new_one_joining(cluster, wsd_factory, redis_server, prefix):
    """`wsctl events -f` on node A: node C is killed (SIGKILL), a new node D joins; the stream goes on and shows D's
    connect events tagged with D's id."""
    a, b, c = cluster
    await node_ids(cluster)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    proc = await asyncio.create_subprocess_exec(*WSCTL, "--socket", a.socket, "--json", "events", "-f",
                                                "--kind", "connect", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    try:
        await asyncio.sleep(0.5)
        c.signal(signal.SIGKILL)
        toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n'
        d = wsd_factory(toml)
        d_id = (await d.ctl("status", local=True))["engine"]["node_id"]
        await wait_for(lambda: _sees(a, d_id), timeout=10)
        ws = await connect(d, "zed")
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line, "the stream ended"
            ev = json.loads(line)
            if ev.get("connection_id") == ws.cid:
                break
        assert ev["node"] == d_id
        await ws.close()
    finally:
        proc.kill()
        await proc.wait()


async def _sees(w, node) -> bool:
    return node in (await w.ctl("status", local=True))["nodes"]


async def test_a_node_that_wakes_after_the_deadline_does_not_run_the_stale_request(cluster, redis_server, prefix):
    """Node C is frozen (SIGSTOP: a VM pause, a swap storm) while `wsctl kick --user erin` runs on A: the operator is
    told C's part is missing. When C wakes up well after the deadline it must not close erin's connection then: the
    operator was told it did not happen there, and may have decided otherwise since."""
    a, b, c = cluster
    ids = await node_ids(cluster)
    erin_c = await connect(c, "erin")
    keep = asyncio.Event()
    r = redis_server.client()

    async def keep_key() -> None:  # the frozen node's registry key stays as if it had just refreshed it
        while not keep.is_set():
            await asyncio.to_thread(r.set, f"{prefix}:node:{ids[2]}", b"{}", ex=3)
            await asyncio.sleep(0.5)

    keeper = asyncio.get_running_loop().create_task(keep_key())
    c.signal(signal.SIGSTOP)
    try:
        res = ok(await wsctl(a, "--json", "kick", "--user", "erin")).json()
        assert res["missing"] == [ids[2]] and res["closed"] == 0, res
        await asyncio.sleep(CONTROL_DEADLINE_S + 1.0)  # C stays frozen well past the request's deadline
    finally:
        keep.set()
        await keeper
        c.signal(signal.SIGCONT)
    # C has read the stale request once it answers a later one (one connection, in order)
    st = await a.ctl("connections.list", node=[ids[2]])
    assert st["missing"] == [] and st["total"] == 1, st
    pong = await request(erin_c, {"op": "ping", "id": 3})
    assert pong["ok"], pong
    assert "after its deadline (this node was frozen or cut off): not served" in c.log()
    await erin_c.close()
