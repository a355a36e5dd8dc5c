"""The commands agree with each other: the same kind of input gets the same kind of answer.

Real `wsd serve` and real `python -m wsctl` / `python -m wsd` processes: ambiguous id prefixes,
positionals and options that mirror each other, bad filter values, the shape of connection rows,
words (not Python reprs or field names) in human output and help, the manual pages and completion.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer.main

from tests.harness import make_token, recv_until, welcome
from tests.test_wsctl import ROOT, awsctl, env_for, ok, wsctl
from wsctl.cli import app as wsctl_app
from wsd.control import protocol as P

WSD = [sys.executable, "-m", "wsd"]


def run_wsd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WSD, *args], capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env=env_for(env))


def one_line_error(r, rc: int, *words: str) -> None:
    assert r.rc == rc, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsctl: error: "), r
    for w in words:
        assert w in lines[0], r


# ------------------------------------------------------------------------------------------ id prefixes


async def test_an_ambiguous_prefix_says_so_and_how_many_match(wsd):
    # 17 connections with hex ids: at least two share a first character (pigeonhole)
    clients = []
    for i in range(17):
        ws = await wsd.connect("frontend", make_token(f"u{i}", "acme"))
        clients.append((ws, (await welcome(ws))["connection_id"]))
    by_first = collections.Counter(cid[0] for _, cid in clients)
    prefix, n = by_first.most_common(1)[0]
    assert n >= 2
    for args in (
        ["connection", prefix],
        ["send", prefix, "--data", "{}"],
        ["kick", prefix],
        ["subscriptions", prefix],
        ["subscriptions", "--connection", prefix],
    ):
        r = await awsctl(wsd, *args)
        one_line_error(r, 1, f"'{prefix}' is ambiguous", f"{n} connections match")
        assert "no connection" not in r.err
    r = await awsctl(wsd, "--json", "connection", prefix)
    assert json.loads(r.err)["error"]["code"] == P.E_AMBIGUOUS == "ambiguous"
    # nobody was kicked; an unknown prefix is still "no connection"
    assert (await wsd.ctl("status"))["connections"] == 17
    r = await awsctl(wsd, "connection", "zz")
    one_line_error(r, 1, "no connection 'zz'")
    # a unique prefix still works
    cid = clients[0][1]
    unique = next(cid[:k] for k in range(1, 17) if sum(c.startswith(cid[:k]) for _, c in clients) == 1)
    assert ok(await awsctl(wsd, "--json", "connection", unique)).json()["id"] == cid
    for ws, _ in clients:
        await ws.close()


# ----------------------------------------------------------------------------- positionals and options


def test_wsd_version_works_like_wsctl_version():
    p = run_wsd("--version")
    assert p.returncode == 0 and p.stdout.startswith("wsd "), p
    w = wsctl(None, "--version")
    assert w.rc == 0
    assert p.stdout.split()[1] == w.out.split()[1]  # the same package version


def test_wsd_config_show_takes_the_file_like_check(tmp_path):
    f = tmp_path / "x.toml"
    assert run_wsd("config", "init", str(f)).returncode == 0
    assert run_wsd("config", "check", str(f)).returncode == 0
    pos, opt = run_wsd("config", "show", str(f)), run_wsd("config", "show", "-c", str(f))
    assert pos.returncode == 0 and pos.stdout == opt.stdout and str(f) in pos.stdout, pos
    missing = run_wsd("config", "show", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "nope.toml" in missing.stderr


async def test_subscriptions_takes_the_connection_as_a_positional(wsd):
    ws = await wsd.connect("frontend", make_token("alice", "acme"))
    cid = (await welcome(ws))["connection_id"]
    pos = ok(await awsctl(wsd, "--json", "subscriptions", cid[:8])).json()
    opt = ok(await awsctl(wsd, "--json", "subscriptions", "--connection", cid[:8])).json()
    assert pos == opt and pos["total"] >= 1 and all(i["connection_id"] == cid for i in pos["items"])
    await ws.close()


async def test_send_takes_a_ttl_like_publish(wsd):
    ws = await wsd.connect("frontend", make_token("alice", "acme"))
    cid = (await welcome(ws))["connection_id"]
    ok(await awsctl(wsd, "send", cid, "--ttl", "30s", "--type", "notice", "--data", '{"n": 1}'))
    msg = await recv_until(ws, lambda m: m.get("msg_type") == "notice" or m.get("type") == "notice")
    assert msg.get("data") == {"n": 1}, msg
    r = await awsctl(wsd, "send", cid, "--ttl", "soon", "--data", "{}")
    assert r.rc == 2 and "--ttl" in r.err, r
    await ws.close()


async def test_bad_filter_values_are_one_line_errors_like_sort(wsd):
    r = await awsctl(wsd, "connections", "--sort", "bogus")
    one_line_error(r, 2, "--sort", "age")
    r = await awsctl(wsd, "connections", "--state", "bogus")
    one_line_error(r, 2, "--state", "connecting, connected, disconnecting")
    r = await awsctl(wsd, "events", "--kind", "bogus")
    one_line_error(r, 2, "--kind bogus", "connect", "disconnect", "kick")
    r = await awsctl(wsd, "connections", "--pool", "nopool")
    one_line_error(r, 1, "no pool 'nopool'", "frontend")
    r = await awsctl(wsd, "broadcast", "--pool", "nopool", "--data", "{}")
    one_line_error(r, 1, "no pool 'nopool'", "frontend")
    # a real value of each still works
    ok(await awsctl(wsd, "connections", "--state", "connected", "--pool", "frontend"))
    ok(await awsctl(wsd, "events", "--kind", "connect"))


def test_refused_values_are_worded_not_validation_library_messages():
    cases = [
        (["publish", "x", "--priority", "urgent", "--data", "{}"],
         "--priority: one of critical, high, normal, low"),
        (["connections", "--limit", "-1"], "--limit: a whole number, at least 0"),
        (["connections", "--limit", "many"], "--limit: a whole number, at least 0"),
        (["top", "--refresh", "0"], "--refresh: a number, at least 0.1"),
    ]
    for args, words in cases:
        r = wsctl(None, "--socket", "/nonexistent/wsd.sock", *args)
        one_line_error(r, 2, words)
        assert "Value error" not in r.err and "Input should" not in r.err, r
    p = run_wsd("serve", "--port", "abc")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "wsd: error: --port: a whole number (see 'wsd serve --help')"], p


def test_every_event_kind_the_daemon_emits_is_known_to_wsctl():
    """`--kind` accepts exactly the kinds in the protocol module; every `emit("kind", ...)` is among them."""
    from wsd.runtime import conn

    assert P.CONNECTION_STATES == (conn.CONNECTING, conn.CONNECTED, conn.DISCONNECTING)
    emitted = set()
    for path in (ROOT / "wsd").rglob("*.py"):
        emitted |= set(re.findall(r"\.emit\(\s*\"([a-z_]+)\"", path.read_text()))
    assert emitted, "no emit() calls found"
    missing = emitted - set(P.EVENT_KINDS)
    assert not missing, f"add these event kinds to wsd/control/protocol.py EVENT_KINDS: {sorted(missing)}"


async def test_connection_rows_and_the_connection_agree_on_queue_and_breaker(wsd):
    ws = await wsd.connect("frontend", make_token("alice", "acme"))
    cid = (await welcome(ws))["connection_id"]
    row = ok(await awsctl(wsd, "--json", "connections")).json()["items"][0]
    one = ok(await awsctl(wsd, "--json", "connection", cid)).json()
    for key in ("queue", "breaker"):
        assert isinstance(row[key], dict) and isinstance(one[key], dict), (row, one)
        assert set(row[key]) <= set(one[key]), (key, row[key], one[key])
        for k, v in row[key].items():
            assert one[key][k] == v
    # the table still shows the depth and sorts on it
    r = ok(await awsctl(wsd, "connections", "--sort=-queue"))
    assert cid[:8] in r.out
    await ws.close()


# ------------------------------------------------------------------------------------------ words


async def test_human_output_has_no_python_reprs_or_field_names(wsd):
    ws = await wsd.connect("frontend", make_token("alice", "acme", roles=["admin"]))
    cid = (await welcome(ws))["connection_id"]
    ok(await awsctl(wsd, "reload"))
    outs = [ok(await awsctl(wsd, *cmd)).out for cmd in (
        ["status"], ["connections"], ["connection", cid], ["subscriptions"], ["metrics"], ["events"],
        ["pools"], ["channels"], ["reload"],
    )]
    text = "\n".join(outs)
    for bad in ("=False", "=True", "=[]", "['", "{'", "None", "REAL_TIME", "FRONTEND_POOL", "age_s",
                "msgs_in"):
        assert bad not in text, f"{bad!r} in human output:\n{text}"
    assert re.search(r"RSS \d+\.\d (B|KiB|MiB|GiB)", text), text
    await ws.close()


def test_help_shows_placeholders_not_python_types():
    offenders = []

    def walk(cmd, path):
        p = subprocess.run([*WSCTL_CMD, *path, "--help"], capture_output=True, text=True, timeout=30,
                           cwd=ROOT, env=env_for({"COLUMNS": "100"}))
        assert p.returncode == 0, p
        if re.search(r"<(bool|str|int|float|list\[str\]|int range|path)>|\[x>=", p.stdout):
            offenders.append(" ".join(path))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(wsctl_app), [])
    for args in (["--help"], ["serve", "--help"], ["config", "show", "--help"]):
        p = run_wsd(*args)
        if re.search(r"<(bool|str|int|path)>", p.stdout):
            offenders.append("wsd " + " ".join(args))
    assert not offenders, f"Python type names in --help of: {offenders}"


WSCTL_CMD = [sys.executable, "-m", "wsctl"]


# ------------------------------------------------------------------------------- pages and completion


def test_man_pages_ship_in_the_wheel(tmp_path):
    src = tmp_path / "src"  # build from a copy: a build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for name in ("wsd", "wsctl", "man"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)],
                       capture_output=True, text=True, timeout=240)
    wheels = list(out.glob("wsd-*.whl"))
    if p.returncode != 0 or not wheels:
        pytest.skip("cannot build a wheel here (pip wheel needs setuptools>=68 and wheel, or an index "
                    f"to fetch them from): {p.stderr[-300:]}")
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.endswith(".data/data/share/man/man1/wsctl.1") for n in names), names
    assert any(n.endswith(".data/data/share/man/man8/wsd.8") for n in names), names
    assert "wsd/config/default.toml" in names, names  # what `wsd config init` writes


def test_wsctl_man_finds_the_pages():
    for page, name in (("wsctl", "wsctl.1"), ("wsd", "wsd.8")):
        r = wsctl(None, "man", page, "--path")
        assert r.rc == 0 and Path(r.out.strip()).name == name and Path(r.out.strip()).is_file(), r
        assert Path(r.out.strip()).read_text().startswith((".TH", ".\\\"", "'\\\"")), r
    r = wsctl(None, "man", "nope")
    assert r.rc == 2 and "wsctl, wsd" in r.err


def test_wsd_has_shell_completion():
    p = run_wsd("--show-completion", "bash")
    assert p.returncode == 0 and "_WSD_COMPLETE" in p.stdout, p
    p = run_wsd(env={"_WSD_COMPLETE": "complete_bash", "COMP_CWORD": "2", "COMP_WORDS": "wsd config sh"})
    assert p.stdout.split() == ["show"], p
