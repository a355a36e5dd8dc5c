"""Ordering within a channel under concurrent publishers: a randomized test against a real daemon.

Several publishers at once (control-socket connections and api / mt5 pool clients) publish into one
channel instance. Every subscriber, fast or slow (queued path, batch frames), must see strictly
increasing offsets with no gaps, and each publisher's messages in the order it published them.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from tests.harness import make_token, recv_json, request, welcome

SEEDS = [11, 2024, 90210]


def unpack(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The channel messages in one frame (a message, or a batch of them)."""
    if frame.get("type") == "message":
        return [frame]
    if frame.get("type") == "batch":
        return list(frame["messages"])
    return []


async def collect(ws: Any, channel: str, total_offset: int, start: asyncio.Event | None = None,
                  timeout: float = 20.0) -> list[dict[str, Any]]:
    """Read messages of ``channel`` until offset ``total_offset`` has arrived; start reading on ``start``."""
    got: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    if start is not None:
        await start.wait()
    deadline = loop.time() + timeout
    while not got or got[-1]["offset"] < total_offset:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"{len(got)} messages, last offset {got[-1]['offset'] if got else None}")
        frame = await recv_json(ws, left)
        got.extend(m for m in unpack(frame) if m["channel"] == channel)
    return got


def check(got: list[dict[str, Any]], total: int, from_start: bool = True) -> None:
    """Strictly increasing offsets, no gaps, per-publisher order preserved."""
    offsets = [m["offset"] for m in got]
    first = 1 if from_start else offsets[0]
    assert offsets == list(range(first, total + 1)), offsets
    last_seen: dict[str, int] = {}
    for m in got:
        p, i = m["data"]["p"], m["data"]["i"]
        assert i == last_seen.get(p, -1) + 1, (p, i, last_seen.get(p))
        last_seen[p] = i


@pytest.mark.parametrize("seed", SEEDS)
async def test_concurrent_publishers_keep_channel_order(wsd_factory, seed):
    """Random concurrent publishers: every subscriber sees gapless increasing offsets, per-publisher order."""
    rng = random.Random(seed)
    # A low write high-water mark and large messages push a reader that does not read while the publishers
    # run onto the queued path (circuit breaker, outbox, coalesced batch frames).
    w = wsd_factory(env={"WSD_MANAGER_WRITE_HIGH_WATER_BYTES": "4096"})
    company = f"co{seed}"
    channel = f"trading-signals/{company}"
    n_ctl = rng.randint(2, 4)
    n_ws = rng.randint(2, 4)
    counts = {f"ctl{k}": rng.randint(20, 60) for k in range(n_ctl)}
    counts.update({f"ws{k}": rng.randint(40, 120) for k in range(n_ws)})
    total = sum(counts.values())
    pad = "x" * rng.randint(8000, 16000)

    async def ctl_publisher(name: str) -> None:
        for i in range(counts[name]):
            await w.ctl("publish", channel=channel, type="sig", data={"p": name, "i": i, "pad": pad})
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def ws_publisher(name: str, ws: Any) -> None:
        for i in range(counts[name]):
            await ws.send(json.dumps({"op": "publish", "id": i, "channel": "trading-signals", "type": "sig",
                                      "data": {"p": name, "i": i, "pad": pad}}))
            if rng.random() < 0.2:
                await asyncio.sleep(0)
        # Every publish is acknowledged, and the offsets it was given follow the publisher's own order.
        offsets = []
        while len(offsets) < counts[name]:
            reply = await recv_json(ws)
            assert reply.get("ok") is True, reply
            offsets.append(reply["result"]["offset"])
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)

    subs = [w.connect(token=make_token(f"u{k}", company), max_size=None) for k in range(4)]
    pubs = [w.connect(rng.choice(["api", "mt5"]), token=make_token(f"svc{k}", company)) for k in range(n_ws)]
    opened = [await c.__aenter__() for c in subs + pubs]
    try:
        sub_ws, pub_ws = opened[:4], opened[4:]
        for ws in opened:
            await welcome(ws)
        for k, ws in enumerate(sub_ws):
            mode = "batch" if k == 3 else "realtime"
            reply = await request(ws, {"op": "subscribe", "id": "s", "channel": "trading-signals",
                                       "mode": mode})
            assert reply["ok"], reply
        published = asyncio.Event()
        readers = [asyncio.create_task(collect(ws, channel, total, start=published if k == 2 else None))
                   for k, ws in enumerate(sub_ws)]
        writers = [asyncio.create_task(ctl_publisher(f"ctl{k}")) for k in range(n_ctl)]
        writers += [asyncio.create_task(ws_publisher(f"ws{k}", ws)) for k, ws in enumerate(pub_ws)]
        await asyncio.gather(*writers)
        published.set()
        results = await asyncio.gather(*readers)
        for got in results:
            check(got, total)
        # Every publish got an offset: the history buffer's top is the number of messages published.
        hist = await w.ctl("history.get", channel=channel, limit=1)
        assert hist["position"]["offset"] == total
    finally:
        for c in subs + pubs:
            await c.__aexit__(None, None, None)


async def test_late_joiner_with_history_sees_no_gap_or_duplicate(wsd):
    """A subscriber joining mid-stream with history gets a contiguous run of offsets up to the end."""
    channel = "trading-signals/acme"
    total = 300
    async with wsd.connect("api", token=make_token("svc", "acme")) as pub, \
            wsd.connect(token=make_token("late", "acme")) as late:
        await welcome(pub)
        await welcome(late)

        async def publisher() -> None:
            for i in range(total):
                await pub.send(json.dumps({"op": "publish", "id": i, "channel": "trading-signals",
                                           "data": {"p": "svc", "i": i}}))
                if i % 10 == 0:
                    await asyncio.sleep(0)
            for _ in range(total):  # read the replies, so the client's close is not stuck behind them
                assert (await recv_json(pub)).get("ok") is True

        task = asyncio.create_task(publisher())
        await asyncio.sleep(0.01)  # let the stream start; the assertion holds wherever it joins
        await late.send(json.dumps({"op": "subscribe", "id": "late", "channel": "trading-signals",
                                    "history": {"limit": 20}}))
        await task
        got = await collect(late, channel, total)
        offsets = [m["offset"] for m in got]
        assert offsets == list(range(offsets[0], total + 1))
        assert len(offsets) >= 20 or offsets[0] == 1
