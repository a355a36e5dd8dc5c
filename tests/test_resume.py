"""Session resume through real clients: `?session=<id>` brings back subscriptions and what was missed."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from tests.harness import (
    frames_before,
    ControlError,
    closed_with,
    make_token,
    recv_json,
    recv_until,
    request,
    wait_for,
    welcome,
)

_ids = itertools.count(1)

SMALL_HISTORY = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
history_size = 3
publishers = ["api", "admin"]

[channels.notifications]
type = "user"
publishers = ["api", "admin"]
"""


def rid() -> int:
    return next(_ids)


async def subscribe(ws: Any, channel: str, **extra: Any) -> dict[str, Any]:
    reply = await request(ws, {"op": "subscribe", "id": rid(), "channel": channel, **extra})
    assert reply["ok"], reply
    return reply["result"]


async def publish(wsd: Any, n: int, channel: str = "trading-signals/acme", tag: str = "m"
                  ) -> list[dict[str, Any]]:
    return [await wsd.ctl("publish", channel=channel, data={tag: i}) for i in range(1, n + 1)]


async def gone(wsd: Any, conn_id: str) -> None:
    """Wait until the daemon has finished with a connection (its session is saved by then)."""
    async def check() -> bool:
        try:
            await wsd.ctl("connections.get", id=conn_id)
        except ControlError as exc:
            return exc.code == "not_found"
        return False
    await wait_for(check)


async def leave(wsd: Any, ws: Any, conn_id: str, how: str = "4999") -> None:
    """Drop a connection the way a network failure or a client restart would."""
    if how == "abort":
        ws.transport.abort()
    else:
        await ws.close(int(how))
    await gone(wsd, conn_id)


@pytest.mark.parametrize("how", ["4999", "abort"])
async def test_resume_replays_exactly_the_missed_messages(wsd, how):
    """After a drop, ?session= restores subscriptions and sends exactly the missed messages, then live."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "trading-signals")
        await publish(wsd, 2)
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(2)]
        assert [m["offset"] for m in got] == [1, 2]
        await leave(wsd, ws, w1["connection_id"], how)
    missed = await publish(wsd, 3, tag="away")
    assert all(p["delivered"] == 0 for p in missed)
    async with wsd.connect(token=token, query={"session": w1["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is True and w2["session_id"] == w1["session_id"]
        assert w2["connection_id"] != w1["connection_id"]
        assert "trading-signals/acme" in w2["subscriptions"] and "system-status" in w2["subscriptions"]
        live = await wsd.ctl("publish", channel="trading-signals/acme", data={"live": 1})
        assert live["delivered"] == 1
        await wsd.ctl("publish", channel="trading-signals/acme", data={"sentinel": "r"})
        seen = await frames_before(ws, "r")
        msgs = [m for m in seen if m.get("type") == "message"]
        assert [m["offset"] for m in msgs] == [3, 4, 5, 6]
        assert [m["data"] for m in msgs] == [{"away": 1}, {"away": 2}, {"away": 3}, {"live": 1}]
        assert [m.get("history", False) for m in msgs] == [True, True, True, False]
        assert not any(f.get("type") == "recovery" for f in seen)
        info = await wsd.ctl("connections.get", id=w2["connection_id"])
        assert info["metrics"]["reconnection_count"] == 1 and info["info"]["resumed"] is True


async def test_resume_restores_every_channel_mode_and_filter(wsd):
    """Several subscriptions come back with their filters; each gets only its own missed messages."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "trading-signals", filter={"types": ["trade"]})
        await subscribe(ws, "notifications")
        await leave(wsd, ws, w1["connection_id"])
    for t in ("trade", "news", "trade"):
        await wsd.ctl("publish", channel="trading-signals/acme", type=t, data={"t": t})
    await wsd.ctl("publish", channel="notifications/acme/alice", type="note", data={"note": 1})
    async with wsd.connect(token=token, query={"session": w1["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert sorted(w2["subscriptions"]) == ["notifications/acme/alice", "system-status",
                                               "trading-signals/acme"]
        await wsd.ctl("publish", channel="notifications/acme/alice", data={"sentinel": "n"})
        msgs = [m for m in await frames_before(ws, "n") if m.get("type") == "message"]
        by_channel: dict[str, list[Any]] = {}
        for m in msgs:
            by_channel.setdefault(m["channel"], []).append((m["offset"], m["msg_type"]))
        assert by_channel == {"trading-signals/acme": [(1, "trade"), (3, "trade")],
                              "notifications/acme/alice": [(1, "note")]}
        subs = await wsd.ctl("subscriptions.list", connection=w2["connection_id"])
        filters = {s["channel"]: s["types"] for s in subs["items"]}
        assert filters["trading-signals/acme"] == ["trade"]


async def test_second_resume_counts_two_reconnections(wsd):
    """A session resumed twice carries its reconnection count forward."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        await leave(wsd, ws, w["connection_id"])
    for expected in (1, 2):
        async with wsd.connect(token=token, query={"session": w["session_id"]}) as ws:
            w2 = await welcome(ws)
            assert w2["resumed"] is True
            info = await wsd.ctl("connections.get", id=w2["connection_id"])
            assert info["metrics"]["reconnection_count"] == expected
            await leave(wsd, ws, w2["connection_id"])


async def test_session_of_another_user_is_not_resumed(wsd):
    """A session id presented by another user (or the same user of another company) is not resumed."""
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        w = await welcome(ws)
        await subscribe(ws, "trading-signals")
        await subscribe(ws, "notifications")
        await leave(wsd, ws, w["connection_id"])
    await publish(wsd, 2)
    for user, company in (("bob", "acme"), ("alice", "globex"), ("bob", "globex")):
        async with wsd.connect(token=make_token(user, company), query={"session": w["session_id"]}) as ws:
            other = await welcome(ws)
            assert other["resumed"] is False and other["session_id"] != w["session_id"]
            assert other["subscriptions"] == ["system-status"]
            await wsd.ctl("publish", channel="system-status", data={"sentinel": user + company})
            seen = await frames_before(ws, user + company)
            assert [f for f in seen if f.get("type") in ("message", "batch", "recovery")] == []
    # The attempts did not consume alice's session: she still resumes it.
    async with wsd.connect(token=make_token("alice", "acme"), query={"session": w["session_id"]}) as ws:
        mine = await welcome(ws)
        assert mine["resumed"] is True
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(2)]
        assert [m["offset"] for m in got] == [1, 2]


async def test_session_past_ttl_is_not_resumed(wsd_factory):
    """A session older than manager.session_ttl_s is gone: the client starts afresh."""
    w = wsd_factory(env={"WSD_MANAGER_SESSION_TTL_S": "1"})
    token = make_token("alice", "acme")
    async with w.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "trading-signals")
        await leave(w, ws, w1["connection_id"])
    await asyncio.sleep(1.3)  # the TTL itself is what is under test
    async with w.connect(token=token, query={"session": w1["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is False and w2["subscriptions"] == ["system-status"]
        assert w2["session_id"] != w1["session_id"]


async def test_unknown_session_starts_fresh(wsd):
    """A made-up session id is ignored: a fresh session with the pool's default subscriptions."""
    async with wsd.connect(token=make_token("alice", "acme"), query={"session": "no-such-session"}) as ws:
        w = await welcome(ws)
        assert w["resumed"] is False and w["subscriptions"] == ["system-status"]


@pytest.mark.parametrize("code", [1000, 4000])
async def test_clean_close_or_kick_keeps_no_session(wsd, code):
    """A normal close (1000) or a kick (4000) ends the session: it cannot be resumed."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        await subscribe(ws, "trading-signals")
        if code == 1000:
            await ws.close(1000)
        else:
            await wsd.ctl("kick", ids=[w["connection_id"]], reason="test")
            assert (await closed_with(ws))[0] == 4000
        await gone(wsd, w["connection_id"])
    async with wsd.connect(token=token, query={"session": w["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is False


async def test_buffer_exceeded_while_away_sends_recovery_false(wsd_factory):
    """When more was missed than history holds, a recovery frame says recovered false, then what is held."""
    w = wsd_factory(SMALL_HISTORY)
    token = make_token("alice", "acme")
    async with w.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "trading-signals")
        await publish(w, 1)
        assert (await recv_until(ws, lambda m: m.get("type") == "message"))["offset"] == 1
        await leave(w, ws, w1["connection_id"])
    missed = await publish(w, 6, tag="away")
    async with w.connect(token=token, query={"session": w1["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is True
        rec = await recv_json(ws)
        assert rec == {"type": "recovery", "channel": "trading-signals/acme", "recovered": False,
                       "position": {"offset": 7, "epoch": missed[-1]["epoch"]}}
        await w.ctl("publish", channel="trading-signals/acme", data={"sentinel": "g"})
        msgs = [m for m in await frames_before(ws, "g") if m.get("type") == "message"]
        assert [m["offset"] for m in msgs] == [5, 6, 7] and all(m["history"] for m in msgs)


async def test_resume_with_nothing_missed_sends_nothing(wsd):
    """A client that missed nothing gets no replay and no recovery frame on resume."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "trading-signals")
        await publish(wsd, 2)
        for _ in range(2):
            await recv_until(ws, lambda m: m.get("type") == "message")
        await leave(wsd, ws, w1["connection_id"])
    async with wsd.connect(token=token, query={"session": w1["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        await wsd.ctl("publish", channel="trading-signals/acme", data={"sentinel": "z"})
        assert await frames_before(ws, "z") == []


async def test_on_demand_resume_holds_missed_for_pull(wsd):
    """An on_demand subscription comes back on resume; what it missed is held for pull, not pushed."""
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "trading-signals", mode="on_demand")
        await subscribe(ws, "notifications")
        await publish(wsd, 2)
        first = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals", "limit": 1})
        assert [m["offset"] for m in first["result"]["messages"]] == [1]
        await leave(wsd, ws, w1["connection_id"])
    await publish(wsd, 2, tag="away")
    async with wsd.connect(token=token, query={"session": w1["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        await wsd.ctl("publish", channel="notifications/acme/alice", data={"sentinel": "od"})
        assert [f for f in await frames_before(ws, "od") if f.get("type") == "message"] == []
        pulled = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert [m["offset"] for m in pulled["result"]["messages"]] == [2, 3, 4]
        assert pulled["result"]["remaining"] == 0


async def test_resume_rechecks_permission(wsd):
    """Subscriptions the new token no longer allows (admin role dropped) are not restored on resume."""
    async with wsd.connect(token=make_token("root", "ops", roles=["admin"])) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "admin-events")
        await subscribe(ws, "trading-signals/acme")
        await subscribe(ws, "trading-signals")
        await leave(wsd, ws, w1["connection_id"])
    await wsd.ctl("publish", channel="admin-events", data={"secret": 1})
    await wsd.ctl("publish", channel="trading-signals/acme", data={"secret": 2})
    async with wsd.connect(token=make_token("root", "ops"), query={"session": w1["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is True
        assert sorted(w2["subscriptions"]) == ["system-status", "trading-signals/ops"]
        await wsd.ctl("publish", channel="trading-signals/ops", data={"sentinel": "p"})
        assert [f for f in await frames_before(ws, "p") if f.get("type") == "message"] == []
        assert (await wsd.ctl("presence.get", channel="admin-events"))["connections"] == 0


RELIABLE = """
[[routing.rules]]
id = "reliable-notes"
priority = 10
filter = { channels = ["notifications"] }
target = { type = "channel", reliable_delivery = true, max_retries = 5, ack_timeout_ms = 60000 }
"""


async def test_resume_resends_unacked_reliable_first(wsd_factory):
    """Unacked reliable messages come back first with their seq; seqs continue after resume."""
    w = wsd_factory(RELIABLE)
    token = make_token("alice", "acme")
    chan = "notifications/acme/alice"
    async with w.connect(token=token) as ws:
        w1 = await welcome(ws)
        await subscribe(ws, "notifications")
        await publish(w, 2, channel=chan)
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(2)]
        assert [(m["offset"], m["seq"]) for m in got] == [(1, 1), (2, 2)]
        await ws.send('{"op":"ack","seq":1}')
        await wait_for(lambda: _unacked_is(w, w1["connection_id"], 1))
        await leave(w, ws, w1["connection_id"])
    await publish(w, 1, channel=chan, tag="away")
    async with w.connect(token=token, query={"session": w1["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        await w.ctl("publish", channel=chan, data={"live": 1})
        msgs = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(3)]
        assert [(m["offset"], m.get("seq")) for m in msgs] == [(2, 2), (3, None), (4, 3)]


async def _unacked_is(w: Any, conn_id: str, n: int) -> bool:
    info = await w.ctl("connections.get", id=conn_id)
    return bool(info["reliable"] and info["reliable"]["unacked"] == n)
