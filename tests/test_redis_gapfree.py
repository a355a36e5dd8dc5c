"""No publication lost between nodes: a node that misses messages on the Redis bus fills them from history or
says so, publishing while Redis is away is refused with ``engine_unavailable``, and dead nodes leave the registry.

Every test runs its own redis-server on a free port (never the machine's shared one) and real daemons."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.chaos import RedisServer  # the one private redis-server of the tests
from tests.harness import (
    ControlError,
    make_token,
    recv_json,
    request,
    wait_for,
    welcome,
)

CHANNEL = "trading-signals/acme"




def engine_toml(url: str, prefix: str) -> str:
    return f'[engine]\ntype = "redis"\nurl = "{url}"\nprefix = "{prefix}"\n'


def two_nodes(wsd_factory, redis_server: RedisServer) -> tuple[Any, Any, str]:
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_server.url, prefix))
    b = wsd_factory(engine_toml(redis_server.url, prefix))
    return a, b, prefix


async def subscribe(ws) -> dict[str, Any]:
    await welcome(ws)
    r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
    assert r["ok"], r
    return r["result"]


async def collect(ws, stop: asyncio.Event, frames: list[dict[str, Any]]) -> None:
    """Every message and recovery push the subscriber gets, batches unpacked, until ``stop`` and a quiet second."""
    while True:
        try:
            f = await recv_json(ws, timeout=1.0)
        except TimeoutError:
            if stop.is_set():
                return
            continue
        for m in f["messages"] if f.get("type") == "batch" else [f]:
            if m.get("type") in ("message", "recovery"):
                frames.append(m)


def assert_exactly_once_in_order(acked: list[int], frames: list[dict[str, Any]]) -> None:
    got = [m["data"]["i"] for m in frames if m.get("type") == "message"]
    assert not [m for m in frames if m.get("type") == "recovery"], "a hole history could still fill was reported"
    assert got == sorted(got) and len(got) == len(set(got)), f"out of order or duplicated: {got}"
    missing = sorted(set(acked) - set(got))
    assert not missing, f"acknowledged but never delivered: {missing}"
    offsets = [m["offset"] for m in frames if m.get("type") == "message"]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


def store_without_bus(r: Any, prefix: str, channel: str, i: int) -> int:
    """Store a publication in the channel's history exactly as a node does, but let its bus message get lost."""
    from wsd.engine.redis import _PUBLISH, _encode, _Wire

    body = _encode(_Wire(secrets.token_hex(8), channel, "trading-signals", "sig", 2, {"i": i}, time.time(), None,
                         "test", "", "acme"))
    off, _ = r.eval(_PUBLISH, 2, f"{prefix}:ch:{{{channel}}}:meta", f"{prefix}:ch:{{{channel}}}:hist",
                    secrets.token_hex(4), body, 100, 0, repr(time.time()), f"{prefix}:nowhere")
    return int(off)


async def test_a_message_missed_on_the_bus_is_filled_from_history_in_order(wsd_factory, redis_server):
    """A bus message that never reached node A is noticed by the next one's offset and delivered before it."""
    a, b, prefix = two_nodes(wsd_factory, redis_server)
    async with a.connect(token=make_token("alice", "acme")) as ws:
        await subscribe(ws)
        await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 0})
        first = await recv_json(ws)
        assert first["data"] == {"i": 0} and first["offset"] == 1
        assert store_without_bus(redis_server.client(), prefix, CHANNEL, 1) == 2
        await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 2})
        got = [await recv_json(ws), await recv_json(ws)]
        assert [(m["type"], m["offset"], m["data"]["i"]) for m in got] == [("message", 2, 1), ("message", 3, 2)]
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            extra = await recv_json(ws, timeout=0.5)
            pytest.fail(f"delivered twice: {extra}")
    assert (await a.ctl("status"))["engine"]["bus"]["filled"] >= 1


async def test_the_last_message_missed_on_the_bus_is_found_by_the_position_check(wsd_factory, redis_server):
    """With no later message to show the hole, the once-a-second position check finds and fills it."""
    a, b, prefix = two_nodes(wsd_factory, redis_server)
    async with a.connect(token=make_token("alice", "acme")) as ws:
        await subscribe(ws)
        await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 0})
        assert (await recv_json(ws))["offset"] == 1
        store_without_bus(redis_server.client(), prefix, CHANNEL, 1)
        late = await recv_json(ws, timeout=5)
        assert late["type"] == "message" and late["offset"] == 2 and late["data"] == {"i": 1}


async def test_a_hole_history_no_longer_holds_is_reported_before_what_follows(wsd_factory, redis_server):
    """Messages missed on the bus that history has lost (its keys gone: a new epoch) are reported with a
    ``recovery`` push (recovered: false) naming the last position delivered, then delivery goes on once each."""
    a, b, prefix = two_nodes(wsd_factory, redis_server)
    async with a.connect(token=make_token("alice", "acme")) as ws:
        await subscribe(ws)
        r0 = await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 0})
        assert (await recv_json(ws))["offset"] == 1
        r = redis_server.client()
        r.delete(f"{prefix}:ch:{{{CHANNEL}}}:meta", f"{prefix}:ch:{{{CHANNEL}}}:hist")  # Redis lost the channel
        store_without_bus(r, prefix, CHANNEL, 1)  # offset 1 of a new epoch, missed on the bus
        res = await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 2})
        assert res["epoch"] != r0["epoch"] and res["offset"] == 2
        gap = await recv_json(ws)
        assert gap["type"] == "recovery" and gap["recovered"] is False and gap["channel"] == CHANNEL
        assert gap["since"] == {"offset": 1, "epoch": r0["epoch"]}
        assert gap["position"]["epoch"] == res["epoch"]
        got = [await recv_json(ws), await recv_json(ws)]
        assert [(m["offset"], m["data"]["i"]) for m in got] == [(1, 1), (2, 2)]
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            extra = await recv_json(ws, timeout=0.5)
            pytest.fail(f"delivered twice: {extra}")


async def publish_steadily(b, stop: asyncio.Event, acked: list[int], refused: list[str]) -> None:
    i = 0
    while not stop.is_set():
        try:
            await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": i})
            acked.append(i)
        except ControlError as exc:
            refused.append(exc.code)
        i += 1
        await asyncio.sleep(0.005)


async def test_bus_connections_killed_while_publishing_lose_nothing(wsd_factory, redis_server):
    """Redis drops every bus connection while node B publishes: each publication acknowledged to B reaches the
    subscriber on A exactly once and in order (what the bus lost is filled after the reconnect)."""
    a, b, _ = two_nodes(wsd_factory, redis_server)
    r = redis_server.client()
    async with a.connect(token=make_token("alice", "acme")) as ws:
        await subscribe(ws)
        stop, done = asyncio.Event(), asyncio.Event()
        acked: list[int] = []
        frames: list[dict[str, Any]] = []
        refused: list[str] = []
        reader = asyncio.create_task(collect(ws, done, frames))
        writer = asyncio.create_task(publish_steadily(b, stop, acked, refused))
        for _ in range(3):
            await asyncio.sleep(0.3)
            assert r.client_kill_filter(_type="pubsub") >= 2
        await asyncio.sleep(0.5)
        stop.set()
        await writer
        done.set()
        await reader
    assert not refused and len(acked) > 30
    assert_exactly_once_in_order(acked, frames)
    assert (await a.ctl("status"))["engine"]["bus"]["reconnects"] >= 3


async def test_redis_restarted_with_aof_loses_no_acknowledged_publication(wsd_factory, redis_server):
    """Redis restarts (AOF on) while node B keeps publishing: publications refused meanwhile say
    ``engine_unavailable``; every acknowledged one reaches the subscriber on A exactly once, in order."""
    a, b, _ = two_nodes(wsd_factory, redis_server)
    async with a.connect(token=make_token("alice", "acme")) as ws:
        await subscribe(ws)
        stop, done = asyncio.Event(), asyncio.Event()
        acked: list[int] = []
        frames: list[dict[str, Any]] = []
        refused: list[str] = []
        reader = asyncio.create_task(collect(ws, done, frames))
        writer = asyncio.create_task(publish_steadily(b, stop, acked, refused))
        await wait_for(lambda: _true(len(acked) >= 20), timeout=10)
        await asyncio.to_thread(redis_server.stop)
        n = len(acked)
        await wait_for(lambda: _true(len(refused) >= 2), timeout=10)
        await asyncio.to_thread(redis_server.start)
        await wait_for(lambda: _true(len(acked) >= n + 40), timeout=15)
        stop.set()
        await writer
        done.set()
        await reader
    assert set(refused) == {"engine_unavailable"}
    assert_exactly_once_in_order(acked, frames)


async def _true(v: bool) -> bool:
    return v


def wsctl(w: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    return subprocess.run([sys.executable, "-m", "wsctl", "--socket", w.socket, *args], capture_output=True,
                          text=True, timeout=30, env=env, check=False)


async def test_publishing_while_redis_is_away_is_refused_then_works_again(wsd_factory, redis_server):
    """Redis paused (SIGSTOP) or gone: publish answers ``engine_unavailable`` within about two seconds (the
    control socket, the client's ``publish`` op, ``wsctl publish`` with exit 1); once Redis is back, publishing
    succeeds by itself and is delivered."""
    a, b, _ = two_nodes(wsd_factory, redis_server)
    async with a.connect(token=make_token("alice", "acme")) as ws, \
            b.connect(pool="api", token=make_token("svc", "acme")) as pub_ws:
        await subscribe(ws)
        await welcome(pub_ws)
        assert redis_server.proc is not None
        for fault in ("pause", "restart"):
            if fault == "pause":
                redis_server.proc.send_signal(signal.SIGSTOP)
            else:
                await asyncio.to_thread(redis_server.stop)
            try:
                t0 = time.monotonic()
                with pytest.raises(ControlError) as exc:
                    await b.ctl("publish", channel=CHANNEL, type="sig", data={"n": 1})
                assert exc.value.code == "engine_unavailable" and time.monotonic() - t0 < 3
                reply = await request(pub_ws, {"op": "publish", "id": 7, "channel": "trading-signals", "type": "sig",
                                               "data": {"n": 2}})
                assert reply["ok"] is False and reply["error"]["code"] == "engine_unavailable", reply
                p = await asyncio.to_thread(wsctl, b, "publish", CHANNEL, "--data", '{"n": 3}')
                assert p.returncode == 1 and "redis engine is unavailable" in p.stderr, (p.stdout, p.stderr)
                assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
                with pytest.raises(ControlError) as exc:
                    await b.ctl("broadcast", data={"n": 4})
                assert exc.value.code == "engine_unavailable"
            finally:
                if fault == "pause":
                    redis_server.proc.send_signal(signal.SIGCONT)
                else:
                    await asyncio.to_thread(redis_server.start)

            async def published(fault: str = fault) -> bool:
                try:
                    await b.ctl("publish", channel=CHANNEL, type="sig", data={"after": fault})
                    return True
                except ControlError as e:
                    assert e.code == "engine_unavailable"
                    return False

            await wait_for(published, timeout=10, step=0.2)
            while True:  # what was acknowledged is delivered; nothing refused while Redis was gone is
                m = await recv_json(ws, timeout=5)
                # A refusal means "not acknowledged", not "not published": a command already sent to a paused Redis
                # runs when it continues (docs/reliability.md), so after the pause a refused one may arrive.
                assert m["type"] == "message" and (fault == "pause" or "n" not in m["data"]), m
                if m["data"] == {"after": fault}:
                    break


async def test_a_killed_node_is_reported_missing_within_seconds(wsd_factory, redis_server):
    """Nodes register with a heartbeat key that expires: ``wsctl status`` lists the live ones, and a node killed
    with SIGKILL is reported missing (asked, no answer) within a few seconds, never silently left out."""
    a, b, _ = two_nodes(wsd_factory, redis_server)
    ida = (await a.ctl("status"))["engine"]["node_id"]
    idb = (await b.ctl("status"))["engine"]["node_id"]

    async def listed(ids: set[str]) -> bool:
        return set((await a.ctl("status"))["nodes"]) == ids

    await wait_for(lambda: listed({ida, idb}), timeout=5, step=0.1)
    p = await asyncio.to_thread(wsctl, a, "status", "--json")
    assert p.returncode == 0 and set(json.loads(p.stdout)["nodes"]) == {ida, idb}
    assert b.proc is not None
    b.proc.kill()
    b.proc.wait(5)
    t0 = time.monotonic()

    async def missing() -> bool:
        return (await a.ctl("status"))["missing"] == [idb]

    await wait_for(missing, timeout=8, step=0.1)
    assert time.monotonic() - t0 < 6
    p = await asyncio.to_thread(wsctl, a, "status")
    assert p.returncode == 0 and ida in p.stdout
    assert f"no answer from node {idb}" in p.stderr, p.stderr


async def test_wsd_client_yields_a_gap_for_a_bus_hole_history_cannot_fill(wsd_factory, redis_server):
    """Messages missed on the bus that were trimmed from history reach a ``wsd.client`` application as one
    ``Gap`` (from the last message it took to the first after the hole), then the messages that follow."""
    from wsd.client import Client, Gap

    a, b, prefix = two_nodes(wsd_factory, redis_server)
    client = Client([a.url()], token=make_token("alice", "acme"))
    async with client:
        sub = await client.subscribe("trading-signals")
        items = aiter(sub)
        await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 0})
        first = await asyncio.wait_for(anext(items), 5)
        assert first.offset == 1
        r = redis_server.client()
        r.hincrby(f"{prefix}:ch:{{{CHANNEL}}}:meta", "offset", 5)  # offsets 2..6: missed and trimmed away
        assert store_without_bus(r, prefix, CHANNEL, 7) == 7
        await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 8})
        got = [await asyncio.wait_for(anext(items), 5) for _ in range(3)]
        gap, m7, m8 = got
        assert isinstance(gap, Gap) and gap.last is not None and gap.last.offset == 1, got
        assert gap.resumed is None or gap.resumed.offset == 7
        assert "no longer holds" in gap.reason
        assert (m7.offset, m7.data, m8.offset, m8.data) == (7, {"i": 7}, 8, {"i": 8})
        assert client.duplicates_dropped == 0


async def test_a_late_message_of_a_lost_epoch_is_dropped_once(redis_server):
    """A bus message of an epoch Redis no longer has, arriving after the channel moved on, is dropped after one
    look at history: not delivered out of order, and not taken for a new hole again and again."""
    from wsd.engine.base import Publication
    from wsd.engine.redis import RedisEngine

    eng = RedisEngine(redis_server.url, "t" + secrets.token_hex(3))
    eng.in_use = lambda ch: True
    got: list[tuple[int, str]] = []
    await eng.start(lambda pub, scope=None: got.append((pub.offset, pub.epoch)))
    try:
        await eng.history(CHANNEL, limit=0)  # a subscriber's position read: the channel's bus is subscribed

        def pub(i: int) -> Publication:
            return Publication(id=str(i), channel=CHANNEL, group="trading-signals", type="sig", priority=2,
                               data={"i": i}, ts=time.time(), company_id="acme")

        p1 = pub(1)
        await eng.publish(p1, 100, 0)
        await wait_for(lambda: _true(len(got) == 1), timeout=5)
        stale = pub(9)
        stale.offset, stale.epoch = 2, "0ld3p0ch"
        eng._accept(stale, {})
        await asyncio.sleep(0.5)
        assert got == [(1, p1.epoch)]
        assert eng.bus_stats["fills"] == 1 and eng.bus_stats["gaps"] == 0
    finally:
        await eng.stop()


def lose_the_last_two(redis_server: RedisServer, prefix: str) -> None:
    """Redis comes back with older data in the same epoch (appendfsync everysec after a crash, an RDB snapshot, an
    asynchronous replica promoted): offsets 4 and 5 are forgotten, so Redis would hand them out again."""
    r = redis_server.client()
    r.hset(f"{prefix}:ch:{{{CHANNEL}}}:meta", "offset", 3)
    r.ltrim(f"{prefix}:ch:{{{CHANNEL}}}:hist", 0, 2)


def publish_as_a_fresh_node(redis_server: RedisServer, prefix: str, i: int) -> tuple[int, str]:
    """Publish exactly as a node that never saw the channel does (the script without a known position)."""
    from wsd.engine.redis import _PUBLISH, _encode, _Wire

    body = _encode(_Wire(secrets.token_hex(8), CHANNEL, "trading-signals", "sig", 2, {"i": i}, time.time(), None,
                         "test", "", "acme"))
    off, epoch = redis_server.client().eval(
        _PUBLISH, 2, f"{prefix}:ch:{{{CHANNEL}}}:meta", f"{prefix}:ch:{{{CHANNEL}}}:hist",
        secrets.token_hex(4), body, 100, 0, repr(time.time()), f"{prefix}:ch:{{{CHANNEL}}}:bus")
    return int(off), epoch.decode()


@pytest.mark.parametrize("publisher", ["node", "fresh"])
async def test_offsets_redis_hands_out_again_start_a_new_epoch_and_a_gap(wsd_factory, redis_server, publisher):
    """Redis forgets the last offsets of an epoch and hands them out again: the publications that follow carry a
    new epoch, and the subscriber gets a ``Gap`` naming the hole and every later message, never a silent drop.
    Whether the publishing node knows the channel (it passes what it saw to the publish script) or not (the
    subscriber's node sees the bus go back, or its position check sees Redis behind, and starts the epoch)."""
    from wsd.client import Client, Gap, Message

    a, b, prefix = two_nodes(wsd_factory, redis_server)
    client = Client([a.url()], token=make_token("alice", "acme"))
    async with client:
        sub = await client.subscribe("trading-signals")
        items = aiter(sub)
        first = [await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": i}) for i in range(5)]
        epoch = first[0]["epoch"]
        got = [await asyncio.wait_for(anext(items), 5) for _ in range(5)]
        assert [(m.offset, m.data["i"]) for m in got] == [(n, n - 1) for n in range(1, 6)]
        lose_the_last_two(redis_server, prefix)
        after = []
        for i in range(5, 8):
            if publisher == "node":
                res = await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": i})
                after.append((res["offset"], res["epoch"]))
            else:
                after.append(publish_as_a_fresh_node(redis_server, prefix, i))
        items_after: list[Any] = []
        while True:  # until the last publication is delivered or nothing more comes
            try:
                item = await asyncio.wait_for(anext(items), 5)
            except TimeoutError:
                break
            items_after.append(item)
            if isinstance(item, Message) and item.data == {"i": 7} and item.epoch != epoch:
                break
        gaps = [x for x in items_after if isinstance(x, Gap)]
        msgs = [x for x in items_after if isinstance(x, Message)]
        assert gaps, f"offsets handed out again were dropped without a Gap: {items_after}"
        gap_at = items_after.index(gaps[0])
        assert gaps[0].last is not None and (gaps[0].last.offset, gaps[0].last.epoch) == (5, epoch)
        assert all(m.epoch != epoch for m in msgs), "a message of the stale epoch was delivered after offset 5"
        assert all(items_after.index(m) > gap_at for m in msgs)
        if publisher == "node":
            # the publishing node saw offset 5: the first publication already starts the new epoch
            assert all(e != epoch for _, e in after), after
            assert [m.data["i"] for m in msgs] == [5, 6, 7]
            assert [o for o, _ in after] == [1, 2, 3]
        # whatever was handed out again, the channel has moved to a new epoch: what follows carries it
        later = await b.ctl("publish", channel=CHANNEL, type="sig", data={"i": 8})
        assert later["epoch"] != epoch
        nxt = await asyncio.wait_for(anext(items), 5)
        while isinstance(nxt, Gap):
            nxt = await asyncio.wait_for(anext(items), 5)
        assert isinstance(nxt, Message) and nxt.data == {"i": 8} and nxt.epoch == later["epoch"]
        assert client.duplicates_dropped == 0
