"""README.md's tour, as a new user runs it: the example config passes `wsd config check`, a daemon on it
takes the page's origin, `examples/python/follow.py` (as written, TOKEN from `wsctl token`) receives what
`wsctl publish` sends and publishes to the page's pool, the README's `wsctl` lines run as written, a restart
prints a GAP, a kick stops the script. The browser side of the tour is tests/test_browser.py."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.harness import SECRET, Wsd, recv_until, request, welcome

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE_CONFIG = ROOT / "examples" / "browser" / "wsd.toml"
FOLLOW = ROOT / "examples" / "python" / "follow.py"
PAGE_ORIGIN = "http://127.0.0.1:8000"  # where the tour's `python -m http.server 8000 --bind 127.0.0.1` serves


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def readme_wsctl_lines() -> list[list[str]]:
    """Every `wsctl ...` command line of the README's sh blocks, as argv (comments stripped)."""
    lines = []
    for block in sh_blocks(README.read_text()):
        for line in block.splitlines():
            if line.startswith("wsctl "):
                lines.append(shlex.split(line, comments=True))
    return lines


def env_for(w: Wsd) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), WSD_SOCKET=w.socket)


def wsctl(w: Wsd, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "wsctl", *args], capture_output=True, text=True, timeout=30,
                          env=env_for(w))
    assert proc.returncode == 0, f"wsctl {shlex.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


class Follow:
    """`TOKEN=$(wsctl token --user bob ...) python examples/python/follow.py ...`, a child process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.err: list[str] = []

    @classmethod
    async def start(cls, w: Wsd, *args: str, user: str = "bob", company: str = "acme") -> Follow:
        token = wsctl(w, "token", "--user", user, "--company", company).strip()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(FOLLOW), "--url", f"ws://127.0.0.1:{w.port}/ws/api", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env=dict(env_for(w), TOKEN=token))
        return cls(proc)

    async def line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert raw, f"follow.py ended without printing; stderr:\n{await self.stderr()}"
        return raw.decode().rstrip("\n")

    async def err_until(self, needle: str, timeout: float = 30.0) -> None:
        assert self.proc.stderr is not None
        while not any(needle in e for e in self.err):
            raw = await asyncio.wait_for(self.proc.stderr.readline(), timeout)
            assert raw, f"follow.py ended before {needle!r}; stderr so far:\n{''.join(self.err)}"
            self.err.append(raw.decode())

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), 10)
        return "".join(self.err) + rest.decode()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 10)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Wsd]:
    """`WSD_AUTH_SECRET=... wsd serve -c examples/browser/wsd.toml` (on a free port and its own socket)."""
    w = Wsd(tmp_path, EXAMPLE_CONFIG.read_text(), env={"WSD_AUTH_SECRET": SECRET}).start()
    yield w
    assert w.stop() == 0


def test_readme_starts_with_the_two_quick_start_commands() -> None:
    """The first code block is exactly the two quick start commands."""
    first = sh_blocks(README.read_text())[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["pip install -e . && wsd serve", "pip install -e '.[test]' && python -m pytest"]


def test_example_config_passes_config_check_with_the_secret_exported() -> None:
    """`wsd config check examples/browser/wsd.toml` after the tour's export: ok. Without it: one line naming
    auth.secret (why the tour exports WSD_AUTH_SECRET)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    base["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "wsd", "config", "check", "examples/browser/wsd.toml"]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30,
                        env=dict(base, WSD_AUTH_SECRET=SECRET))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == "ok: examples/browser/wsd.toml"
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30, env=base)
    assert bad.returncode != 0
    assert "auth.secret" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_tour_commands_are_the_tested_ones() -> None:
    """The tour's lines this file runs are the README's, so an edit of one is an edit of the other."""
    text = README.read_text()
    follow = "TOKEN=$(wsctl token --user bob --company acme) python examples/python/follow.py --publish "
    assert follow in text
    assert "wsd serve -c examples/browser/wsd.toml" in text
    assert "python -m http.server 8000 --bind 127.0.0.1" in text
    assert f'"{PAGE_ORIGIN}"' in EXAMPLE_CONFIG.read_text()
    assert {argv[1] for argv in readme_wsctl_lines()} >= {"publish", "connections", "rules", "top"}


@pytest.mark.timeout(180)  # ten wsctl processes on a loaded 2-core machine
async def test_follow_receives_wsctl_publish_and_its_publish_reaches_the_page(daemon: Wsd) -> None:
    """The tour: EURUSD published with wsctl before, follow.py prints it from history, publishes GBPUSD,
    which a frontend client with the page's Origin gets too; the README's wsctl lines run as written; another
    company sees nothing."""
    w = daemon
    wsctl(w, "publish", "trading-signals/acme", "--type", "trading_signal",
          "--data", '{"symbol":"EURUSD","side":"buy"}')
    page_token = wsctl(w, "token", "--user", "alice", "--company", "acme").strip()
    other_token = wsctl(w, "token", "--user", "eve", "--company", "globex").strip()
    origin = {"Origin": PAGE_ORIGIN}
    async with connect(w.url("frontend", page_token), additional_headers=origin, open_timeout=5) as page, \
            connect(w.url("frontend", other_token), additional_headers=origin, open_timeout=5) as other:
        await welcome(page)
        await welcome(other)
        for ws in (page, other):
            assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        follow = await Follow.start(w, "--publish", '{"symbol":"GBPUSD","side":"sell"}')
        try:
            first = await follow.line()
            assert first.startswith("trading-signals/acme #1 [trading_signal] (history)"), first
            assert '"EURUSD"' in first
            second = await follow.line()
            assert second.startswith("trading-signals/acme #2 [trading_signal] "), second
            assert '"GBPUSD"' in second, second
            got = await recv_until(page, lambda f: f.get("type") in ("message", "batch"), timeout=10)
            data = [m["data"] for m in got["messages"]] if got["type"] == "batch" else [got["data"]]
            assert data == [{"symbol": "GBPUSD", "side": "sell"}]
            await follow.err_until("-- published trading-signals/acme #2")

            # The README's wsctl lines (not the interactive `top`; tokens are minted above), as written.
            ran = []
            for argv in readme_wsctl_lines():
                if argv[1] in ("top", "token"):
                    continue
                out = wsctl(w, *argv[1:])
                ran.append(argv[1])
                if argv[1] == "connections":
                    assert "bob" in out and "alice" in out and "api" in out and "frontend" in out, out
            assert "connections" in ran and "rules" in ran and ran.count("publish") >= 2
            # What the README's publishes sent reaches the script, in order, after GBPUSD.
            third = await follow.line()
            assert third.startswith("trading-signals/acme #3 "), third
        finally:
            await follow.stop()
        # Another company's instance is another channel: eve saw none of acme's messages.
        with pytest.raises(TimeoutError):
            await recv_until(other, lambda f: f.get("type") in ("message", "batch"), timeout=0.5)


@pytest.mark.timeout(180)  # two daemon starts and the client's reconnect backoff
async def test_follow_prints_a_gap_across_a_restart_then_goes_on(tmp_path: Path) -> None:
    """Stop wsd and start it again on the same port and secret (the tour's restart): follow.py reconnects,
    prints a GAP line (the memory engine lost the history), then prints what is published afterwards."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"WSD_AUTH_SECRET": SECRET}
    a = Wsd(tmp_path / "a", EXAMPLE_CONFIG.read_text(), env=env).start()
    b: Wsd | None = None
    follow: Follow | None = None
    try:
        wsctl(a, "publish", "trading-signals/acme", "--type", "trading_signal", "--data", '{"n":1}')
        follow = await Follow.start(a)
        assert '{"n": 1}' in await follow.line()
        assert a.stop() == 0
        await follow.err_until("-- connecting")
        b = Wsd(tmp_path / "b", EXAMPLE_CONFIG.read_text(), env=env, port=a.port).start()
        gap = await follow.line(timeout=60)  # the client's backoff, at most 30 s
        assert gap.startswith("GAP in trading-signals/acme between #1 and "), gap
        wsctl(b, "publish", "trading-signals/acme", "--type", "trading_signal", "--data", '{"n":2}')
        after = await follow.line()
        assert after.startswith("trading-signals/acme #1 ") and '{"n": 2}' in after, after
    finally:
        if follow is not None:
            await follow.stop()
        a.stop()
        if b is not None:
            assert b.stop() == 0


async def test_follow_stops_when_kicked(daemon: Wsd) -> None:
    """`wsctl kick --user bob` stops the script: one line naming Kicked, exit status 1, no reconnect."""
    follow = await Follow.start(daemon)
    try:
        await follow.err_until("-- subscribed to trading-signals/acme as bob")
        assert "closed 1 connection" in wsctl(daemon, "kick", "--user", "bob")
        assert await asyncio.wait_for(follow.proc.wait(), 30) == 1
        err = await follow.stderr()
        assert "follow.py: Kicked: " in err and "Traceback" not in err, err
        assert "no connections" in wsctl(daemon, "connections")
    finally:
        await follow.stop()


@pytest.mark.parametrize("env, args, message", [
    ({}, [], "no token: run it as TOKEN=$(wsctl token"),
    ({"TOKEN": "x"}, ["--publish", "{not json"], "--publish is not JSON"),
])
def test_follow_refuses_bad_input_with_one_line(env: dict[str, str], args: list[str], message: str) -> None:
    """No $TOKEN, or --publish that is not JSON: usage error (exit 2), one line, no traceback."""
    base = {k: v for k, v in os.environ.items() if k != "TOKEN"}
    proc = subprocess.run([sys.executable, str(FOLLOW), "--url", "ws://127.0.0.1:9/ws/api", *args],
                          capture_output=True, text=True, timeout=30,
                          env=dict(base, PYTHONPATH=str(ROOT), **env))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


async def test_follow_with_a_refused_token_says_so(daemon: Wsd) -> None:
    """A token the daemon did not sign: NotAdmitted (401), one line, exit 1 — not a reconnect loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FOLLOW), "--url", f"ws://127.0.0.1:{daemon.port}/ws/api",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TOKEN="not.a.token"))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    text = err.decode()
    assert "follow.py: NotAdmitted: " in text and "401" in text and "Traceback" not in text, text
    assert "not.a.token" not in daemon.log()
