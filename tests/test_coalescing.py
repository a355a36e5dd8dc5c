"""Burst coalescing: a channel's burst is written as one shared buffer per receiver, order intact."""

from __future__ import annotations

import asyncio
import json

from tests.harness import BASE_CONFIG, make_token, recv_until, request, welcome


def config(window_ms: int) -> str:
    return BASE_CONFIG.replace("[manager]\n", f"[manager]\ncoalesce_window_ms = {window_ms}\n", 1)


async def publish_many(w, n: int, priority: str = "normal") -> None:
    """Publish n messages over one control connection as fast as it answers."""
    reader, writer = await asyncio.open_unix_connection(w.socket)
    try:
        for i in range(n):
            writer.write(json.dumps({"id": i, "method": "publish", "params": {
                "channel": "trading-signals/acme", "type": "tick", "data": {"i": i}, "priority": priority}}).encode()
                + b"\n")
        await writer.drain()
        for _ in range(n):
            assert "result" in json.loads(await asyncio.wait_for(reader.readline(), 10))
    finally:
        writer.close()


async def test_burst_is_coalesced_and_every_frame_arrives_in_order(wsd_factory):
    """200 pipelined publishes reach two subscribers (frontend and mt5) as 200 frames in offset order."""
    w = wsd_factory(base=config(20))
    async with w.connect(token=make_token("a", "acme")) as fa, w.connect("mt5", make_token("b", "acme")) as mb:
        for ws in (fa, mb):
            await welcome(ws)
            assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        await publish_many(w, 200)
        for ws in (fa, mb):
            got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(200)]
            assert [m["data"]["i"] for m in got] == list(range(200))
            offs = [m["offset"] for m in got]
            assert offs == list(range(offs[0], offs[0] + 200))
    metrics = await w.ctl("metrics.get")
    assert metrics["manager"]["coalesced_windows"] >= 1
    assert metrics["manager"]["delivered"] == 400


async def test_critical_message_is_never_held_in_a_window(wsd_factory):
    """A critical publish during a burst arrives right after what preceded it, not a window later."""
    w = wsd_factory(base=config(2000))  # a 2 s window: anything held would arrive visibly late
    async with w.connect(token=make_token("a", "acme")) as ws:
        await welcome(ws)
        await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        await w.ctl("publish", channel="trading-signals/acme", type="tick", data={"i": 0})
        await w.ctl("publish", channel="trading-signals/acme", type="tick", data={"i": 1})  # opens a window
        await w.ctl("publish", channel="trading-signals/acme", type="alert", data={"i": 2}, priority="critical")
        got = [await recv_until(ws, lambda m: m.get("type") == "message", timeout=1.0) for _ in range(3)]
        assert [m["data"]["i"] for m in got] == [0, 1, 2]


async def test_subscribing_during_a_window_never_sees_earlier_messages(wsd_factory):
    """A client that subscribes while a window is open gets none of the messages published before it."""
    w = wsd_factory(base=config(2000))
    async with w.connect(token=make_token("a", "acme")) as first, w.connect(token=make_token("b", "acme")) as late:
        await welcome(first)
        await welcome(late)
        await request(first, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        for i in range(3):
            await w.ctl("publish", channel="trading-signals/acme", type="tick", data={"i": i})
        await request(late, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        await w.ctl("publish", channel="trading-signals/acme", type="tick", data={"i": 3}, priority="critical")
        got = await recv_until(late, lambda m: m.get("type") == "message", timeout=1.0)
        assert got["data"]["i"] == 3
        seen = [await recv_until(first, lambda m: m.get("type") == "message", timeout=1.0) for _ in range(4)]
        assert [m["data"]["i"] for m in seen] == [0, 1, 2, 3]
