"""wsctl end to end: the real `python -m wsctl` binary against a real `wsd serve`, in both output modes.

Effects are checked on real WebSocket clients (kick codes, narrowed broadcasts, sends, publishes);
the control socket's security (file modes, peer uid) and the exit codes 0/1/2/3 are checked too.
Non-delivery is proven with a marker: a later message to the same client must arrive first.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Wsd, closed_with, make_token, recv_until, request, welcome
from wsctl import render
from wsctl.tui import render as tui_render
from wsctl.cli import hoist_globals, parse_duration
from wsctl.client import Client, RequestFailed, discover_socket
from wsd.runtime.control import peer_allowed

WSCTL = [sys.executable, "-m", "wsctl"]
ROOT = Path(__file__).resolve().parents[1]

RULE_TOML = """
[[routing.rules]]
id = "r1"
priority = 10
filter = { message_types = ["x"] }
target = { type = "broadcast" }
"""


class Result:
    def __init__(self, args: list[str], rc: int, out: str, err: str) -> None:
        self.args, self.rc, self.out, self.err = args, rc, out, err

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"wsctl {' '.join(self.args)} -> {self.rc}\nstdout: {self.out}\nstderr: {self.err}"


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    env.update(extra or {})
    return env


def wsctl(w: Wsd | None, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    """Run the real wsctl (synchronously) against ``w``'s socket."""
    sock = ["--socket", w.socket] if w is not None else []
    p = subprocess.run(
        [*WSCTL, *sock, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=env_for(env),
        cwd=ROOT,
    )
    return Result(list(args), p.returncode, p.stdout, p.stderr)


async def awsctl(
    w: Wsd | None, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> Result:
    """Run the real wsctl without blocking the event loop (clients keep reading meanwhile)."""
    sock = ["--socket", w.socket] if w is not None else []
    proc = await asyncio.create_subprocess_exec(
        *WSCTL,
        *sock,
        *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(env),
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), 30)
    assert proc.returncode is not None
    return Result(list(args), proc.returncode, out.decode(), err.decode())


def ok(r: Result) -> Result:
    assert r.rc == 0, r
    return r


def fits_80(r: Result) -> None:
    long = [line for line in r.out.splitlines() if len(line) > 80]
    assert not long, f"lines wider than 80 columns in {r}"


async def client(
    w: Wsd, user: str, company: str, pool: str = "frontend", subscribe: str | None = None
) -> Any:
    token = make_token(user, company)
    ws = await w.connect(pool, token)
    hello = await welcome(ws)
    ws.token = token
    if subscribe:
        reply = await request(ws, {"op": "subscribe", "id": 1, "channel": subscribe})
        assert reply["ok"], reply
    ws.cid = hello["connection_id"]
    return ws


async def next_message(ws: Any, within: float = 5.0) -> dict[str, Any]:
    """The next pushed message, whether it came alone or inside a batch frame."""
    pending = ws.__dict__.setdefault("pending", [])
    if not pending:
        msg = await recv_until(ws, lambda m: m.get("type") in ("message", "batch"), within)
        pending.extend(msg["messages"] if msg["type"] == "batch" else [msg])
    return pending.pop(0)


# ------------------------------------------------------------------------------------------- pure parts


def test_units_are_human():
    """Rates, sizes and durations read like 1.2k msg/s, 34.0 MiB and 3m12s, the same in every view."""
    assert render.fmt_rate(1234.5) == "1.2k msg/s"
    assert render.fmt_bytes(34 * 2**20) == "34.0 MiB"
    assert render.fmt_bytes(54 * 2**20) == tui_render.size(54 * 2**20) == "54.0 MiB"
    assert render.fmt_duration(192) == tui_render.duration(192)
    assert render.fmt_count(123456) == tui_render.count(123456) == "123k"
    assert render.fmt_bytes(1536) == "1.5 KiB"
    assert render.fmt_duration(192) == "3m12s"
    assert render.fmt_duration(7500) == "2h05m"
    assert render.fmt_count(10000) == "10k"
    assert render.short_id("d272b4adb7d2087a") == "d272b4ad"


def test_durations_parse():
    """--ttl accepts 30s, 15m, 1h, 2d, compounds and plain seconds; nonsense is refused."""
    assert parse_duration("30s") == 30
    assert parse_duration("15m") == 900
    assert parse_duration("1h") == 3600
    assert parse_duration("2d") == 172800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    for bad in ("", "abc", "1x", "0s", "5m3"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_global_options_may_follow_the_command():
    """`wsctl status --json --socket S` is read as `wsctl --json --socket S status`."""
    assert hoist_globals(["status", "--json", "--socket", "/s"]) == ["--json", "--socket", "/s", "status"]
    assert hoist_globals(["--socket", "/s", "kick", "ab", "--reason", "x"]) == [
        "--socket",
        "/s",
        "kick",
        "ab",
        "--reason",
        "x",
    ]
    assert hoist_globals(["publish", "c", "--", "--json"]) == ["publish", "c", "--", "--json"]


def test_socket_discovery_order(tmp_path):
    """--socket, then $WSD_SOCKET, then config control.socket, then the runtime dir, then /tmp/wsd-$UID."""
    cfg = tmp_path / "wsd.toml"
    cfg.write_text('[control]\nsocket = "run/ctl.sock"\n')
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    env = {"WSD_SOCKET": "/e.sock", "XDG_RUNTIME_DIR": str(xdg)}
    assert discover_socket("/x.sock", str(cfg), env).path == "/x.sock"
    assert discover_socket(None, str(cfg), env).path == "/e.sock"
    env.pop("WSD_SOCKET")
    assert discover_socket(None, str(cfg), env).path == str(tmp_path / "run" / "ctl.sock")
    assert discover_socket(None, None, dict(env, WSD_CONFIG=str(cfg))).path == str(
        tmp_path / "run" / "ctl.sock"
    )
    (xdg / "wsd").mkdir()
    (xdg / "wsd" / "wsd.sock").touch()  # found first, whatever this machine has in /tmp/wsd-$UID
    assert discover_socket(None, None, env).path == str(xdg / "wsd" / "wsd.sock")
    assert discover_socket(None, None, {}).path == f"/tmp/wsd-{os.getuid()}/wsd.sock"


def test_peer_uid_check():
    """Only the daemon's own uid and root may use the control socket."""
    assert peer_allowed(1000, 1000)
    assert peer_allowed(0, 1000)
    assert not peer_allowed(1001, 1000)
    assert not peer_allowed(65534, 0)
    assert not peer_allowed(None, 1000)


def test_importing_cli_does_not_import_textual_or_the_daemon():
    """`import wsctl.cli` loads no textual and no daemon module besides wsd.control.protocol."""
    code = (
        "import sys, wsctl.cli; assert 'textual' not in sys.modules, 'textual imported';"
        "ok = ('wsd.control', 'wsd.control.protocol');"
        "bad = [m for m in sys.modules if m.startswith('wsd.') and m not in ok];"
        "assert not bad, bad"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------------------- exit codes


def test_daemon_down_is_exit_3_with_the_message(tmp_path):
    """No daemon at the socket: exit 3 and `wsctl: cannot reach wsd at PATH: is it running? (wsd serve)`."""
    missing = str(tmp_path / "nothing.sock")
    r = wsctl(None, "--socket", missing, "status")
    assert r.rc == 3, r
    assert r.err == f"wsctl: cannot reach wsd at {missing}: is it running? (wsd serve)\n"
    assert r.out == ""
    # a stale socket file left by a crashed daemon: same answer
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    r = wsctl(None, "--socket", stale, "--json", "pools")
    assert r.rc == 3, r
    err = json.loads(r.err)["error"]
    assert err["code"] == "unreachable" and err["socket"] == stale and err["exit_code"] == 3
    assert err["message"] == f"cannot reach wsd at {stale}: is it running? (wsd serve)"
    # the dashboard checks before starting a full-screen app
    assert wsctl(None, "--socket", missing, "top").rc == 3


def test_usage_errors_are_exit_2(tmp_path):
    """Unknown commands, missing options and bad values are exit 2 with one line (JSON with --json)."""
    sock = str(tmp_path / "none.sock")
    r = wsctl(None, "--socket", sock, "frobnicate")
    assert r.rc == 2 and r.err.startswith("wsctl: error: No such command 'frobnicate'"), r
    r = wsctl(None, "--socket", sock, "publish", "system-status")
    assert r.rc == 2 and "--data" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert r.err.startswith("wsctl: error: --data: required"), r  # says what is wrong, not an empty reason
    r = wsctl(None, "--socket", sock, "publish", "--data", "1")
    assert r.rc == 2 and r.err.startswith("wsctl: error: CHANNEL: required"), r
    r = wsctl(None, "--socket", sock, "token", "--user", "a", "--ttl", "soon")
    assert r.rc == 2 and "--ttl" in r.err and "not a duration" in r.err, r
    r = wsctl(None, "--socket", sock, "--json", "kick")
    assert r.rc == 2 and json.loads(r.err)["error"]["exit_code"] == 2, r
    r = wsctl(None, "--socket", sock, "top", "--json")
    assert r.rc == 2 and "interactive" in json.loads(r.err)["error"]["message"], r
    r = wsctl(None, "--socket", sock, "connections", "--sort", "size")
    assert r.rc == 2 and r.err.startswith("wsctl: error: --sort: one of age, id"), r
    r = wsctl(None, "--version")
    assert r.rc == 0 and r.out.startswith("wsctl ") and "control protocol 1" in r.out, r


def test_every_command_has_help_with_an_example():
    """Each command's --help works without a daemon and shows an example (in-process: 20+ commands)."""
    import typer.main
    from typer.testing import CliRunner

    from wsctl.cli import app

    root = typer.main.get_command(app)
    paths: list[list[str]] = []
    for name, cmd in root.commands.items():
        paths.append([name])
        for sub in getattr(cmd, "commands", {}):
            paths.append([name, sub])
    assert ["top"] in paths and ["monitor"] in paths and ["rules", "disable"] in paths
    runner = CliRunner()
    for path in paths:
        res = runner.invoke(
            app, [*path, "--help"], prog_name="wsctl", env={"COLUMNS": "80"}, terminal_width=80
        )
        assert res.exit_code == 0, (path, res.output)
        example = res.output.partition("Example")[2]
        assert "$ " in example and f"wsctl {' '.join(path)}" in example, (path, res.output)
    # and the real binary's top-level help, which a new user reads first
    r = wsctl(None, "--help")
    assert r.rc == 0 and "Commands" in r.out and "connections" in r.out and "Exit status" in r.out


# ----------------------------------------------------------------------------------- views, both modes


async def test_views_in_both_output_modes(wsd):
    """Every view answers as a human table (<= 80 columns) and as JSON matching the daemon's state."""
    a = await client(wsd, "alice", "acme", "frontend", subscribe="trading-signals")
    b = await client(
        wsd,
        "bob-with-a-rather-long-name",
        "globex-corporation-international",
        "mt5",
        subscribe="trading-signals",
    )
    ok(await awsctl(wsd, "publish", "trading-signals/acme", "--type", "tick", "--data", '{"px": 1}'))
    await next_message(a)
    views = [
        ["status"],
        ["pools"],
        ["connections"],
        ["connections", "--pool", "mt5"],
        ["connection", a.cid[:8]],
        ["channels"],
        ["subscriptions"],
        ["subscriptions", "--connection", b.cid],
        ["subscriptions", "--channel", "trading-signals/acme"],
        ["history", "trading-signals/acme"],
        ["metrics"],
        ["metrics", "--prometheus"],
        ["rules"],
        ["rules", "list"],
        ["config"],
        ["events"],
    ]
    human = await asyncio.gather(*(awsctl(wsd, *v) for v in views))
    machine = await asyncio.gather(*(awsctl(wsd, "--json", *v) for v in views))
    H = {" ".join(v): ok(r) for v, r in zip(views, human, strict=True)}
    J = {" ".join(v): ok(r) for v, r in zip(views, machine, strict=True)}
    for key, r in H.items():
        if key not in ("config", "metrics --prometheus", "events"):
            fits_80(r)
    for key, r in J.items():
        if key != "events":
            r.json()  # every --json output parses
    # status
    assert "connections  2 / 10000" in H["status"].out and "frontend 1" in H["status"].out
    st = J["status"].json()
    assert st["connections"] == 2 and st["by_pool"]["mt5"] == 1 and st["socket"] == wsd.socket
    # pools
    assert "frontend" in H["pools"].out and "/ws/mt5" in H["pools"].out
    assert {p["id"]: p["connections"] for p in J["pools"].json()["pools"]}["mt5"] == 1
    # connections: ids shortened to 8, long names clipped with an ellipsis
    assert a.cid[:8] in H["connections"].out and a.cid not in H["connections"].out
    assert "…" in H["connections"].out and "2 connections" in H["connections"].out
    assert {c["id"] for c in J["connections"].json()["items"]} == {a.cid, b.cid}
    assert [c["user_id"] for c in J["connections --pool mt5"].json()["items"]] == [
        "bob-with-a-rather-long-name"
    ]
    # one connection, by prefix, with claims but never the token
    one = J[f"connection {a.cid[:8]}"].json()
    assert one["id"] == a.cid and one["auth"]["user_id"] == "alice"
    assert a.token not in J[f"connection {a.cid[:8]}"].out + H[f"connection {a.cid[:8]}"].out
    assert (
        "trading-signals/acme" in H[f"connection {a.cid[:8]}"].out
        and "auth claims" in H[f"connection {a.cid[:8]}"].out
    )
    # channels and subscriptions
    assert "trading-signals/acme" in H["channels"].out
    inst = {i["channel"]: i for i in J["channels"].json()["instances"]}
    assert inst["trading-signals/acme"]["subscribers"] == 1
    assert (
        J["subscriptions"].json()["total"] == 3
    )  # alice: system-status + trading-signals; bob: trading-signals
    assert [s["channel"] for s in J[f"subscriptions --connection {b.cid}"].json()["items"]] == [
        "trading-signals/globex-corporation-international"
    ]
    assert [
        s["connection_id"] for s in J["subscriptions --channel trading-signals/acme"].json()["items"]
    ] == [a.cid]
    # history
    hist = J["history trading-signals/acme"].json()
    assert [m["data"] for m in hist["messages"]] == [{"px": 1}]
    assert '{"px":1}' in H["history trading-signals/acme"].out
    # metrics
    assert J["metrics"].json()["manager"]["connections"] == 2 and "manager" in H["metrics"].out
    assert "wsd_connections" in H["metrics --prometheus"].out
    assert "wsd_connections" in J["metrics --prometheus"].json()["text"]
    # rules (none configured), config
    assert "no routing rules" in H["rules"].out and J["rules"].json()["rules"] == []
    assert "[manager]" in H["config"].out and "***redacted***" in H["config"].out
    assert "test-secret" not in H["config"].out + J["config"].out
    assert J["config"].json()["config"]["server"]["host"] == "127.0.0.1"
    # events: one line each; JSON lines with --json
    assert any(" connect " in line and a.cid in line for line in H["events"].out.splitlines())
    evs = [json.loads(line) for line in J["events"].out.splitlines()]
    assert any(e["event"] == "connect" and e.get("connection_id") == b.cid for e in evs)
    await a.close()
    await b.close()


async def test_status_json_matches_the_control_method(wsd):
    """`wsctl --json status` prints the control method's result, and `status --json` means the same."""
    r1 = ok(await awsctl(wsd, "--json", "status"))
    r2 = ok(await awsctl(wsd, "status", "--json"))
    direct = await wsd.ctl("status")
    for r in (r1.json(), r2.json()):
        assert r["manager_id"] == direct["manager_id"] and r["listen"] == direct["listen"]


# ----------------------------------------------------------------------------------------- actions


async def test_publish_reaches_a_subscriber(wsd, tmp_path):
    """publish with --type/--priority/--ttl, from inline JSON, stdin and @file, reaches the subscriber."""
    a = await client(wsd, "alice", "acme", "api", subscribe="trading-signals")
    r = ok(
        await awsctl(
            wsd,
            "publish",
            "trading-signals/acme",
            "--type",
            "trading_signal",
            "--priority",
            "high",
            "--ttl",
            "30s",
            "--data",
            '{"px": 1.5}',
        )
    )
    assert "delivered to 1 connection" in r.out
    m = await next_message(a)
    assert (m["data"], m["msg_type"], m["priority"], m["channel"]) == (
        {"px": 1.5},
        "trading_signal",
        "high",
        "trading-signals/acme",
    )
    r = ok(await awsctl(wsd, "--json", "publish", "trading-signals/acme", "--data", "-", stdin='{"px": 2}'))
    assert r.json()["delivered"] == 1 and r.json()["offset"] == m["offset"] + 1
    assert (await next_message(a))["data"] == {"px": 2}
    f = tmp_path / "msg.json"
    f.write_text("[1, 2, 3]")
    ok(await awsctl(wsd, "publish", "trading-signals/acme", "--data", f"@{f}"))
    assert (await next_message(a))["data"] == [1, 2, 3]
    # bad input never reaches the daemon
    r = await awsctl(wsd, "publish", "trading-signals/acme", "--data", "{nope")
    assert r.rc == 2 and r.err.startswith("wsctl: error: --data: invalid JSON") and r.err.count("\n") == 1, r
    r = await awsctl(wsd, "--json", "publish", "trading-signals/acme", "--data", f"@{tmp_path}/missing.json")
    assert r.rc == 2 and "cannot read" in json.loads(r.err)["error"]["message"], r
    # the daemon's refusal is exit 1 with its reason
    r = await awsctl(wsd, "publish", "trading-signals", "--data", "1")
    assert r.rc == 1 and r.err.startswith(
        "wsctl: error: a company channel is named trading-signals/<company_id>"
    ), r
    await a.close()


async def test_broadcast_narrowed_by_pool_reaches_only_that_pool(wsd):
    """`broadcast --pool mt5` reaches the mt5 client only; `--company` narrows by tenant."""
    fe = await client(wsd, "alice", "acme", "frontend")
    mt = await client(wsd, "bob", "acme", "mt5")
    api = await client(wsd, "carol", "globex", "api")
    r = ok(
        await awsctl(
            wsd,
            "broadcast",
            "--pool",
            "mt5",
            "--type",
            "alert",
            "--priority",
            "critical",
            "--data",
            '{"n": 1}',
        )
    )
    assert r.out.strip() == "broadcast delivered to 1 connection"
    r = ok(await awsctl(wsd, "--json", "broadcast", "--company", "acme", "--data", '{"n": 2}'))
    assert r.json()["delivered"] == 2
    ok(await awsctl(wsd, "broadcast", "--data", '{"n": 3}'))
    m = await next_message(mt)
    assert m["data"] == {"n": 1} and m["msg_type"] == "alert" and m["priority"] == "critical"
    assert (await next_message(mt))["data"] == {"n": 2}
    assert (await next_message(fe))["data"] == {"n": 2}  # the mt5-only broadcast never came
    assert (await next_message(api))["data"] == {"n": 3}  # neither did the acme-only one
    r = await awsctl(wsd, "broadcast", "--pool", "nosuch", "--data", "1")
    assert r.rc == 1 and "no pool 'nosuch'" in r.err, r
    for ws in (fe, mt, api):
        await ws.close()


async def test_send_reaches_one_connection(wsd):
    """`send ID` (a prefix works) reaches that connection and no other."""
    a = await client(wsd, "alice", "acme")
    b = await client(wsd, "alice", "acme")
    r = ok(
        await awsctl(wsd, "send", a.cid[:8], "--type", "notice", "--priority", "low", "--data", '{"hi": 1}')
    )
    assert r.out.strip() == f"sent to connection {a.cid}"
    r = ok(await awsctl(wsd, "--json", "send", b.cid, "--data", '"marker"'))
    assert r.json() == {"delivered": 1, "connection_id": b.cid, "node": "ws-manager-v1",
                        "nodes": ["ws-manager-v1"], "missing": []}
    m = await next_message(a)
    assert m["data"] == {"hi": 1} and m["msg_type"] == "notice"
    assert (await next_message(b))["data"] == "marker"
    r = await awsctl(wsd, "send", "ffffffffffff", "--data", "1")
    assert r.rc == 1 and r.err == "wsctl: error: no connection 'ffffffffffff'\n", r
    await a.close()
    await b.close()


async def test_kick_closes_with_4000_and_the_reason(wsd):
    """kick by id, by user and by pool: clients see close code 4000 and the reason; the count is printed."""
    a = await client(wsd, "alice", "acme")
    b1 = await client(wsd, "bob", "acme", "mt5")
    b2 = await client(wsd, "bob", "acme", "api")
    c = await client(wsd, "carol", "acme", "api")
    keep = await client(wsd, "dave", "acme", "frontend")
    r = ok(await awsctl(wsd, "kick", a.cid[:8], "--reason", "account suspended"))
    assert r.out.strip() == f"closed 1 connection: {a.cid[:8]}"
    assert await closed_with(a) == (4000, "account suspended")
    r = ok(await awsctl(wsd, "--json", "kick", "--user", "bob"))
    assert r.json()["closed"] == 2 and set(r.json()["ids"]) == {b1.cid, b2.cid}
    assert await closed_with(b1) == (4000, "kicked") and (await closed_with(b2))[0] == 4000
    r = ok(await awsctl(wsd, "kick", "--pool", "api", "--reason", "maintenance"))
    assert r.out.startswith("closed 1 connection")
    assert await closed_with(c) == (4000, "maintenance")
    assert (await request(keep, {"op": "ping", "id": 9}))["ok"]  # untouched
    r = await awsctl(wsd, "kick", "--user", "nobody")
    assert r.rc == 0 and r.out.strip() == "closed 0 connections", r
    r = await awsctl(wsd, "kick", "abc", "--user", "x")
    assert r.rc == 2 and "not both" in r.err, r
    r = await awsctl(wsd, "kick", "--reason", "x" * 200, "--pool", "api")
    assert r.rc == 2 and "--reason" in r.err, r
    await keep.close()


async def test_token_mints_a_usable_jwt(wsd):
    """`wsctl token` prints only a token that connects; --json shows the claims."""
    r = ok(
        await awsctl(
            wsd,
            "token",
            "--user",
            "erin",
            "--company",
            "acme",
            "--role",
            "trader",
            "--role",
            "ops",
            "--pool",
            "mt5",
            "--ttl",
            "10m",
        )
    )
    tok = r.out.strip()
    assert r.out == tok + "\n" and tok.count(".") == 2
    async with wsd.connect("mt5", tok) as ws:
        w = await welcome(ws)
        assert (w["user_id"], w["company_id"], w["pool"]) == ("erin", "acme", "mt5")
    r = ok(await awsctl(wsd, "--json", "token", "--user", "erin", "--ttl", "2d"))
    claims = r.json()
    assert claims["user"] == "erin" and claims["token"].count(".") == 2
    assert abs(claims["exp"] - (time.time() + 2 * 86400)) < 60
    r = await awsctl(wsd, "token", "--user", "erin", "--pool", "nosuch")
    assert r.rc == 1 and "no pool" in r.err, r


async def test_token_without_a_signing_key_is_a_clear_error(wsd_factory, tmp_path):
    """A daemon that only verifies (RS256 public key, no private key) refuses `wsctl token` plainly."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.harness import BASE_CONFIG, SECRET

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / "jwt.pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    base = BASE_CONFIG.replace(
        f'algorithms = ["HS256"]\nsecret = "{SECRET}"', f'algorithms = ["RS256"]\npublic_key_file = "{pub}"'
    )
    assert "RS256" in base
    w = wsd_factory(base=base)
    r = await awsctl(w, "token", "--user", "alice")
    assert r.rc == 1 and r.out == "", r
    assert r.err.startswith("wsctl: error: this wsd holds no signing key") and r.err.count("\n") == 1, r


async def test_events_follow_streams_a_connect(wsd):
    """`events --follow` prints a line for a new connection (and a JSON object per line with --json)."""

    def start(mode: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*WSCTL, "--socket", wsd.socket, *mode, "events", "--follow", "-n", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(),
            cwd=ROOT,
        )

    procs = [await asyncio.to_thread(start, mode) for mode in ([], ["--json"])]
    human, machine = Lines(procs[0]), Lines(procs[1])
    try:
        ws = await client(wsd, "frank", "acme")
        line = await asyncio.to_thread(human.until, lambda line: ws.cid in line and " connect " in line)
        assert "user_id=frank" in line
        line = await asyncio.to_thread(machine.until, lambda line: ws.cid in line)
        ev = json.loads(line)
        assert ev["event"] == "connect" and ev["connection_id"] == ws.cid and ev["pool"] == "frontend"
        await ws.close()
        line = await asyncio.to_thread(machine.until, lambda line: '"disconnect"' in line and ws.cid in line)
        assert json.loads(line)["code"] == 1000
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)
            p.stdout.close()
            p.stderr.close()


class Lines:
    """The stdout lines of a running process, read by a thread, taken with a bounded wait."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def until(self, pred: Any, timeout: float = 10.0) -> str:
        """The first line matching ``pred`` within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("no matching line") from None
            if line is None:
                raise EOFError(f"wsctl exited with {self.proc.wait(5)}")
            if pred(line):
                return line


# ------------------------------------------------------------------------------------- rules, reload


async def test_rules_enable_and_disable(wsd_factory):
    """A configured rule is listed with hits; disable stops it matching, enable restores it."""
    w = wsd_factory(RULE_TOML)
    a = await client(w, "alice", "acme", "api")  # subscribed to nothing: only the rule's broadcast reaches it
    H = ok(await awsctl(w, "rules"))
    assert "r1" in H.out and "types=x" in H.out and "broadcast" in H.out
    fits_80(H)
    ok(await awsctl(w, "publish", "system-status", "--type", "x", "--data", "1"))
    assert (await next_message(a))["data"] == 1
    r = ok(await awsctl(w, "rules", "disable", "r1"))
    assert r.out.startswith("rule r1 disabled")
    shown = ok(await awsctl(w, "--json", "rules", "show", "r1")).json()
    assert shown["enabled"] is False and shown["hits"] == 1
    ok(await awsctl(w, "publish", "system-status", "--type", "x", "--data", "2"))  # no rule: nobody here
    r = ok(await awsctl(w, "--json", "rules", "enable", "r1"))
    assert r.json()["enabled"] is True
    ok(await awsctl(w, "publish", "system-status", "--type", "x", "--data", "3"))
    assert (await next_message(a))["data"] == 3  # 2 never arrived
    listed = ok(await awsctl(w, "--json", "rules", "list")).json()
    assert [(x["id"], x["enabled"], x["hits"]) for x in listed["rules"]] == [("r1", True, 2)]
    assert "hits" in ok(await awsctl(w, "rules", "show", "r1")).out
    r = await awsctl(w, "rules", "enable", "nosuch")
    assert r.rc == 1 and "no rule 'nosuch'" in r.err, r
    await a.close()


async def test_reload_refuses_a_broken_file_and_keeps_running(wsd_factory):
    """An invalid config is refused (exit 1, each error printed); the daemon keeps the old config."""
    w = wsd_factory(RULE_TOML)
    good = w.config_path.read_text()
    w.config_path.write_text(
        good.replace("[server]", "[server]\nprot = 1").replace(
            "[manager]", '[manager]\nmax_connections = "ten"'
        )
    )
    r = await awsctl(w, "reload")
    assert r.rc == 1, r
    lines = r.err.splitlines()
    assert lines[0] == "wsctl: error: reload refused, the running config stays:"
    assert any("server.prot: unknown key" in x for x in lines[1:]), r
    assert any("manager.max_connections" in x for x in lines[1:]), r
    r = await awsctl(w, "--json", "reload")
    err = json.loads(r.err)["error"]
    assert r.rc == 1 and err["code"] == "failed" and any("server.prot" in d for d in err["details"])
    assert w.proc.poll() is None
    st = ok(await awsctl(w, "--json", "status")).json()
    assert st["reloads"] == 0 and st["max_connections"] == 10000
    # a valid change is applied
    w.config_path.write_text(good.replace("[manager]", "[manager]\nmax_connections = 7777"))
    r = ok(await awsctl(w, "reload"))
    assert r.out.startswith("reloaded")
    r = ok(await awsctl(w, "--json", "reload"))
    assert r.json()["ok"] is True
    assert ok(await awsctl(w, "--json", "status")).json()["max_connections"] == 7777
    assert "max_connections = 7777" in ok(await awsctl(w, "config")).out


# ---------------------------------------------------------------------------------------- the socket


def test_socket_is_0600_in_a_0700_directory(wsd):
    """The control socket is mode 0600 and its directory 0700."""
    st = os.stat(wsd.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(wsd.socket)).st_mode) == 0o700


def test_socket_found_through_env_and_config(wsd, tmp_path):
    """Without --socket, wsctl finds the daemon via $WSD_SOCKET, -c FILE and $WSD_CONFIG."""
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(f'[control]\nsocket = "{wsd.socket}"\n')
    assert ok(wsctl(None, "--json", "status", env={"WSD_SOCKET": wsd.socket})).json()["socket"] == wsd.socket
    assert ok(wsctl(None, "-c", str(cfg), "--json", "status")).json()["socket"] == wsd.socket
    assert ok(wsctl(None, "--json", "pools", env={"WSD_CONFIG": str(cfg)})).json()["pools"]
    # --socket wins over $WSD_SOCKET
    r = wsctl(None, "--socket", wsd.socket, "status", env={"WSD_SOCKET": str(tmp_path / "nope.sock")})
    assert r.rc == 0, r
    r = wsctl(None, "status", env={"WSD_SOCKET": str(tmp_path / "nope.sock")})
    assert r.rc == 3 and str(tmp_path / "nope.sock") in r.err


@pytest.mark.skipif(os.geteuid() != 0 or not hasattr(os, "fork"), reason="needs root to become another user")
def test_another_uid_is_refused(wsd):
    """A process running as uid 65534 is refused with `forbidden`, even when file modes would let it in."""
    d = os.path.dirname(wsd.socket)
    parent = os.path.dirname(d)
    parent_mode = stat.S_IMODE(os.stat(parent).st_mode)
    # Loosen the file modes on purpose: the uid check (SO_PEERCRED) must refuse on its own.
    os.chmod(parent, parent_mode | 0o011)
    os.chmod(d, 0o711)
    os.chmod(wsd.socket, 0o666)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        out = {"code": "none"}
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with Client(wsd.socket, timeout=5) as c:
                c.call("status")
        except RequestFailed as exc:
            out = {"code": exc.code, "message": exc.message}
        except BaseException as exc:
            out = {"code": "other", "message": repr(exc)}
        finally:
            os.write(wfd, json.dumps(out).encode())
            os._exit(0)
    os.close(wfd)
    try:
        with os.fdopen(rfd) as f:
            got = json.loads(f.read())
        os.waitpid(pid, 0)
    finally:
        os.chmod(parent, parent_mode)
        os.chmod(d, 0o700)
        os.chmod(wsd.socket, 0o600)
    assert got["code"] == "forbidden", got
    assert "uid 65534 may not control this wsd" in got["message"]
    r = ok(wsctl(wsd, "--json", "events", "--kind", "control_refused"))
    assert json.loads(r.out.splitlines()[-1])["uid"] == 65534


def test_completion_is_enabled_and_completes_from_the_daemon(wsd):
    """Shell completion is typer's: a script for bash, and pool names completed from the running daemon."""
    # typer finds the shell from the process tree (shellingham): run it from a bash that stays its parent.
    sh = subprocess.run(["bash", "-c", '"$@"; exit $?', "bash", *WSCTL, "--show-completion"], capture_output=True,
                        text=True, timeout=30, cwd=ROOT, env=env_for())
    assert sh.returncode == 0 and "_WSCTL_COMPLETE" in sh.stdout, (sh.returncode, sh.stderr)
    p = subprocess.run(
        [*WSCTL],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env_for(
            {
                "_WSCTL_COMPLETE": "complete_bash",
                "COMP_CWORD": "5",
                "COMP_WORDS": f"wsctl --socket {wsd.socket} kick --pool m",
            }
        ),
    )
    assert p.stdout.split() == ["mt5"], p
