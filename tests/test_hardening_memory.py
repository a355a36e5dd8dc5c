"""What an ordinary client can make the daemon keep, and how much work one request can cost.

Real daemons, real clients: filter sizes, sessions (size, per user, in total, expiry), channel instances,
fan-out timestamps and limiter keys under a churn of distinct names, and history/pull replies capped
and paged with ``since``. The counts are read from the control socket's ``metrics.get`` and /metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from typing import Any

from tests.harness import ControlError, http_get, make_token, recv_json, recv_until, request, wait_for, welcome
from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401  (the redis-server fixture)

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
                                  "filter": {"types": [f"t{i}" * 1 for i in range(8)] + []}})
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
