"""Subscriptions through real clients: every mode, content filters, limits, and history on subscribe."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

from tests.harness import frames_before, make_token, recv_json, recv_until, request, welcome

_ids = itertools.count(1)

# frontend: a short batch interval; api: a batch that only a size bound (4) or a critical message flushes.
CONFIG = """
[pools.frontend]
type = "frontend"
path = "/ws/frontend"
batching = { enabled = true, interval_ms = 150, max_messages = 100 }

[pools.api]
type = "api"
path = "/ws/api"
batching = { enabled = true, interval_ms = 60000, max_messages = 4 }

[channels.trading-signals]
type = "company"
history_size = 5
publishers = ["api", "admin"]

[channels.notifications]
type = "user"
publishers = ["api", "admin"]

[channels.system-status]
type = "global"
publishers = ["admin"]
"""


@pytest.fixture
def wsd(wsd_factory):
    """A daemon with small history buffers and two batching profiles."""
    return wsd_factory(CONFIG)


def rid() -> int:
    return next(_ids)


async def subscribe(ws: Any, channel: str, **extra: Any) -> dict[str, Any]:
    reply = await request(ws, {"op": "subscribe", "id": rid(), "channel": channel, **extra})
    assert reply["ok"], reply
    return reply["result"]


async def publish(wsd: Any, n: int, channel: str = "trading-signals/acme", **kw: Any) -> list[dict[str, Any]]:
    """Publish ``n`` messages {"n": i} (i = 1..n) through the control socket, one after another."""
    return [await wsd.ctl("publish", channel=channel, data={"n": i}, **kw) for i in range(1, n + 1)]


async def nothing_pushed_from(ws: Any, wsd: Any, channel: str, user: str = "alice") -> None:
    """Assert no message of ``channel`` arrives before a sentinel sent to the user's notifications."""
    await wsd.ctl("publish", channel=f"notifications/acme/{user}", data={"sentinel": channel})
    seen = await frames_before(ws, channel)
    leaked = [f for f in seen if f.get("type") in ("message", "batch")]
    assert leaked == [], leaked


def alice() -> str:
    return make_token("alice", "acme")


async def test_realtime_mode_pushes_at_once(wsd):
    """An explicit realtime subscription receives each publish as its own message frame, in order."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        res = await subscribe(ws, "trading-signals", mode="realtime")
        assert res["mode"] == "realtime" and res["channel"] == "trading-signals/acme"
        pubs = await publish(wsd, 3)
        assert all(p["delivered"] == 1 for p in pubs)
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(3)]
        assert [m["data"]["n"] for m in got] == [1, 2, 3]
        assert [m["offset"] for m in got] == [p["offset"] for p in pubs]
        assert all("history" not in m for m in got)


async def test_batch_mode_sends_one_batch_frame_per_interval(wsd):
    """A batch subscription gets messages published within one interval as one batch frame, in order."""
    async with wsd.connect(token=alice()) as ws, wsd.connect("api", token=make_token("svc", "acme")) as pub:
        await welcome(ws)
        await welcome(pub)
        await subscribe(ws, "trading-signals", mode="batch")
        # Pipelined publishes: all three land inside one 150 ms interval.
        for i in range(1, 4):
            await pub.send(json.dumps({"op": "publish", "id": rid(), "channel": "trading-signals",
                                       "type": "sig", "data": {"n": i}}))
        batch = await recv_until(ws, lambda m: m.get("type") in ("batch", "message"))
        assert batch["type"] == "batch", batch
        assert [m["data"]["n"] for m in batch["messages"]] == [1, 2, 3]
        assert [m["offset"] for m in batch["messages"]] == [1, 2, 3]
        assert all(m["type"] == "message" and m["channel"] == "trading-signals/acme"
                   for m in batch["messages"])


async def test_batch_mode_flushes_at_size_bound(wsd):
    """A batch subscription is flushed as soon as the pool's max_messages are held (interval 60 s here)."""
    async with wsd.connect("api", token=make_token("svc", "acme")) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals", mode="batch")
        await publish(wsd, 5)
        batch = await recv_until(ws, lambda m: m.get("type") in ("batch", "message"), timeout=3)
        assert batch["type"] == "batch" and [m["data"]["n"] for m in batch["messages"]] == [1, 2, 3, 4]
        pull = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert pull["ok"] is False and pull["error"]["code"] == "not_subscribed"


async def test_critical_message_bypasses_batch(wsd):
    """A critical message to a batch subscription is pushed at once, ahead of the held normal ones."""
    async with wsd.connect("api", token=make_token("svc", "acme")) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals", mode="batch")
        await publish(wsd, 2)
        crit = await wsd.ctl("publish", channel="trading-signals/acme", type="alert", data={"n": "crit"},
                             priority="critical")
        first = await recv_until(ws, lambda m: m.get("type") in ("batch", "message"), timeout=3)
        assert first["type"] == "message" and first["priority"] == "critical"
        assert first["offset"] == crit["offset"] == 3
        await publish(wsd, 2)
        batch = await recv_until(ws, lambda m: m.get("type") in ("batch", "message"), timeout=3)
        assert batch["type"] == "batch" and [m["data"]["n"] for m in batch["messages"]] == [1, 2, 1, 2]
        assert [m["offset"] for m in batch["messages"]] == [1, 2, 4, 5]


async def test_on_demand_holds_until_pull(wsd):
    """An on_demand subscription pushes nothing; pull returns the held messages in order with remaining."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "notifications")
        assert (await subscribe(ws, "trading-signals", mode="on_demand"))["mode"] == "on_demand"
        await publish(wsd, 3)
        await nothing_pushed_from(ws, wsd, "trading-signals/acme")
        first = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals", "limit": 2})
        assert first["ok"] and first["result"]["remaining"] == 1
        assert [m["data"]["n"] for m in first["result"]["messages"]] == [1, 2]
        assert [m["offset"] for m in first["result"]["messages"]] == [1, 2]
        rest = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert [m["data"]["n"] for m in rest["result"]["messages"]] == [3]
        assert rest["result"]["remaining"] == 0
        empty = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert empty["result"] == {"channel": "trading-signals/acme", "remaining": 0, "more": False, "messages": []}


async def test_pull_without_on_demand_subscription(wsd):
    """pull on a channel without an on_demand subscription is not_subscribed."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        reply = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert reply["ok"] is False and reply["error"]["code"] == "not_subscribed"
        await subscribe(ws, "trading-signals")
        reply = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert reply["ok"] is False and reply["error"]["code"] == "not_subscribed"


async def test_historical_mode_sends_history_only(wsd):
    """A historical subscription gets the buffer once and no live messages afterwards."""
    await publish(wsd, 2)
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "notifications")
        res = await subscribe(ws, "trading-signals", mode="historical")
        assert res["history"] == 2 and res["recovered"] is True and res["position"]["offset"] == 2
        hist = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(2)]
        assert [m["offset"] for m in hist] == [1, 2] and all(m["history"] for m in hist)
        live = await wsd.ctl("publish", channel="trading-signals/acme", data={"n": "live"})
        assert live["delivered"] == 0
        await nothing_pushed_from(ws, wsd, "trading-signals/acme")


async def test_filter_types_passes_only_listed_types(wsd):
    """A subscription with filter.types receives only messages of those types."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals", filter={"types": ["trade", "fill"]})
        for t in ("trade", "news", "fill", "heartbeat", "trade"):
            await wsd.ctl("publish", channel="trading-signals/acme", type=t, data={"t": t})
        await wsd.ctl("publish", channel="trading-signals/acme", type="trade", data={"sentinel": "f"})
        seen = [f for f in await frames_before(ws, "f") if f.get("type") == "message"]
        assert [m["msg_type"] for m in seen] == ["trade", "fill", "trade"]


async def test_filter_applies_to_history(wsd):
    """History sent on subscribe honours the subscription's type filter."""
    for t in ("trade", "news", "trade"):
        await wsd.ctl("publish", channel="trading-signals/acme", type=t, data={"t": t})
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals", filter={"types": ["trade"]}, history={"limit": 10})
        await wsd.ctl("publish", channel="trading-signals/acme", type="trade", data={"sentinel": "h"})
        seen = [f for f in await frames_before(ws, "h") if f.get("type") == "message"]
        assert [(m["offset"], m["msg_type"]) for m in seen] == [(1, "trade"), (3, "trade")]


async def test_unsubscribe_stops_delivery(wsd):
    """After unsubscribe nothing more is delivered; a second unsubscribe is not_subscribed."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals")
        assert (await publish(wsd, 1))[0]["delivered"] == 1
        await recv_until(ws, lambda m: m.get("type") == "message")
        reply = await request(ws, {"op": "unsubscribe", "id": rid(), "channel": "trading-signals"})
        assert reply == {"id": reply["id"], "ok": True, "result": {"channel": "trading-signals/acme"}}
        assert (await publish(wsd, 1))[0]["delivered"] == 0
        await subscribe(ws, "notifications")
        await nothing_pushed_from(ws, wsd, "trading-signals/acme")
        again = await request(ws, {"op": "unsubscribe", "id": rid(), "channel": "trading-signals"})
        assert again["ok"] is False and again["error"]["code"] == "not_subscribed"


async def test_resubscribe_replaces_mode(wsd):
    """Subscribing again to the same channel replaces the subscription (no double delivery)."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals")
        await subscribe(ws, "trading-signals", mode="on_demand")
        assert (await publish(wsd, 1))[0]["delivered"] == 1
        pull = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert [m["data"] for m in pull["result"]["messages"]] == [{"n": 1}]
        await subscribe(ws, "notifications")
        await nothing_pushed_from(ws, wsd, "trading-signals/acme")


async def test_subscription_limit(wsd_factory):
    """Beyond max_subscriptions_per_connection a subscribe is refused with too_many_subscriptions."""
    w = wsd_factory(env={"WSD_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION": "2"})
    async with w.connect("api", token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals")
        await subscribe(ws, "notifications")
        reply = await request(ws, {"op": "subscribe", "id": rid(), "channel": "system-status"})
        assert reply["ok"] is False and reply["error"]["code"] == "too_many_subscriptions"
        # Re-subscribing to a channel already held does not count as another subscription.
        await subscribe(ws, "trading-signals", mode="on_demand")
        await request(ws, {"op": "unsubscribe", "id": rid(), "channel": "notifications"})
        await subscribe(ws, "system-status")


async def test_bad_subscribe_requests(wsd):
    """Unknown modes, negative history limits and unknown fields are bad_request."""
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        for frame in ({"channel": "trading-signals", "mode": "streaming"},
                      {"channel": "trading-signals", "history": {"limit": -1}},
                      {"channel": "trading-signals", "history": {"since": {"offset": 1}}},
                      {"channel": "trading-signals", "colour": "red"}):
            reply = await request(ws, {"op": "subscribe", "id": rid(), **frame})
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (frame, reply)
        subs = await wsd.ctl("subscriptions.list")
        assert subs["total"] == 0


async def test_subscribe_with_history_limit(wsd):
    """subscribe with history {limit: 3} sends the last 3 marked history, then live ones."""
    pubs = await publish(wsd, 5)
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        res = await subscribe(ws, "trading-signals", history={"limit": 3})
        assert res["history"] == 3 and res["recovered"] is True
        assert res["position"] == {"offset": 5, "epoch": pubs[-1]["epoch"]}
        live = await wsd.ctl("publish", channel="trading-signals/acme", data={"n": "live"})
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(4)]
        assert [m["offset"] for m in got] == [3, 4, 5, live["offset"]]
        assert [m.get("history", False) for m in got] == [True, True, True, False]
        assert got[-1]["data"] == {"n": "live"}


async def test_subscribe_since_position(wsd):
    """subscribe with since {offset, epoch} sends exactly the messages after that offset."""
    pubs = await publish(wsd, 5)
    epoch = pubs[0]["epoch"]
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "notifications")
        res = await subscribe(ws, "trading-signals", history={"since": {"offset": 2, "epoch": epoch}})
        assert res["recovered"] is True and res["history"] == 3
        await wsd.ctl("publish", channel="notifications/acme/alice", data={"sentinel": "s"})
        seen = [f for f in await frames_before(ws, "s") if f.get("type") == "message"]
        assert [m["offset"] for m in seen] == [3, 4, 5] and all(m["epoch"] == epoch for m in seen)
        # Already at the top: nothing to send, and nothing was lost.
        res = await subscribe(ws, "trading-signals", history={"since": {"offset": 5, "epoch": epoch}})
        assert res["recovered"] is True and res["history"] == 0


async def test_history_op_returns_messages_in_reply(wsd):
    """The history op returns the buffer (or a page of it) inside its reply."""
    pubs = await publish(wsd, 4)
    epoch = pubs[0]["epoch"]
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        reply = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals", "limit": 2})
        res = reply["result"]
        assert res["channel"] == "trading-signals/acme" and res["recovered"] is True
        assert res["position"] == {"offset": 4, "epoch": epoch}
        assert [m["offset"] for m in res["messages"]] == [3, 4]
        assert all(m["history"] and m["type"] == "message" for m in res["messages"])
        reply = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                   "since": {"offset": 1, "epoch": epoch}})
        assert [m["data"]["n"] for m in reply["result"]["messages"]] == [2, 3, 4]
        empty = await request(ws, {"op": "history", "id": rid(), "channel": "notifications"})
        assert empty["result"]["messages"] == [] and empty["result"]["recovered"] is True


async def test_gap_beyond_buffer_is_not_recovered(wsd):
    """A since position older than the buffer (history_size 5) gives recovered false and what is held."""
    pubs = await publish(wsd, 8)
    epoch = pubs[0]["epoch"]
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        reply = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                   "since": {"offset": 1, "epoch": epoch}})
        assert reply["result"]["recovered"] is False
        assert [m["offset"] for m in reply["result"]["messages"]] == [4, 5, 6, 7, 8]
        res = await subscribe(ws, "trading-signals", history={"since": {"offset": 2, "epoch": epoch}})
        assert res["recovered"] is False and res["position"] == {"offset": 8, "epoch": epoch}
        # Offset 3 is the oldest still held's predecessor: unbroken.
        res = await subscribe(ws, "trading-signals", history={"since": {"offset": 3, "epoch": epoch}})
        assert res["recovered"] is True and res["history"] == 5


async def test_wrong_epoch_is_not_recovered(wsd):
    """A since position from another epoch gives recovered false, on history and on subscribe."""
    await publish(wsd, 2)
    async with wsd.connect(token=alice()) as ws:
        await welcome(ws)
        reply = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                   "since": {"offset": 1, "epoch": "not-this-one"}})
        assert reply["result"]["recovered"] is False
        res = await subscribe(ws, "trading-signals", history={"since": {"offset": 1, "epoch": "old"}})
        assert res["recovered"] is False
        # A position beyond the stream's top is a position this epoch never reached.
        epoch = reply["result"]["position"]["epoch"]
        res = await subscribe(ws, "trading-signals", history={"since": {"offset": 99, "epoch": epoch}})
        assert res["recovered"] is False and res["history"] == 0


async def test_concurrent_live_during_history_not_duplicated(wsd):
    """Messages published while a client subscribes with history arrive once each, in offset order."""
    await publish(wsd, 3)
    async with wsd.connect(token=alice()) as ws, wsd.connect("api", token=make_token("svc", "acme")) as pub:
        await welcome(ws)
        await welcome(pub)

        async def blast() -> None:
            for i in range(20):
                await pub.send(json.dumps({"op": "publish", "id": rid(), "channel": "trading-signals",
                                           "data": {"n": f"live{i}"}}))
            for _ in range(20):  # every publish has been made before the sentinel below
                assert (await recv_json(pub)).get("ok") is True

        task = asyncio.create_task(blast())
        await subscribe(ws, "trading-signals", history={"limit": 5})
        await task
        await wsd.ctl("publish", channel="trading-signals/acme", data={"sentinel": "c"})
        seen = [f["offset"] for f in await frames_before(ws, "c") if f.get("type") == "message"]
        assert seen == sorted(set(seen)), seen
        assert seen[-1] == 23 and seen == list(range(seen[0], 24))


async def test_listen_only_subscriber_is_not_idle(wsd_factory):
    """A subscriber that only listens (answering pings) outlives connection_timeout_ms and still receives."""
    w = wsd_factory(env={"WSD_MANAGER_HEARTBEAT_INTERVAL_MS": "200", "WSD_MANAGER_CONNECTION_TIMEOUT_MS": "1000"})
    async with w.connect(token=alice()) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals")
        # Idle for 1.6 s (> 1 s timeout): no frame may arrive, in particular no 4010 close.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 1.6)
        res = await w.ctl("publish", channel="trading-signals/acme", data={"still": "here"})
        assert res["delivered"] == 1
        msg = await recv_until(ws, lambda m: m.get("type") == "message")
        assert msg["data"] == {"still": "here"}


async def test_a_bad_mode_or_priority_is_answered_with_the_allowed_values(wsd):
    """A mode or priority outside its set is bad_request naming the field, its allowed values and the key path;
    nothing is subscribed or published, and every allowed value then works on the same connection."""
    modes = ("realtime", "batch", "on_demand", "historical")
    async with wsd.connect("api", token=make_token("svc", "acme")) as ws:
        await welcome(ws)
        for mode in ("streaming", "REALTIME", 3):
            reply = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals", "mode": mode})
            assert reply["ok"] is False and reply["error"] == {
                "code": "bad_request",
                "message": "mode must be one of realtime, batch, on_demand, historical - at `$.mode`"}, reply
        for priority in ("urgent", "HIGH", 4, True, None):
            reply = await request(ws, {"op": "publish", "id": rid(), "channel": "trading-signals", "data": {},
                                       "priority": priority})
            assert reply["ok"] is False and reply["error"] == {
                "code": "bad_request",
                "message": "priority must be critical, high, normal or low (or 0..3) - at `$.priority`"}, reply
        assert (await wsd.ctl("subscriptions.list"))["total"] == 0
        offsets = []
        for priority in ("critical", "high", "normal", "low", 0, 3):
            reply = await request(ws, {"op": "publish", "id": rid(), "channel": "trading-signals", "data": {},
                                       "priority": priority})
            assert reply["ok"], reply
            offsets.append(reply["result"]["offset"])
        assert offsets == [1, 2, 3, 4, 5, 6]  # none of the refused publishes was stored
        for mode in modes:
            assert (await subscribe(ws, "trading-signals", mode=mode))["mode"] == mode
