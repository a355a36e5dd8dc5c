"""Pools that scale with demand, through real sockets: reservations (min_connections) hold against a burst
in another pool, capacity nobody reserved is shared up to each pool's ceiling, reload changes the numbers,
and `wsctl pools` shows them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import BASE_CONFIG, Wsd, closed_with, make_token, request, wait_for, welcome
from wsd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def base(limit: int) -> str:
    return BASE_CONFIG.replace("[manager]\n", f"[manager]\nmax_connections = {limit}\n")


def pools(frontend: tuple[int, int], mt5: tuple[int, int], api: tuple[int, int] = (0, 100)) -> str:
    """Three pools, each (min_connections, max_connections)."""
    out = []
    for pid, kind, (lo, hi) in (("frontend", "frontend", frontend), ("mt5", "mt5_client", mt5),
                                ("api", "api", api)):
        out.append(f'[pools.{pid}]\ntype = "{kind}"\npath = "/ws/{pid}"\nmin_connections = {lo}\n'
                   f"max_connections = {hi}\n")
    return "\n".join(out)


def run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


async def wsctl(w: Wsd, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, "-m", "wsctl", "--socket", w.socket, *args)


class Clients:
    """Real clients, kept open until the end of the test (or closed one by one)."""

    def __init__(self, w: Wsd) -> None:
        self.w = w
        self.open: dict[str, list[ClientConnection]] = {}
        self.welcomes: dict[int, dict[str, Any]] = {}  # by id() of the client
        self.n = 0

    async def try_add(self, pool: str) -> tuple[int, dict[str, Any]]:
        """Connect one client to ``pool``: (101, {}) when it is welcomed (and kept), else the refusal's
        (status, JSON body)."""
        self.n += 1
        try:
            ws = await self.w.connect(pool, make_token(f"u{self.n}", pool=pool))
        except InvalidStatus as exc:
            resp = exc.response
            assert resp.headers["Content-Type"].startswith("application/json")
            return resp.status_code, json.loads(resp.body)
        self.welcomes[id(ws)] = await welcome(ws)
        self.open.setdefault(pool, []).append(ws)
        return 101, {}

    async def add(self, pool: str) -> None:
        status, body = await self.try_add(pool)
        assert status == 101, body

    async def fill(self, pool: str, limit: int = 50) -> int:
        """Connect to ``pool`` until refused (the caller checks the refusal with ``try_add``): how many
        got in."""
        for got in range(limit):
            status, _ = await self.try_add(pool)
            if status != 101:
                return got
        raise AssertionError(f"{pool} admitted {limit} connections: no limit held")

    async def close(self, pool: str, k: int) -> None:
        for _ in range(k):
            await self.open[pool].pop().close()

    async def close_all(self) -> None:
        for conns in self.open.values():
            for ws in conns:
                with contextlib.suppress(Exception):
                    await ws.close()


async def counts(w: Wsd) -> dict[str, int]:
    return {p["id"]: p["connections"] for p in (await w.ctl("pools.list"))["pools"]}


async def settle(w: Wsd, want: dict[str, int]) -> None:
    """Wait until the daemon counts ``want`` connections in those pools (probes and closes have landed)."""
    async def ok() -> bool:
        c = await counts(w)
        return all(c.get(k, 0) == v for k, v in want.items())
    await wait_for(ok, timeout=10)


async def test_a_frontend_burst_cannot_take_the_mt5_reservation(wsd_factory):
    """Manager limit 10, mt5 reserves 3: frontend (ceiling 100) gets 7, the 8th is refused 503 pool_full
    naming the shared capacity; mt5 still gets its 3; then the daemon is full (503 manager_full)."""
    w = wsd_factory(pools(frontend=(0, 100), mt5=(3, 10), api=(0, 100)), base=base(10))
    c = Clients(w)
    try:
        assert await c.fill("frontend") == 7
        status, body = await c.try_add("frontend")
        assert (status, body["error"], body["limit"]) == (503, "pool_full", "shared"), body
        assert "shared capacity is exhausted" in body["message"]
        api_status, api_body = await c.try_add("api")
        assert (api_status, api_body["limit"]) == (503, "shared")  # api reserved nothing either
        for _ in range(3):
            await c.add("mt5")
        await settle(w, {"frontend": 7, "mt5": 3})
        for pool in ("mt5", "frontend"):
            status, body = await c.try_add(pool)
            assert (status, body["error"]) == (503, "manager_full"), body
        # every admitted connection works
        for ws in c.open["mt5"] + c.open["frontend"][:1]:
            assert (await request(ws, {"op": "ping", "id": "p"}))["ok"] is True
        r = await w.ctl("pools.list")
        assert r["capacity"] == {"max_connections": 10, "reserved": 3, "shared": 7, "connections": 10,
                                 "shared_free": 0}
        row = {p["id"]: p for p in r["pools"]}
        assert (row["mt5"]["min_connections"], row["mt5"]["shared_used"]) == (3, 0)
        assert row["frontend"]["shared_used"] == 7
        # the refusals are recorded with the limit that refused them
        ev = await w.ctl("events.recent", limit=100)
        reasons = [e.get("reason", "") for e in ev["events"] if e.get("code") == "pool_full"]
        assert any("shared capacity is exhausted" in x for x in reasons), reasons
    finally:
        await c.close_all()


async def test_shared_capacity_freed_by_one_pool_is_taken_by_another(wsd_factory):
    """mt5 grows past its reservation into shared capacity; when it lets go, frontend takes what was
    shared, but never mt5's reserved seats, even with mt5 idle."""
    w = wsd_factory(pools(frontend=(0, 100), mt5=(3, 8), api=(0, 100)), base=base(10))
    c = Clients(w)
    try:
        assert await c.fill("mt5") == 8  # its ceiling: 3 reserved + 5 shared
        status, body = await c.try_add("mt5")
        assert (status, body["error"], body["limit"]) == (503, "pool_full", "ceiling"), body
        assert await c.fill("frontend") == 2  # 10 - 8
        await c.close("mt5", 4)  # mt5 keeps 4: 3 reserved + 1 shared
        await settle(w, {"mt5": 4})
        assert await c.fill("frontend") == 4  # 10 - max(4, 3) - 2 = 4 more
        await c.close("mt5", 4)  # mt5 idle: its 3 reserved seats stay its own
        await settle(w, {"mt5": 0, "frontend": 6})
        assert (await w.ctl("pools.list"))["capacity"]["shared_free"] == 1  # 10 - 3 reserved - 6
        assert await c.fill("frontend") == 1
        status, body = await c.try_add("frontend")
        assert (status, body["limit"]) == (503, "shared"), body
        assert await c.fill("mt5") == 3
        status, body = await c.try_add("mt5")
        assert (status, body["error"]) == (503, "manager_full"), body
    finally:
        await c.close_all()


async def test_reload_changes_the_numbers_and_kicks_nobody(wsd_factory):
    """A reload that frees a reservation lets frontend grow; one that lowers its ceiling below what is open
    keeps the open connections and refuses new ones; a reload whose reservations exceed the limit is refused
    naming the key."""
    w = wsd_factory(pools(frontend=(0, 100), mt5=(3, 10), api=(0, 100)), base=base(10))
    c = Clients(w)
    try:
        assert await c.fill("frontend") == 7
        w.config_path.write_text(base(10) + "\n" + pools(frontend=(0, 100), mt5=(1, 10)))
        assert (await w.ctl("reload"))["ok"] is True
        assert await c.fill("frontend") == 2
        w.config_path.write_text(base(12) + "\n" + pools(frontend=(0, 5), mt5=(1, 10)))
        assert (await w.ctl("reload"))["ok"] is True
        status, body = await c.try_add("frontend")
        assert (status, body["limit"]) == (503, "ceiling"), body
        await settle(w, {"frontend": 9})
        for ws in c.open["frontend"]:  # none was kicked
            assert (await request(ws, {"op": "ping", "id": "p"}))["ok"] is True
        await c.add("mt5")  # the larger limit made room
        # a reload whose reservations do not fit is refused, naming the key; the running numbers stay
        w.config_path.write_text(base(12) + "\n" + pools(frontend=(0, 5), mt5=(13, 20)))
        r = await wsctl(w, "reload")
        assert r.returncode == 1 and "pools.mt5.min_connections" in r.stderr and "12" in r.stderr, r
        cap = (await w.ctl("pools.list"))["capacity"]
        assert (cap["max_connections"], cap["reserved"]) == (12, 1)
        # wsctl pools shows reserved, open / ceiling and the shared capacity
        r = await wsctl(w, "pools")
        assert r.returncode == 0, r
        line = next(x for x in r.stdout.splitlines() if x.strip().startswith("mt5"))
        assert " 1 " in line and "1/10" in line, r.stdout
        assert "9/5" in next(x for x in r.stdout.splitlines() if x.strip().startswith("frontend"))
        assert "shared free 2 of 11 (manager limit 12, reserved 1, open 10)" in r.stdout, r.stdout
    finally:
        await c.close_all()


@pytest.mark.parametrize("toml, key, words",
                         ids=["one-over", "sum-over", "above-ceiling", "negative", "not-int"],
                         argvalues=[
    (pools(frontend=(0, 10), mt5=(11, 20)), "pools.mt5.min_connections",
     "more than manager.max_connections (10)"),
    (pools(frontend=(6, 10), mt5=(6, 20)), "pools", "add up to 12"),
    (pools(frontend=(0, 10), mt5=(5, 4)), "pools.mt5.min_connections",
     "ceiling pools.mt5.max_connections (4)"),
    (pools(frontend=(-1, 10), mt5=(0, 4)), "pools.frontend.min_connections", "at least 0"),
    (pools(frontend=(0, 10), mt5=(0, 4)).replace("min_connections = 0", 'min_connections = "x"', 1),
     "pools.frontend.min_connections", "expected int"),
                         ])
def test_bad_reservations_are_one_line_errors_naming_the_key(tmp_path: Path, toml: str, key: str, words: str):
    path = tmp_path / "w.toml"
    path.write_text(base(10) + "\n" + toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert any(x.startswith(f"{key}:") and words in x for x in info.value.errors), info.value.errors


def test_builtin_pools_with_a_small_limit_reserve_a_tenth_of_it(tmp_path: Path):
    """No [pools] and a small manager.max_connections: the built-in mt5 pool reserves a tenth of it, so the file
    loads; an explicit reservation above the limit is refused in one line naming the key."""
    path = tmp_path / "w.toml"
    path.write_text(base(500))
    r = run("-m", "wsd", "config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert load_config(path, env={}).pools["mt5"].min_connections == 50
    path.write_text(base(500) + '\n[pools.mt5]\ntype = "mt5_client"\npath = "/ws/mt5"\nmin_connections = 1000\n')
    r = run("-m", "wsd", "config", "check", str(path))
    assert r.returncode != 0
    assert "error: pools.mt5.min_connections: reserves 1000 connections, more than manager.max_connections " \
           "(500)" in r.stderr, r.stderr


async def test_a_concurrent_burst_never_takes_a_reservation(wsd_factory):
    """30 frontend handshakes at once against 7 seats nobody reserved: at most 7 stay (the rest get 503, or
    1013 when a concurrent handshake took the seat after theirs was admitted), and mt5 still gets its 3."""
    w = wsd_factory(pools(frontend=(0, 100), mt5=(3, 10), api=(0, 100)), base=base(10))
    c = Clients(w)
    try:
        results = await asyncio.gather(*(c.try_add("frontend") for _ in range(30)), return_exceptions=True)
        admitted = [r for r in results if r == (101, {})]
        refused = [r for r in results if isinstance(r, tuple) and r[0] == 503]
        closed = [r for r in results if isinstance(r, BaseException)]  # 1013 before the welcome
        assert len(admitted) + len(refused) + len(closed) == 30, results
        assert all(r[1]["error"] in ("pool_full", "manager_full") for r in refused)
        assert 1 <= len(admitted) <= 7, results
        await settle(w, {"frontend": len(admitted)})
        for _ in range(3):
            await c.add("mt5")
        assert (await counts(w))["frontend"] == len(admitted) <= 7
    finally:
        await c.close_all()


async def test_a_resume_into_another_pool_moves_its_seat(wsd_factory):
    """With no shared capacity left, a client still connected in frontend resumes its session in api: the
    old connection is taken over (4011), so its seat moves instead of a new one being needed."""
    w = wsd_factory(pools(frontend=(0, 100), mt5=(3, 10), api=(0, 100)), base=base(10))
    c = Clients(w)
    try:
        assert await c.fill("frontend") == 7
        status, body = await c.try_add("api")
        assert (status, body["limit"]) == (503, "shared"), body
        old = c.open["frontend"][0]
        hello = c.welcomes[id(old)]
        new = await w.connect("api", make_token(hello["user_id"]), query={"session": hello["session_id"]})
        try:
            assert (await welcome(new))["pool"] == "api"
            assert (await closed_with(old))[0] == 4011
            await settle(w, {"frontend": 6, "api": 1})
            assert (await w.ctl("pools.list"))["capacity"]["shared_free"] == 0
        finally:
            await new.close()
    finally:
        await c.close_all()


async def test_a_token_holder_resuming_its_session_over_and_over_holds_one_seat(wsd_factory):
    """A hostile token holder resumes its own session again and again, never answering the close of the
    connection each resume takes over: a taken-over connection gives its seat up at once, so the holder still
    counts one (per pool, against manager.max_connections and max_connections_per_user) while those closes
    time out, and other users still get in."""
    text = base(6).replace("max_connections_per_user = 1000", "max_connections_per_user = 2").replace(
        "drain_timeout_ms = 2000", "drain_timeout_ms = 8000")
    assert "max_connections_per_user = 2" in text and "drain_timeout_ms = 8000" in text
    w = wsd_factory(pools(frontend=(0, 6), mt5=(0, 6), api=(0, 6)), base=text)
    c = Clients(w)
    taken: list[ClientConnection] = []
    try:
        ws = await w.connect("frontend", make_token("mallory"))
        hello = await welcome(ws)
        for i in range(8):
            ws.transport.pause_reading()  # it never reads the 4011 close: the server waits for its answer
            taken.append(ws)
            ws = await w.connect(("frontend", "api")[i % 2], make_token("mallory"),
                                 query={"session": hello["session_id"]})
            hello = await welcome(ws)
        taken.append(ws)
        cap = (await w.ctl("pools.list"))["capacity"]
        assert cap["shared_free"] == 5, cap  # mallory holds one seat, not nine
        second = await w.connect("api", make_token("mallory"))  # max_connections_per_user = 2: one is left
        taken.append(second)
        await welcome(second)
        for _ in range(4):
            await c.add("mt5")  # the other users' four seats are all there
        status, body = await c.try_add("mt5")
        assert status == 503, body
    finally:
        for t in taken:
            t.transport.abort()
        await c.close_all()


async def test_counts_return_to_zero_after_churn_takeovers_kicks_and_aborted_sockets(wsd_factory):
    """480 handshakes in bursts of 40 over three pools: new sessions, resumes of live ones into any pool
    (takeovers that move seats), clean closes, aborted sockets and kicks. The shared capacity never goes below
    0 or above what is free, and once every client is gone the pools count 0 and all of it is free again."""
    w = wsd_factory(pools(frontend=(2, 30), mt5=(3, 30), api=(0, 30)), base=base(40))
    rnd = random.Random(7)
    live: list = []
    hellos: dict[int, dict] = {}
    stats = {"ok": 0, "refused": 0, "closed": 0}

    async def one(i: int) -> None:
        pool = rnd.choice(["frontend", "mt5", "api"])
        query = {}
        user = f"u{i % 25}"
        if live and rnd.random() < 0.4:
            old = rnd.choice(live)
            h = hellos.get(id(old))
            if h:
                user, query = h["user_id"], {"session": h["session_id"]}
        try:
            ws = await w.connect(pool, make_token(user, "acme"), query=query)
        except (InvalidStatus, OSError, asyncio.TimeoutError):
            stats["refused"] += 1
            return
        try:
            hellos[id(ws)] = await welcome(ws)
        except (ConnectionClosed, asyncio.TimeoutError):
            stats["closed"] += 1
            return
        stats["ok"] += 1
        live.append(ws)
        r = rnd.random()
        if r < 0.2:
            ws.transport.abort()
            live.remove(ws)
        elif r < 0.4:
            await ws.close()
            live.remove(ws)

    for rnd_i in range(12):
        await asyncio.gather(*(one(rnd_i * 40 + k) for k in range(40)))
        c = await counts(w)
        cap = (await w.ctl("pools.list"))["capacity"]
        assert 0 <= cap["shared_free"] <= 35 and all(0 <= v <= 30 for v in c.values()), (c, cap)
        if rnd_i % 3 == 2:
            await w.ctl("kick", user=f"u{rnd_i}")
    assert stats["ok"] >= 100 and stats["refused"] >= 1, stats  # the limits were reached, and churned
    for ws in live:
        with contextlib.suppress(Exception):
            await ws.close()

    async def zero() -> bool:
        c = await counts(w)
        cap = (await w.ctl("pools.list"))["capacity"]
        return all(v == 0 for v in c.values()) and cap["shared_free"] == 35
    await wait_for(zero, timeout=20)
