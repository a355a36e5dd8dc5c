"""The daemon's process lifecycle through real signals and sockets: SIGTERM drains (1001 to every client,
readyz and new handshakes 503 while draining, exit 0 in bounded time), SIGHUP reloads (a broken file is
refused and the old config keeps serving), and a reconnect storm of 500 clients is admitted."""

from __future__ import annotations

import asyncio
import json
import signal
import time

from tests.harness import BASE_CONFIG, closed_with, http_get, make_token, wait_for, welcome
from tests.rawws import OP_CLOSE, RawWs, close_code


async def _exit_code(w, timeout: float) -> int:
    """Wait (without blocking the loop) for the daemon process to exit; its return code."""
    deadline = time.monotonic() + timeout
    while w.proc.poll() is None:
        assert time.monotonic() < deadline, f"wsd still running after {timeout}s"
        await asyncio.sleep(0.02)
    return int(w.proc.returncode)


async def test_sigterm_closes_every_client_1001_and_exits_0(wsd_factory):
    """SIGTERM with three clients connected: each sees 1001, the process exits 0 within the drain time."""
    w = wsd_factory()  # drain_timeout_ms = 2000
    clients = [await w.connect(pool, make_token(f"u{i}")).__aenter__() for i, pool in
               enumerate(("frontend", "mt5", "api"))]
    try:
        for ws in clients:
            await welcome(ws)
        started = time.monotonic()
        w.signal(signal.SIGTERM)
        results = await asyncio.gather(*(closed_with(ws, timeout=5) for ws in clients))
        assert [code for code, _ in results] == [1001, 1001, 1001]
        assert await _exit_code(w, 2.0 + 3.0) == 0
        assert time.monotonic() - started < 5.0
    finally:
        for ws in clients:
            await ws.close()


async def test_draining_refuses_new_handshakes_503_and_readyz_503(wsd_factory):
    """While a stuck client holds the drain open, readyz and handshakes get 503; exit 0 after the bound."""
    w = wsd_factory()  # drain_timeout_ms = 2000
    stuck = await RawWs.open(w.port, f"/ws/api?token={make_token('stuck')}")
    try:
        assert stuck.status == 101 and (await stuck.read_json())["type"] == "welcome"
        started = time.monotonic()
        w.signal(signal.SIGTERM)
        op, payload = await stuck.read_frame(timeout=3)  # the close frame, never answered
        assert op == OP_CLOSE and close_code(payload) == 1001

        status, body = await asyncio.to_thread(http_get, w.port, "/readyz")
        assert status == 503 and json.loads(body)["status"] == "draining"
        refused = await RawWs.open(w.port, f"/ws/frontend?token={make_token('late')}")
        refused.close()
        assert refused.status == 503 and json.loads(refused.body)["error"] == "draining"

        assert await _exit_code(w, 2.0 + 3.0) == 0
        assert time.monotonic() - started < 5.0
    finally:
        stuck.close()


async def test_sighup_with_broken_file_keeps_old_config(wsd_factory):
    """SIGHUP with an invalid file: an error is logged, the daemon keeps serving on the old config."""
    w = wsd_factory()
    w.config_path.write_text(BASE_CONFIG + "\n[manager]\nmax_connections = \"ten\"\n")
    w.signal(signal.SIGHUP)

    async def refused_logged() -> bool:
        return "reload refused" in w.log()

    await wait_for(refused_logged, timeout=5)
    assert w.proc.poll() is None
    async with w.connect("frontend", make_token()) as ws:
        assert (await welcome(ws))["pool"] == "frontend"
    events = (await w.ctl("events.recent", limit=20))["events"]
    assert any(e["event"] == "reload_failed" for e in events)


async def test_sighup_with_valid_changed_file_applies(wsd_factory):
    """SIGHUP with a valid file adding a pool: the new pool path accepts connections after reload."""
    w = wsd_factory()
    async with w.connect("frontend", make_token()) as ws:  # an open connection survives the reload
        await welcome(ws)
        w.config_path.write_text(BASE_CONFIG + """
[pools.frontend]
type = "frontend"
path = "/ws/frontend"

[pools.extra]
type = "api"
path = "/ws/extra"
""")
        w.signal(signal.SIGHUP)

        async def has_extra() -> bool:
            return any(p["id"] == "extra" for p in (await w.ctl("pools.list"))["pools"])

        await wait_for(has_extra, timeout=5)
        async with w.connect("extra", make_token("new")) as ws2:
            assert (await welcome(ws2))["pool"] == "extra"
        assert ws.close_code is None


async def test_reconnect_storm_of_500_clients(wsd_factory):
    """500 clients connecting at once all receive their welcome."""
    w = wsd_factory()
    tokens = [make_token(f"storm{i}", "acme") for i in range(500)]
    started = time.monotonic()

    async def one(token: str) -> str:
        async with w.connect("api", token) as ws:
            return (await welcome(ws))["user_id"]

    users = await asyncio.gather(*(one(t) for t in tokens))
    assert sorted(users) == sorted(f"storm{i}" for i in range(500))
    assert time.monotonic() - started < 15
