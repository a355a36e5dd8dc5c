"""What an ordinary client can make the daemon keep, and how much work one request can cost.

Real daemons, real clients: filter sizes, sessions (size, per user, in total, expiry), channel instances,
fan-out timestamps and limiter keys under a churn of distinct names, and history/pull replies capped
and paged with ``since``. The counts are read from the control socket's ``metrics.get`` and /metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
from typing import Any

from tests.harness import (
    ControlError,
    frames_before,
    http_get,
    make_token,
    recv_json,
    recv_until,
    request,
    wait_for,
    welcome,
)
from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401  (the redis-server fixture)
from tests.test_wsctl import awsctl

_ids = itertools.count(1)


def rid() -> int:
    return next(_ids)


def channels_toml(history_size: int = 100, history_ttl_s: int = 3600) -> str:
    return f"""
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
history_size = {history_size}
history_ttl_s = {history_ttl_s}
publishers = ["api", "admin"]

[channels.notifications]
type = "user"
publishers = ["api", "admin"]
"""


def env(**keys: Any) -> dict[str, str]:
    """``section_key=value`` as WSD_* overrides (the base config already has [manager] and [limits] tables)."""
    return {f"WSD_{k.upper()}": str(v) for k, v in keys.items()}


async def memory(wsd: Any) -> dict[str, Any]:
    return (await wsd.ctl("metrics.get"))["memory"]


async def gone(wsd: Any, conn_id: str) -> None:
    """Wait until the daemon has finished with a connection (its session is saved by then)."""
    async def check() -> bool:
        try:
            await wsd.ctl("connections.get", id=conn_id)
        except ControlError as exc:
            return exc.code == "not_found"
        return False
    await wait_for(check)


async def drop(wsd: Any, ws: Any, conn_id: str) -> None:
    """A dropped network: the daemon keeps the session."""
    ws.transport.abort()
    await gone(wsd, conn_id)


# ------------------------------------------------------------------------------------------- filters

async def test_subscribe_filter_beyond_the_bounds_is_refused_and_nothing_is_stored(wsd_factory):
    """Too many filter types, or one too long: error filter_too_large, no subscription, no session."""
    wsd = wsd_factory(env=env(limits_max_filter_types=8, limits_max_filter_type_length=16))
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        w = await welcome(ws)
        many = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                  "filter": {"types": [f"t{i}" for i in range(9)]}})
        assert many["ok"] is False and many["error"]["code"] == "filter_too_large"
        assert "at most 8" in many["error"]["message"]
        long = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                  "filter": {"types": ["ok", "x" * 17]}})
        assert long["ok"] is False and long["error"]["code"] == "filter_too_large"
        info = await wsd.ctl("connections.get", id=w["connection_id"])
        assert "trading-signals/acme" not in json.dumps(info.get("subscriptions", []))
        assert (await wsd.ctl("metrics.get"))["subscriptions"]["total"] == 1  # system-status only
        fits = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                  "filter": {"types": [f"t{i}" for i in range(7)] + ["x" * 16]}})
        assert fits["ok"] is True


# ------------------------------------------------------------------------------------------ sessions

async def test_sessions_are_bounded_per_user_and_in_total_oldest_evicted_and_counted(wsd_factory):
    """Each user keeps at most max_sessions_per_user, the daemon at most max_sessions: the oldest goes,
    its resume starts afresh, and the evictions are counted in metrics and Prometheus."""
    wsd = wsd_factory(env=env(limits_max_sessions_per_user=2, limits_max_sessions=3))
    sids = []
    for _ in range(3):
        async with wsd.connect(token=make_token("alice", "acme")) as ws:
            w = await welcome(ws)
            sids.append(w["session_id"])
            await drop(wsd, ws, w["connection_id"])
    m = await memory(wsd)
    assert m["sessions"] == 2 and m["sessions_evicted"] == 1
    for user in ("bob", "carol"):
        async with wsd.connect(token=make_token(user, "acme")) as ws:
            w = await welcome(ws)
            await drop(wsd, ws, w["connection_id"])
    m = await memory(wsd)
    assert m["sessions"] == 3 and m["sessions_evicted"] == 2  # carol's took the oldest overall: alice's
    for evicted in sids[:2]:
        async with wsd.connect(token=make_token("alice", "acme"), query={"session": evicted}) as ws:
            assert (await welcome(ws))["resumed"] is False
            await ws.close(1000)
    async with wsd.connect(token=make_token("alice", "acme"), query={"session": sids[2]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        await ws.close(1000)
    status, body = http_get(wsd.port, "/metrics")
    text = body.decode()
    assert status == 200 and "wsd_sessions_evicted_total 2.0" in text and "\nwsd_sessions " in text


async def test_expired_sessions_are_freed_on_the_sweep(wsd_factory):
    """Sessions nobody resumes are freed once session_ttl_s has passed, and counted as expired."""
    wsd = wsd_factory(env=env(manager_session_ttl_s=1))
    for i in range(20):
        async with wsd.connect(token=make_token(f"u{i}", "acme")) as ws:
            w = await welcome(ws)
            await drop(wsd, ws, w["connection_id"])
    assert (await memory(wsd))["sessions"] == 20
    shown = await awsctl(wsd, "metrics")
    assert shown.rc == 0 and re.search(r"sessions\s+20 ", shown.out), shown.out

    async def freed() -> bool:
        m = await memory(wsd)
        return m["sessions"] == 0 and m["sessions_expired"] == 20 and m["session_bytes"] == 0
    await wait_for(freed, timeout=5, step=0.1)


async def test_a_session_larger_than_the_bound_is_not_kept(wsd_factory):
    """Over max_session_bytes: not stored, counted as refused, logged; the resume gets a new session."""
    wsd = wsd_factory(env=env(limits_max_session_bytes=400))
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        w = await welcome(ws)
        for ch in ("trading-signals", "notifications"):
            r = await request(ws, {"op": "subscribe", "id": rid(), "channel": ch,
                                   "filter": {"types": [f"type-{i:04d}-{'x' * 20}" for i in range(10)]}})
            assert r["ok"]
        await drop(wsd, ws, w["connection_id"])
    m = await memory(wsd)
    assert m["sessions"] == 0 and m["sessions_refused"] == 1
    assert "limits.max_session_bytes is 400" in wsd.log()
    async with wsd.connect(token=make_token("alice", "acme"), query={"session": w["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is False and w2["session_id"] != w["session_id"]


# ------------------------------------------------------------------------------- churn of distinct names

async def test_churn_of_distinct_names_falls_back_after_the_ttl(wsd_factory):
    """Hundreds of channel instances, sessions, limiter keys and fan-out timestamps from distinct names:
    once unused and past their ttl, every count the daemon reports falls back to zero."""
    wsd = wsd_factory(channels_toml(history_ttl_s=1),
                      env=env(manager_session_ttl_s=1, limits_connections_per_user_per_minute=60))
    for i in range(300):
        await wsd.ctl("publish", channel=f"trading-signals/co{i}", data={"i": i})
    for i in range(30):
        async with wsd.connect(token=make_token(f"churn{i}", f"co{i}")) as ws:
            w = await welcome(ws)
            r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals"})
            assert r["ok"]
            await wsd.ctl("publish", channel=f"trading-signals/co{i}", data={"live": i})
            await recv_until(ws, lambda m: m.get("type") == "message")
            await drop(wsd, ws, w["connection_id"])
    m = await memory(wsd)
    assert m["channels"] >= 300 and m["sessions"] == 30 and m["limiter_keys"]["user"] >= 1

    async def flat() -> bool:
        m = await memory(wsd)
        return (m["channels"], m["sessions"], m["limiter_keys"]["user"], m["limiter_keys"]["ip"],
                m["fanout_channels"]) == (0, 0, 0, 0, 0)
    await wait_for(flat, timeout=8, step=0.2)
    m = await memory(wsd)
    assert m["channels_expired"] >= 300 and m["sessions_expired"] == 30
    status, body = http_get(wsd.port, "/metrics")
    assert status == 200 and "\nwsd_history_channels 0.0" in body.decode()
    assert 'wsd_limiter_keys{limiter="user"} 0.0' in body.decode()


async def test_an_instance_in_use_is_kept_while_unused_ones_expire(wsd_factory):
    """A subscribed instance keeps its history (and offsets) past the ttl; unsubscribed ones are freed."""
    wsd = wsd_factory(channels_toml(history_ttl_s=1))
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals"}))["ok"]
        first = await wsd.ctl("publish", channel="trading-signals/acme", data={"n": 1})
        await wsd.ctl("publish", channel="trading-signals/other", data={"n": 1})

        async def other_freed() -> bool:
            chans = (await wsd.ctl("metrics.get"))["memory"]
            return chans["channels"] == 1 and chans["channels_expired"] == 1
        await wait_for(other_freed, timeout=6, step=0.2)
        second = await wsd.ctl("publish", channel="trading-signals/acme", data={"n": 2})
        assert second["offset"] == first["offset"] + 1 and second["epoch"] == first["epoch"]


async def test_a_position_in_an_evicted_instance_is_not_recovered(wsd_factory):
    """Past max_history_channels the least recently used unsubscribed instance is freed; a client resuming
    or asking `since` a position of it gets recovered:false and only the new instance's messages, under a
    new epoch (offsets are never reused under one epoch)."""
    wsd = wsd_factory(channels_toml(), env=env(limits_max_history_channels=2))
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals"}))["ok"]
        for n in (1, 2):
            await wsd.ctl("publish", channel="trading-signals/acme", data={"old": n})
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(2)]
        old = {"offset": got[-1]["offset"], "epoch": got[-1]["epoch"]}
        await drop(wsd, ws, w["connection_id"])
    for co in ("b", "c"):  # two other instances: acme's (no subscriber now) is the least recently used
        await wsd.ctl("publish", channel=f"trading-signals/{co}", data={})
    m = await memory(wsd)
    assert m["channels"] == 2 and m["channels_evicted"] == 1
    new = await wsd.ctl("publish", channel="trading-signals/acme", data={"new": 1})
    assert new["offset"] == 1 and new["epoch"] != old["epoch"]
    async with wsd.connect(token=token, query={"session": w["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        rec = await recv_until(ws, lambda m: m.get("type") in ("recovery", "message"))
        assert rec["type"] == "recovery" and rec["recovered"] is False
        msg = await recv_until(ws, lambda m: m.get("type") == "message")
        assert msg["data"] == {"new": 1} and msg["epoch"] == new["epoch"]
        h = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals", "since": old})
        assert h["ok"] and h["result"]["recovered"] is False
        assert [x["data"] for x in h["result"]["messages"]] == [{"new": 1}]


# ------------------------------------------------------------------------- history and pull replies

async def fill(wsd: Any, n: int, size: int, channel: str = "trading-signals/acme") -> None:
    pad = "x" * size
    for start in range(0, n, 20):
        await asyncio.gather(*(wsd.ctl("publish", channel=channel, data={"i": i, "pad": pad})
                               for i in range(start, min(n, start + 20))))


async def page_all(ws: Any, first: dict[str, Any], max_bytes: int) -> list[dict[str, Any]]:
    """Send ``first``, then page on with ``since`` = the reply's ``next`` until ``more`` is false; every
    reply's raw frame must stay within ``max_bytes`` plus the envelope."""
    out: list[dict[str, Any]] = []
    frame = first
    for _ in range(100):
        await ws.send(json.dumps(frame))
        while True:
            raw = await asyncio.wait_for(ws.recv(), 10)
            reply = json.loads(raw)
            if reply.get("id") == frame["id"]:
                break
        assert reply["ok"], reply
        assert len(raw) <= max_bytes + 512, len(raw)
        res = reply["result"]
        out.extend(res["messages"])
        if not res["more"]:
            assert "next" not in res
            return out
        # the last position looked at: the last message, or past it when what follows was left out
        assert not res["messages"] or res["next"]["offset"] >= res["messages"][-1]["offset"]
        frame = {"op": "history", "id": rid(), "channel": first["channel"], "since": res["next"]}
    raise AssertionError("paging did not end")


async def test_history_of_a_full_buffer_is_capped_and_pages_every_message_once(wsd_factory):
    """1,000 messages of 5 KB: each history reply stays under history_max_bytes with more/next, and paging
    with `since` returns every message exactly once, in order."""
    wsd = wsd_factory(channels_toml(history_size=1000))
    await fill(wsd, 1000, 5000)
    cap = 524288
    async with wsd.connect(token=make_token("alice", "acme"), max_size=4 * cap) as ws:
        await welcome(ws)
        msgs = await page_all(ws, {"op": "history", "id": rid(), "channel": "trading-signals"}, cap)
        assert [m["offset"] for m in msgs] == list(range(1, 1001))
        assert sorted(m["data"]["i"] for m in msgs) == list(range(1000))
        assert all(m["history"] is True and m["type"] == "message" and len(m["data"]["pad"]) == 5000
                   for m in msgs)
        # "the newest N" is cut from its oldest end too, and pages on to the newest
        newest = await page_all(ws, {"op": "history", "id": rid(), "channel": "trading-signals", "limit": 300},
                                cap)
        assert [m["offset"] for m in newest] == list(range(701, 1001))


async def test_history_message_cap_is_configurable(wsd_factory):
    """history_max_messages cuts a reply by count."""
    wsd = wsd_factory(channels_toml(), env=env(limits_history_max_messages=7))
    await fill(wsd, 20, 10)
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        r = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals"})
        res = r["result"]
        assert len(res["messages"]) == 7 and res["more"] is True and res["next"]["offset"] == 7
        assert res["position"]["offset"] == 20 and res["recovered"] is True
        msgs = await page_all(ws, {"op": "history", "id": rid(), "channel": "trading-signals"}, 524288)
        assert [m["offset"] for m in msgs] == list(range(1, 21))


async def test_pull_is_capped_and_pages_every_message_once(wsd_factory):
    """A pull returns at most history_max_messages / history_max_bytes, says more, and the rest stays held."""
    wsd = wsd_factory(channels_toml(), env=env(limits_history_max_messages=10, limits_history_max_bytes=20000))
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                   "mode": "on_demand"}))["ok"]
        for i in range(25):
            await wsd.ctl("publish", channel="trading-signals/acme", data={"i": i, "pad": "y" * 3000})
        seen: list[int] = []
        sizes = []
        for _ in range(20):
            r = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
            res = r["result"]
            sizes.append(len(res["messages"]))
            seen.extend(m["data"]["i"] for m in res["messages"])
            assert res["more"] is (res["remaining"] > 0)
            if not res["more"]:
                break
        assert seen == list(range(25))
        assert max(sizes) <= 6  # 20,000 bytes of ~3 KB messages
        r = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals", "limit": 3})
        assert r["result"]["messages"] == [] and r["result"]["more"] is False


async def test_history_and_pull_refuse_a_limit_below_one(wsd):
    """A negative or zero limit is bad_request, for history and pull alike."""
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                   "mode": "on_demand"}))["ok"]
        for op in ("history", "pull"):
            for limit in (-1, 0):
                r = await request(ws, {"op": op, "id": rid(), "channel": "trading-signals", "limit": limit})
                assert r["ok"] is False and r["error"]["code"] == "bad_request", (op, limit, r)
                assert "limit" in r["error"]["message"]
        ok = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals", "limit": 1})
        assert ok["ok"] is True and ok["result"]["more"] is False


# ------------------------------------------------------------------------------------ Redis engine

async def test_redis_history_is_capped_and_pages_every_message_once(wsd_factory, redis_url):  # noqa: F811
    """The same caps and paging with history kept in Redis."""
    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix) + channels_toml(history_size=1000))
    await fill(wsd, 1000, 5000)
    cap = 524288
    async with wsd.connect(token=make_token("alice", "acme"), max_size=4 * cap) as ws:
        await welcome(ws)
        msgs = await page_all(ws, {"op": "history", "id": rid(), "channel": "trading-signals"}, cap)
        assert [m["offset"] for m in msgs] == list(range(1, 1001))
        assert sorted(m["data"]["i"] for m in msgs) == list(range(1000))
        assert all(m["history"] is True and len(m["data"]["pad"]) == 5000 for m in msgs)
        r = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals", "limit": -1})
        assert r["ok"] is False and r["error"]["code"] == "bad_request"


async def test_redis_sessions_are_bounded_and_counted(wsd_factory, redis_url):  # noqa: F811
    """Per-user and total session bounds, refusal by size and the stored count hold with Redis too."""
    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix), env=env(limits_max_sessions_per_user=2, limits_max_sessions=3,
                                                              limits_max_session_bytes=1000))
    sids = []
    for user in ("alice", "alice", "alice", "bob", "carol"):
        async with wsd.connect(token=make_token(user, "acme")) as ws:
            w = await welcome(ws)
            sids.append(w["session_id"])
            await drop(wsd, ws, w["connection_id"])

    async def counted() -> bool:
        m = await memory(wsd)
        return m["sessions"] == 3 and m["sessions_evicted"] == 2
    await wait_for(counted, timeout=5, step=0.1)
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        assert 0 < await r.ttl(f"{prefix}:session:{sids[2]}") <= 300  # Redis frees it by itself at expiry
        assert await r.exists(f"{prefix}:session:{sids[0]}") == 0  # evicted: deleted, not just unindexed
    finally:
        await r.aclose()
    for sid, resumed in zip(sids[:3], (False, False, True)):
        async with wsd.connect(token=make_token("alice", "acme"), query={"session": sid}) as ws:
            assert (await welcome(ws))["resumed"] is resumed, sid
            await ws.close(1000)
    async with wsd.connect(token=make_token("dave", "acme")) as ws:
        w = await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                               "filter": {"types": [f"type-{i:03d}-{'z' * 60}" for i in range(20)]}})
        assert r["ok"]
        await drop(wsd, ws, w["connection_id"])
    assert (await memory(wsd))["sessions_refused"] == 1
    async with wsd.connect(token=make_token("dave", "acme"), query={"session": w["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is False


async def test_redis_node_forgets_positions_of_unused_expired_instances(wsd_factory, redis_url):  # noqa: F811
    """A Redis node's local map of channel positions stays flat under a churn of names: unused instances
    are forgotten once their history has expired (Redis expires their keys by itself)."""
    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix) + channels_toml(history_ttl_s=1))
    for i in range(100):
        await wsd.ctl("publish", channel=f"trading-signals/co{i}", data={"i": i})
    assert (await memory(wsd))["channels"] == 100

    async def flat() -> bool:
        m = await memory(wsd)
        return m["channels"] == 0 and m["channels_expired"] == 100
    await wait_for(flat, timeout=6, step=0.2)
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        assert await r.exists(f"{prefix}:ch:{{trading-signals/co1}}:hist") == 0  # expired in Redis
        assert await r.ttl(f"{prefix}:ch:{{trading-signals/co1}}:meta") > 0  # offsets kept, but not forever
    finally:
        await r.aclose()


# ------------------------------------------------------------------- positions across a new epoch

async def resumed_frames(wsd: Any, token: str, session_id: str, channel: str, marker: str, msg_type: str = "message"
                         ) -> list[dict[str, Any]]:
    """Resume ``session_id`` and return every message (batches unpacked) and recovery frame before a fresh
    sentinel message in ``channel``."""
    seen: list[dict[str, Any]] = []
    async with wsd.connect(token=token, query={"session": session_id}) as ws:
        assert (await welcome(ws))["resumed"] is True
        await wsd.ctl("publish", channel=channel, type=msg_type, data={"sentinel": marker})
        while True:
            m = await recv_json(ws)
            for x in m["messages"] if m.get("type") == "batch" else [m]:
                if x.get("data") == {"sentinel": marker}:
                    return seen
                if x.get("type") in ("message", "recovery"):
                    seen.append(x)


async def test_a_filtered_subscription_resumes_in_the_epoch_it_was_delivered(wsd_factory):
    """A subscription whose messages go through the slow path (a type filter here) keeps the epoch of what it
    was sent: subscribed before its instance existed, other instances freed meanwhile (a new epoch), it
    resumes with recovered:true and no message twice."""
    wsd = wsd_factory(channels_toml(), env=env(limits_max_history_channels=2))
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                               "filter": {"types": ["sig"]}})
        assert r["ok"] and r["result"]["position"]["offset"] == 0
        for co in ("b", "c", "d"):  # the third evicts "b": a new epoch for instances created from now on
            await wsd.ctl("publish", channel=f"trading-signals/{co}", data={})
        assert (await memory(wsd))["channels_evicted"] >= 1
        sent = await wsd.ctl("publish", channel="trading-signals/acme", type="sig", data={"n": 1})
        assert sent["epoch"] != r["result"]["position"]["epoch"]
        got = await recv_until(ws, lambda m: m.get("type") == "message")
        assert got["offset"] == 1 and got["epoch"] == sent["epoch"]
        await drop(wsd, ws, w["connection_id"])
    assert await resumed_frames(wsd, token, w["session_id"], "trading-signals/acme", "s1", "sig") == []


async def test_a_batch_subscription_resumes_in_the_epoch_it_was_delivered(wsd_factory):
    """The same for a batch subscription: its batch frames move its position, epoch included."""
    wsd = wsd_factory(channels_toml(), env=env(limits_max_history_channels=2))
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals", "mode": "batch"})
        assert r["ok"]
        for co in ("b", "c", "d"):
            await wsd.ctl("publish", channel=f"trading-signals/{co}", data={})
        sent = await wsd.ctl("publish", channel="trading-signals/acme", data={"n": 1})
        assert sent["epoch"] != r["result"]["position"]["epoch"]
        await recv_until(ws, lambda m: m.get("type") == "batch")
        await drop(wsd, ws, w["connection_id"])
    assert await resumed_frames(wsd, token, w["session_id"], "trading-signals/acme", "s2") == []


async def test_a_pulled_on_demand_subscription_resumes_in_the_epoch_it_pulled(wsd_factory):
    """The same for on_demand: what was pulled is not held again after a resume, and nothing is unrecovered."""
    wsd = wsd_factory(channels_toml(), env=env(limits_max_history_channels=2))
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals", "mode": "on_demand"})
        assert r["ok"]
        for co in ("b", "c", "d"):
            await wsd.ctl("publish", channel=f"trading-signals/{co}", data={})
        sent = await wsd.ctl("publish", channel="trading-signals/acme", data={"n": 1})
        assert sent["epoch"] != r["result"]["position"]["epoch"]
        p = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert [m["data"] for m in p["result"]["messages"]] == [{"n": 1}]
        await drop(wsd, ws, w["connection_id"])
    async with wsd.connect(token=token, query={"session": w["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        p = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert p["result"]["messages"] == [], p
        await wsd.ctl("publish", channel="trading-signals/acme", data={"sentinel": "s3"})
        p = await request(ws, {"op": "pull", "id": rid(), "channel": "trading-signals"})
        assert [m["data"] for m in p["result"]["messages"]] == [{"sentinel": "s3"}]


async def test_redis_filtered_subscription_to_a_new_channel_resumes_without_replaying(wsd_factory, redis_url):  # noqa: F811
    """With Redis, a channel nobody has published to has no epoch yet: a filtered subscription to it learns
    the epoch from what it is sent, so its resume replays nothing it already had."""
    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix) + channels_toml())
    token = make_token("alice", "acme")
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                               "filter": {"types": ["sig"]}})
        assert r["ok"] and r["result"]["position"]["offset"] == 0
        for n in (1, 2):
            await wsd.ctl("publish", channel="trading-signals/acme", type="sig", data={"n": n})
        for n in (1, 2):
            assert (await recv_until(ws, lambda m: m.get("type") == "message"))["data"] == {"n": n}
        await drop(wsd, ws, w["connection_id"])
    assert await resumed_frames(wsd, token, w["session_id"], "trading-signals/acme", "s4", "sig") == []


# ------------------------------------------------------------------- history served from the stored push

async def live_and_history(wsd: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Three publications as pushed live, as read with `history`, and as replayed by `subscribe` with history."""
    sent = [("trading_signal", {"symbol": "EURUSD", "price": 1.0832, "tags": ["a", "é\u2028"], "n": None}, "high"),
            ("note", [1, 2.5, {"deep": {"x": True}}], "critical"),
            ("message", "plain text \"quoted\" </script>", "low")]
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals"}))["ok"]
        for t, data, prio in sent:
            await wsd.ctl("publish", channel="trading-signals/acme", type=t, data=data, priority=prio)
        live = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in sent]
        h = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals"})
        hist = h["result"]["messages"]
        assert (await request(ws, {"op": "unsubscribe", "id": rid(), "channel": "trading-signals"}))["ok"]
        assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                   "history": {"limit": 3}}))["ok"]
        replay = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in sent]
    assert [m["data"] for m in live] == [d for _, d, _ in sent]
    return live, hist, replay


def assert_same_as_live(live: list[dict[str, Any]], other: list[dict[str, Any]]) -> None:
    assert len(other) == len(live)
    for a, b in zip(live, other):
        assert b.pop("history") is True and "history" not in a
        assert list(b) == list(a) and b == a  # every field, in the same order


async def test_history_and_replay_are_the_live_push_field_by_field(wsd_factory):
    """`history` and a subscribe replay carry exactly the live push's fields and values, plus history:true."""
    live, hist, replay = await live_and_history(wsd_factory(channels_toml()))
    assert_same_as_live(live, hist)
    assert_same_as_live(live, replay)


async def test_redis_history_and_replay_are_the_live_push_field_by_field(wsd_factory, redis_url):  # noqa: F811
    prefix = "t" + secrets.token_hex(3)
    live, hist, replay = await live_and_history(wsd_factory(engine_toml(redis_url, prefix) + channels_toml()))
    assert_same_as_live(live, hist)
    assert_same_as_live(live, replay)


async def test_a_message_kept_in_history_still_shows_its_data_to_the_operator(wsd_factory):
    """History holds each message as its encoded push only; `wsctl history` still shows its data."""
    wsd = wsd_factory(channels_toml())
    data = {"symbol": "EURUSD", "levels": [1, 2, {"x": "y"}]}
    await wsd.ctl("publish", channel="trading-signals/acme", type="sig", data=data)
    got = await wsd.ctl("history.get", channel="trading-signals/acme")
    assert [m["data"] for m in got["messages"]] == [data] and got["messages"][0]["type"] == "sig"
    shown = await awsctl(wsd, "history", "trading-signals/acme")
    assert shown.rc == 0 and "EURUSD" in shown.out, shown.out


def test_a_message_kept_in_history_is_held_once_as_its_encoded_push():
    """The memory engine keeps a published message as the bytes it is pushed as, not also as decoded data."""
    import gc

    import msgspec

    from wsd.engine.base import Publication
    from wsd.engine.memory import MemoryEngine
    from wsd.runtime.hub import Hub, encode_push

    engine = MemoryEngine(clock=lambda: 0.0)
    data = msgspec.json.decode(b'{"symbol": "EURUSD", "price": 1.0832, "levels": [1, 2, 3]}')
    pub = Publication(id="p1", channel="trading-signals/acme", group="trading-signals", type="sig", priority=2,
                      data=data, ts=1764150000.5)
    asyncio.run(engine.publish(pub, 100, 3600))
    Hub._keep_encoded(pub)
    stored = asyncio.run(engine.history("trading-signals/acme")).publications[0]
    assert stored.payload == encode_push(stored) and msgspec.json.decode(stored.payload)["offset"] == 1
    assert not any(r is data for r in gc.get_referents(stored))  # the decoded data is not held
    assert stored.data == data  # read back from the payload when asked
    # a message that is not kept (no history) keeps its data for delivery
    loose = Publication(id="p2", channel="", group="", type="direct", priority=2, data=data, ts=1.0)
    Hub._keep_encoded(loose)
    assert loose.data is data and loose.payload is None


# ------------------------------------------------------ history shaped by the routing rules, as live

SHAPING_RULES = """
[[routing.rules]]
id = "strip"
filter = { channels = ["trading-signals"], message_types = ["sig"] }
target = { type = "channel" }
transform = { exclude_fields = ["internal"] }
pool_transforms = { mt5 = { exclude_fields = ["chart"] } }

[[routing.rules]]
id = "mt5-only"
filter = { channels = ["trading-signals"], message_types = ["mt5_note"] }
target = { type = "broadcast", pools = ["mt5"] }
"""


async def test_history_and_resume_apply_the_routing_transforms_of_live_delivery(wsd_factory):
    """What a rule's transform (and a pool's) removes live is removed from `history`, a subscribe replay and a
    resume too; a message no rule sends to a connection is not in its history either."""
    wsd = wsd_factory(channels_toml() + SHAPING_RULES)
    full = {"px": 1, "internal": "secret", "chart": [1, 2]}
    shaped = {"frontend": {"px": 1, "chart": [1, 2]}, "mt5": {"px": 1}}
    for pool, co in (("frontend", "acme"), ("mt5", "globex")):
        token = make_token("alice", co, pool=pool)
        inst = f"trading-signals/{co}"
        async with wsd.connect(pool=pool, token=token) as ws:
            w = await welcome(ws)
            assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals"}))["ok"]
            await wsd.ctl("publish", channel=inst, type="sig", data=full)
            await wsd.ctl("publish", channel=inst, type="mt5_note", data={"for": "mt5"})
            await wsd.ctl("publish", channel=inst, type="plain", data={"n": 1})
            live = [m for m in await frames_before_plain(ws) if m.get("type") == "message"]
            h = (await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals"}))["result"]
            await drop(wsd, ws, w["connection_id"])
        want = [shaped[pool]] + ([{"for": "mt5"}] if pool == "mt5" else [])
        assert [m["data"] for m in live] == want, pool
        assert [m["data"] for m in h["messages"]] == want + [{"n": 1}], pool
        assert h["more"] is False
        await wsd.ctl("publish", channel=inst, type="sig", data=full)
        async with wsd.connect(pool=pool, token=token, query={"session": w["session_id"]}) as ws:
            assert (await welcome(ws))["resumed"] is True
            got = await recv_until(ws, lambda m: m.get("type") == "message")
            assert got["data"] == shaped[pool] and got["history"] is True, pool
            assert (await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                       "history": {"limit": 10}}))["ok"]
            replay = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in want + [1, 2]]
            assert [m["data"] for m in replay] == want + [{"n": 1}, shaped[pool]], pool
            await ws.close(1000)


async def frames_before_plain(ws: Any) -> list[dict[str, Any]]:
    """Frames up to and including the first message of type "plain" (the last one published)."""
    out = []
    while True:
        m = await recv_json(ws)
        if m.get("type") == "message" and m.get("msg_type") == "plain":
            return out
        out.append(m)


async def test_history_paging_skips_what_no_rule_sends_without_losing_its_place(wsd_factory):
    """Paging goes on past messages a connection may not see: `next` is the last position looked at."""
    wsd = wsd_factory(channels_toml() + SHAPING_RULES, env=env(limits_history_max_messages=2))
    for i in range(6):
        await wsd.ctl("publish", channel="trading-signals/acme", type="mt5_note" if i % 2 else "plain",
                      data={"i": i})
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        msgs = await page_all(ws, {"op": "history", "id": rid(), "channel": "trading-signals"}, 524288)
    assert [m["data"]["i"] for m in msgs] == [0, 2, 4]


async def test_redis_history_applies_the_routing_transforms_of_live_delivery(wsd_factory, redis_url):  # noqa: F811
    """With Redis (history read back still encoded) the rules shape history as they shape live delivery."""
    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix) + channels_toml() + SHAPING_RULES)
    await wsd.ctl("publish", channel="trading-signals/globex", type="sig", data={"px": 1, "internal": "x", "chart": 1})
    await wsd.ctl("publish", channel="trading-signals/globex", type="mt5_note", data={"for": "mt5"})
    for pool, want in (("mt5", [{"px": 1}, {"for": "mt5"}]), ("frontend", [{"px": 1, "chart": 1}])):
        async with wsd.connect(pool=pool, token=make_token("alice", "globex", pool=pool)) as ws:
            await welcome(ws)
            h = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals"})
            assert [m["data"] for m in h["result"]["messages"]] == want, pool


async def test_sessions_together_stay_within_max_sessions_bytes(wsd_factory):
    """Disconnected sessions of many users together never exceed max_sessions_bytes: the oldest is evicted
    (counted) and its resume starts afresh; the newest resumes."""
    wsd = wsd_factory(env=env(limits_max_sessions_bytes=1200))
    sids = []
    for i in range(8):
        async with wsd.connect(token=make_token(f"user{i}", "acme")) as ws:
            w = await welcome(ws)
            sids.append(w["session_id"])
            await drop(wsd, ws, w["connection_id"])
        m = await memory(wsd)
        assert 0 < m["session_bytes"] <= 1200, m
    m = await memory(wsd)
    assert m["sessions_evicted"] >= 1 and m["sessions"] + m["sessions_evicted"] == 8, m
    async with wsd.connect(token=make_token("user0", "acme"), query={"session": sids[0]}) as ws:
        assert (await welcome(ws))["resumed"] is False
        await ws.close(1000)
    async with wsd.connect(token=make_token("user7", "acme"), query={"session": sids[7]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        await ws.close(1000)


async def test_redis_session_bounds_hold_under_concurrent_saves_from_two_nodes(wsd_factory, redis_url):  # noqa: F811
    """Two nodes saving one user's sessions at once: Redis keeps at most max_sessions_per_user of them, every
    index entry names a stored session, and only stored sessions resume."""
    prefix = "t" + secrets.token_hex(3)
    limits = env(limits_max_sessions_per_user=2)
    nodes = [wsd_factory(engine_toml(redis_url, prefix), env=limits) for _ in range(2)]
    token = make_token("alice", "acme")
    conns = []
    for i in range(8):
        node = nodes[i % 2]
        ws = await node.connect(token=token).__aenter__()
        conns.append((node, ws, await welcome(ws)))
    for _, ws, _ in conns:
        ws.transport.abort()
    await asyncio.gather(*(gone(node, w["connection_id"]) for node, _, w in conns))
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in r.scan_iter(f"{prefix}:session:*")]
        assert len(keys) == 2, keys
        stored = {k.decode().rsplit(":", 1)[1] for k in keys}
        owner = {m.decode() for m in await r.zrange(f"{prefix}:sessions:user:acme/alice", 0, -1)}
        total = {m.decode() for m in await r.zrange(f"{prefix}:sessions", 0, -1)}
        assert owner == stored and total == stored
    finally:
        await r.aclose()
    for node, _, w in conns:
        async with node.connect(token=token, query={"session": w["session_id"]}) as ws:
            assert (await welcome(ws))["resumed"] is (w["session_id"] in stored)
            await ws.close(1000)


async def test_redis_position_cache_stays_bounded_when_every_channel_is_subscribed(redis_url):  # noqa: F811
    """A node's map of channel positions never exceeds max_history_channels, even when every channel in it
    has subscribers here (it is only this node's view; Redis keeps the positions), and a new channel
    costs a bounded look, not a walk of the whole map."""
    from wsd.engine.base import Publication
    from wsd.engine.redis import RedisEngine

    engine = RedisEngine(redis_url, prefix="t" + secrets.token_hex(3))
    engine.max_channels = 50
    looked = 0

    def in_use(ch: str) -> bool:
        nonlocal looked
        looked += 1
        return True

    engine.in_use = in_use
    await engine.start(lambda *a: None)
    try:
        for i in range(200):
            pub = Publication(id=str(i), channel=f"trading-signals/co{i}", group="trading-signals", type="m",
                              priority=2, data={}, ts=1.0)
            await engine.publish(pub, 10, 60)
        assert engine.memory_stats()["channels"] == 50 and engine.memory_stats()["channels_evicted"] == 150
        assert looked <= 150 * 64
    finally:
        await engine.stop()


async def test_subscribe_replays_and_resumes_are_capped_like_history_replies(wsd_factory):
    """A subscribe with history, or a resume, sends at most one history reply's worth (the newest messages);
    a replay `since` a position that had to be cut says recovered:false, and live messages follow with no gap."""
    wsd = wsd_factory(channels_toml(), env=env(limits_history_max_messages=5, limits_history_max_bytes=4000))
    token = make_token("alice", "acme")
    for i in range(20):
        await wsd.ctl("publish", channel="trading-signals/acme", data={"i": i, "pad": "p" * 10})
    async with wsd.connect(token=token) as ws:
        w = await welcome(ws)
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                               "history": {"limit": 20}})
        assert r["result"]["history"] == 5 and r["result"]["recovered"] is True
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(5)]
        assert [m["offset"] for m in got] == [16, 17, 18, 19, 20]
        epoch = got[0]["epoch"]
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                               "history": {"since": {"offset": 3, "epoch": epoch}}})
        assert r["result"]["history"] == 5 and r["result"]["recovered"] is False
        got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(5)]
        assert [m["offset"] for m in got] == [16, 17, 18, 19, 20]
        r = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                               "history": {"since": {"offset": 17, "epoch": epoch}}})
        assert r["result"]["history"] == 3 and r["result"]["recovered"] is True  # within the caps: whole
        await drop(wsd, ws, w["connection_id"])
    big = "b" * 1500  # three of these do not fit in 4,000 bytes
    for i in range(20, 30):
        await wsd.ctl("publish", channel="trading-signals/acme", data={"i": i, "pad": big})
    async with wsd.connect(token=token, query={"session": w["session_id"]}) as ws:
        assert (await welcome(ws))["resumed"] is True
        rec = await recv_until(ws, lambda m: m.get("type") in ("recovery", "message"))
        assert rec["type"] == "recovery" and rec["recovered"] is False
        await wsd.ctl("publish", channel="trading-signals/acme", data={"sentinel": "s9"})
        seen = [m for m in await frames_before(ws, "s9") if m.get("type") == "message"]
        assert [m["offset"] for m in seen] == [29, 30]
        assert all(m["history"] is True for m in seen)


async def test_redis_subscribe_without_history_does_not_read_the_channel_history(wsd_factory, redis_url):  # noqa: F811
    """A subscribe that asks for no history (or for the last few) reads only what it needs from Redis, not
    the whole stored history of the channel each time."""
    import redis.asyncio as aioredis

    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix) + channels_toml(history_size=100))
    await fill(wsd, 100, 30000)  # about 3 MB of history
    r = aioredis.Redis.from_url(redis_url)

    async def sent_by_redis() -> int:
        return int((await r.info("stats"))["total_net_output_bytes"])

    try:
        async with wsd.connect(token=make_token("alice", "acme")) as ws:
            await welcome(ws)
            before = await sent_by_redis()
            for _ in range(5):
                res = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals"})
                assert res["ok"] and res["result"]["position"]["offset"] == 100
            res = await request(ws, {"op": "subscribe", "id": rid(), "channel": "trading-signals",
                                     "history": {"limit": 2}})
            assert res["result"]["history"] == 2
            got = [await recv_until(ws, lambda m: m.get("type") == "message") for _ in range(2)]
            assert [m["offset"] for m in got] == [99, 100]
            spent = await sent_by_redis() - before
        assert spent < 200_000, spent  # two 30 KB messages, not 6 x 3 MB
    finally:
        await r.aclose()


async def test_redis_history_since_reads_one_page_not_the_whole_history(wsd_factory, redis_url):  # noqa: F811
    """`history` with `since` reads from Redis only the page it answers (and pages every message once)."""
    import redis.asyncio as aioredis

    prefix = "t" + secrets.token_hex(3)
    wsd = wsd_factory(engine_toml(redis_url, prefix) + channels_toml(history_size=100),
                      env=env(limits_history_max_messages=10))
    await fill(wsd, 100, 30000)  # about 3 MB of history
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with wsd.connect(token=make_token("alice", "acme"), max_size=2**22) as ws:
            await welcome(ws)
            first = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals", "limit": 1})
            epoch = first["result"]["position"]["epoch"]
            before = int((await r.info("stats"))["total_net_output_bytes"])
            h = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                   "since": {"offset": 50, "epoch": epoch}})
            spent = int((await r.info("stats"))["total_net_output_bytes"]) - before
            res = h["result"]
            assert [m["offset"] for m in res["messages"]] == list(range(51, 61)) and res["recovered"] is True
            assert res["more"] is True and res["next"]["offset"] == 60
            assert spent < 11 * 31000 + 20000, spent  # 11 entries, not 50
            msgs = await page_all(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                       "since": {"offset": 0, "epoch": epoch}}, 2**22)
            assert [m["offset"] for m in msgs] == list(range(1, 101))
            gap = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                     "since": {"offset": 5, "epoch": "other"}})
            assert gap["result"]["recovered"] is False and gap["result"]["messages"][0]["offset"] == 1
            top = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                     "since": {"offset": 100, "epoch": epoch}})
            assert top["result"]["recovered"] is True and top["result"]["messages"] == []
            beyond = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                        "since": {"offset": 150, "epoch": epoch}})
            assert beyond["result"]["recovered"] is False and beyond["result"]["messages"] == []
        async with wsd.connect(token=make_token("bob", "nobody")) as ws:  # a channel nobody published to
            await welcome(ws)
            for offset, recovered in ((0, True), (3, False)):
                h = await request(ws, {"op": "history", "id": rid(), "channel": "trading-signals",
                                       "since": {"offset": offset, "epoch": epoch}})
                assert h["result"]["recovered"] is recovered and h["result"]["messages"] == []
    finally:
        await r.aclose()
