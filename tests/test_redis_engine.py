"""Several wsd nodes sharing channels, history and sessions through a real redis-server."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.harness import REDIS_MISSING, free_port, make_token, recv_until, request, tool_missing, welcome


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    """A private redis-server on a free port (never the machine's shared one)."""
    exe = shutil.which("redis-server")
    if not exe:
        tool_missing(REDIS_MISSING)
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


def engine_toml(url: str, prefix: str) -> str:
    return f'[engine]\ntype = "redis"\nurl = "{url}"\nprefix = "{prefix}"\n'


async def test_publish_on_one_node_reaches_subscriber_on_another(wsd_factory, redis_url):
    """A message published through node B's control socket reaches a client connected to node A."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    async with a.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        assert r["ok"]
        res = await b.ctl("publish", channel="trading-signals/acme", type="sig", data={"n": 1})
        assert res["offset"] == 1 and res["shared"] is True
        msg = await recv_until(ws, lambda m: m.get("type") == "message")
        assert msg["data"] == {"n": 1} and msg["offset"] == 1 and msg["epoch"] == res["epoch"]
    status = await a.ctl("status")
    assert status["engine"]["engine"] == "redis"


async def test_history_is_shared_between_nodes(wsd_factory, redis_url):
    """History published on node A is replayed to a client subscribing on node B."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    for i in range(5):
        await a.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": i})
    async with b.connect(token=make_token("bob", "acme")) as ws:
        await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals", "history": {"limit": 3}})
        assert r["ok"] and r["result"]["history"] == 3 and r["result"]["position"]["offset"] == 5
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(3)]
        assert [m["data"]["i"] for m in got] == [2, 3, 4]
        assert all(m["history"] for m in got)


async def test_session_resumes_on_another_node(wsd_factory, redis_url):
    """A client that drops from node A resumes on node B and receives exactly what it missed, in order."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    tok = make_token("carol", "acme")
    async with a.connect(token=tok) as ws:
        w = await welcome(ws)
        await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        await a.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": 0})
        first = await recv_until(ws, lambda m: m.get("type") == "message")
        assert first["data"]["i"] == 0
        await ws.close(4999, "network drop")
    sid = w["session_id"]

    async def saved() -> bool:
        conns = await a.ctl("connections.list")
        return conns["total"] == 0

    deadline = asyncio.get_running_loop().time() + 5
    while not await saved():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    for i in range(1, 4):
        await b.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": i})
    async with b.connect(token=tok, query={"session": sid}) as ws2:
        w2 = await welcome(ws2)
        assert w2["resumed"] is True and "trading-signals/acme" in w2["subscriptions"]
        got = [await recv_until(ws2, lambda m: m.get("type") == "message") for _ in range(3)]
        assert [m["data"]["i"] for m in got] == [1, 2, 3]
        await b.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": 4})
        live = await recv_until(ws2, lambda m: m.get("type") == "message")
        assert live["data"]["i"] == 4 and "history" not in live


async def test_concurrent_publishers_on_two_nodes_keep_one_order(wsd_factory, redis_url):
    """Subscribers on both nodes see one channel's messages in the same, gapless offset order."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    async with a.connect(token=make_token("u1", "acme")) as wa, b.connect(token=make_token("u2", "acme")) as wb:
        await welcome(wa)
        await welcome(wb)
        await request(wa, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        await request(wb, {"op": "subscribe", "id": 1, "channel": "trading-signals"})

        async def pub(node, tag):
            for i in range(30):
                await node.ctl("publish", channel="trading-signals/acme", type="sig", data={"tag": tag, "i": i})

        await asyncio.gather(pub(a, "a"), pub(b, "b"))
        seen_a = [await recv_until(wa, lambda m: m.get("type") == "message") for _ in range(60)]
        seen_b = [await recv_until(wb, lambda m: m.get("type") == "message") for _ in range(60)]
        offs_a = [m["offset"] for m in seen_a]
        assert offs_a == list(range(offs_a[0], offs_a[0] + 60))
        assert [m["offset"] for m in seen_b] == offs_a
        for tag in "ab":
            assert [m["data"]["i"] for m in seen_a if m["data"]["tag"] == tag] == list(range(30))


async def test_redis_down_at_start_is_a_clear_error(wsd_factory):
    """A node whose Redis is unreachable refuses to start with one clear error line and exit 1."""
    w = wsd_factory(engine_toml(f"redis://127.0.0.1:{free_port()}/0", "x"), start=False)
    with pytest.raises(RuntimeError) as exc:
        w.start(timeout=10)
    assert "engine redis failed to start" in str(exc.value)
    assert w.proc is not None and w.proc.returncode == 1
