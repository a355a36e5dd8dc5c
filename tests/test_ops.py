"""What operators rely on: metrics that can be trusted, reload against the running config, startup
errors, resume of default subscriptions, and a test setup that cleans up after itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    BASE_CONFIG,
    ControlError,
    free_port,
    frames_before,
    http_get,
    make_token,
    recv_until,
    wait_for,
    welcome,
)

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    e.pop("WSD_SOCKET", None)
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


async def wsctl(w: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, "-m", "wsctl", "--socket", w.socket, *args)


def scrape(w: Any) -> dict[str, Any]:
    """GET /metrics, parsed with prometheus_client's own parser: family name -> family."""
    status, body = http_get(w.port, "/metrics")
    assert status == 200, body
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{sample_name} {labels}")


async def gone(w: Any, conn_id: str) -> None:
    async def check() -> bool:
        try:
            await w.ctl("connections.get", id=conn_id)
        except ControlError as exc:
            return exc.code == "not_found"
        return False
    await wait_for(check)


# ------------------------------------------------------------------------------------------- metrics

async def test_pool_counters_keep_the_counts_of_closed_connections(wsd):
    """Messages sent to a connection stay counted in its pool after the connection is kicked."""
    async with wsd.connect(token=make_token("alice")) as ws:
        w = await welcome(ws)
        for i in range(5):
            await wsd.ctl("publish", channel="system-status", data={"i": i})
        for _ in range(5):
            await recv_until(ws, lambda m: m.get("type") == "message")
        before = sample(scrape(wsd), "wsd_messages_sent", "wsd_messages_sent_total", pool="frontend")
        before_ctl = json.loads((await wsctl(wsd, "--json", "metrics")).stdout)["pools"]["frontend"]
        assert before >= 6 and before_ctl["messages_sent"] == before  # the welcome and the five messages
        k = await wsctl(wsd, "kick", w["connection_id"])
        assert k.returncode == 0, k.stderr
        await gone(wsd, w["connection_id"])
    after = sample(scrape(wsd), "wsd_messages_sent", "wsd_messages_sent_total", pool="frontend")
    r = await wsctl(wsd, "--json", "metrics")
    assert r.returncode == 0, r.stderr
    after_ctl = json.loads(r.stdout)["pools"]["frontend"]
    assert after >= before
    assert after_ctl["messages_sent"] >= before_ctl["messages_sent"]
    assert after_ctl["bytes_sent"] >= before_ctl["bytes_sent"] and after_ctl["connections"] == 0


async def test_histograms_for_delivery_latency_and_handshake_duration(wsd):
    """/metrics exports base-unit histograms with observations after one handshake and one delivery."""
    async with wsd.connect(token=make_token("alice")) as ws:
        await welcome(ws)
        await wsd.ctl("publish", channel="system-status", data={"x": 1})
        await recv_until(ws, lambda m: m.get("type") == "message")
        fams = scrape(wsd)
    for name in ("wsd_delivery_latency_seconds", "wsd_handshake_duration_seconds"):
        fam = fams[name]
        assert fam.type == "histogram"
        assert sample(fams, name, name + "_count") >= 1
        assert sample(fams, name, name + "_bucket", le="+Inf") >= 1
        buckets = [s for s in fam.samples if s.name == name + "_bucket"]
        assert len(buckets) > 5 and any(s.value > 0 for s in buckets if s.labels["le"] != "+Inf")
    assert fams["wsd_connections"].type == "gauge" and fams["wsd_connections_opened"].type == "counter"
    assert sample(fams, "wsd_connections_opened", "wsd_connections_opened_total") >= 1
    # Percentile gauges are not exported: they cannot be aggregated across nodes.
    assert not any(n.endswith(("_p50_seconds", "_p99_seconds")) for n in fams)
    # Every latency-like family is in base units.
    timed = [n for n in fams if ("latency" in n or "duration" in n) and not n.endswith("_created")]
    assert timed and all(n.endswith("_seconds") for n in timed), timed


def test_delivery_latency_samples_reach_the_histogram_once():
    """The hot path only fills rings; moving them counts each value once, at most a ring's worth."""
    from wsd.runtime.stats import RING, Stats

    def count(st: Stats) -> float:
        return next(s.value for m in st.delivery_hist.collect() for s in m.samples if s.name.endswith("_count"))

    st = Stats()
    for v in (0.001, 0.002, 0.003):
        st.observe_fanout(v)
    st.observe_queue_latency(0.5)
    assert count(st) == 0
    st.move_samples()
    st.move_samples()
    assert count(st) == 4
    for _ in range(RING + 500):
        st.observe_queue_latency(0.004)
    st.move_samples()
    assert count(st) == 4 + RING


# ------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("seen", [0, 3])
async def test_resume_replays_only_the_missed_messages_of_default_subscriptions(wsd, seen):
    """A resumed session's default subscription gets the messages it missed, not the whole history
    (whether or not it had received anything before the drop)."""
    for i in range(20):
        await wsd.ctl("publish", channel="system-status", data={"old": i})
    token = make_token("alice")
    async with wsd.connect(token=token) as ws:
        w1 = await welcome(ws)
        assert "system-status" in w1["subscriptions"]
        for i in range(seen):
            await wsd.ctl("publish", channel="system-status", data={"seen": i})
        for i in range(seen):
            m = await recv_until(ws, lambda m: m.get("type") == "message")
            assert m["data"] == {"seen": i}
        ws.transport.abort()
        await gone(wsd, w1["connection_id"])
    for i in range(3):
        await wsd.ctl("publish", channel="system-status", data={"missed": i})
    async with wsd.connect(token=token, query={"session": w1["session_id"]}) as ws:
        w2 = await welcome(ws)
        assert w2["resumed"] is True
        await wsd.ctl("publish", channel="system-status", data={"sentinel": "s"})
        msgs = [m for m in await frames_before(ws, "s") if m.get("type") == "message"]
    assert [m["data"] for m in msgs] == [{"missed": 0}, {"missed": 1}, {"missed": 2}]


async def test_new_connection_default_subscription_gets_no_history(wsd):
    """A brand-new connection's default subscription starts at the live position."""
    for i in range(5):
        await wsd.ctl("publish", channel="system-status", data={"old": i})
    async with wsd.connect(token=make_token("alice")) as ws:
        await welcome(ws)
        await wsd.ctl("publish", channel="system-status", data={"sentinel": "n"})
        msgs = [m for m in await frames_before(ws, "n") if m.get("type") == "message"]
    assert msgs == []


# ------------------------------------------------------------------------------------- reload, config

def _port_config(port: int) -> str:
    return BASE_CONFIG.replace("port = 0", f"port = {port}")


async def test_reload_compares_the_file_with_the_running_config(wsd_factory):
    """A changed port is pending a restart (the daemon still listens on the old one, and `wsctl config`
    says so); putting the old port back clears it."""
    port, other = free_port(), free_port()
    w = wsd_factory(base=_port_config(port), port=port, port_flag=False)
    w.config_path.write_text(_port_config(other))
    r = await wsctl(w, "reload")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"reloaded; restart required: server.port (running {port}, file {other})"
    assert http_get(port, "/readyz")[0] == 200  # still listening where it started
    assert w.log().count(f"restart required: server.port (running {port}, file {other})") == 1
    cfg = await wsctl(w, "config")
    assert cfg.returncode == 0, cfg.stderr
    live = tomllib.loads(cfg.stdout)  # still a valid TOML file: the notes are comments
    assert live["server"]["port"] == port
    assert f"#   server.port: running {port}, file {other}" in cfg.stdout
    js = json.loads((await wsctl(w, "--json", "config")).stdout)
    assert js["config"]["server"]["port"] == port
    assert js["pending_restart"] == [{"key": "server.port", "running": port, "file": other}]
    status = json.loads((await wsctl(w, "--json", "status")).stdout)
    assert status["listen"]["port"] == port and status["pending_restart"] == js["pending_restart"]
    # The old port back: nothing is pending any more.
    w.config_path.write_text(_port_config(port))
    r = await wsctl(w, "reload")
    assert r.returncode == 0 and r.stdout.strip() == "reloaded: the new config is live", r.stdout
    js = json.loads((await wsctl(w, "--json", "config")).stdout)
    assert js["pending_restart"] == [] and "pending a restart" not in (await wsctl(w, "config")).stdout
    # Live changes still apply.
    w.config_path.write_text(_port_config(port).replace("message_burst = 1000", "message_burst = 777"))
    r = await wsctl(w, "--json", "reload")
    assert json.loads(r.stdout)["restart_required"] == []
    js = json.loads((await wsctl(w, "--json", "config")).stdout)
    assert js["config"]["limits"]["message_burst"] == 777


async def test_config_shows_the_command_line_values(wsd):
    """`wsctl config` shows --port/--socket as running, says they came from the command line, and a
    file value they override is not a pending restart."""
    r = await wsctl(wsd, "config")
    assert r.returncode == 0, r.stderr
    live = tomllib.loads(r.stdout)
    assert live["server"]["port"] == wsd.port and live["control"]["socket"] == wsd.socket
    assert f"# server.port = {wsd.port}: set by --port on the command line" in r.stdout
    assert f"# control.socket = {json.dumps(wsd.socket)}: set by --socket on the command line" in r.stdout
    wsd.config_path.write_text(wsd.config_path.read_text().replace("port = 0", "port = 9"))
    r = await wsctl(wsd, "--json", "reload")
    assert r.returncode == 0 and json.loads(r.stdout)["restart_required"] == []
    js = json.loads((await wsctl(wsd, "--json", "config")).stdout)
    assert js["config"]["server"]["port"] == wsd.port
    assert {"key": "server.port", "flag": "--port", "value": wsd.port} in js["overrides"]


async def test_a_refused_reload_is_logged_once(wsd):
    wsd.config_path.write_text(wsd.config_path.read_text() + "\n[engine]\nbogus_key = 1\n")
    r = await wsctl(wsd, "reload")
    assert r.returncode != 0 and "bogus_key" in r.stderr
    wsd.signal(signal.SIGHUP)
    await wait_for(lambda: _true(wsd.log().count("bogus_key") >= 2))
    log = wsd.log()
    assert log.count("reload refused") == 2, log  # one line for each of the two refusals
    assert "reload_failed" not in log
    assert (await wsd.ctl("status"))["reloads"] == 0


async def _true(v: bool) -> bool:
    return v


# ----------------------------------------------------------------------------------------- startup

def test_a_busy_port_is_one_line_with_hints_and_leaves_no_socket(tmp_path):
    cfg = tmp_path / "wsd.toml"
    cfg.write_text(BASE_CONFIG)
    sock = tmp_path / "ctl" / "wsd.sock"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("-m", "wsd", "serve", "-c", str(cfg), "--port", str(port), "--socket", str(sock))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, r.stderr  # (log lines of the start before it are fine)
    err = errors[0]
    assert err.startswith(f"wsd: error: cannot listen on 127.0.0.1:{port}: the address is already in use")
    assert "--port" in err and "wsctl status" in err
    assert not sock.exists()


async def test_a_second_daemon_on_the_same_socket_leaves_the_first_ones_socket(wsd, tmp_path):
    cfg = tmp_path / "other.toml"
    cfg.write_text(BASE_CONFIG)
    r = await asyncio.to_thread(run, "-m", "wsd", "serve", "-c", str(cfg), "--port", str(free_port()),
                                "--socket", wsd.socket)
    assert r.returncode == 1 and "another wsd is already serving" in r.stderr and "Traceback" not in r.stderr
    assert os.path.exists(wsd.socket) and (await wsd.ctl("status"))["connections"] == 0


# ------------------------------------------------------------------------------------ the test setup

def test_redis_tests_skip_with_how_to_get_redis_server_when_it_is_missing(tmp_path):
    """Without redis-server on PATH the Redis engine tests skip (not error) on a developer's machine, saying how to
    install it; in CI (WSD_CI_REQUIRE_TOOLS=1, which installs it) a missing redis-server fails them instead."""
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "redis-server")))
    r = run("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", "0", "tests/test_redis_engine.py",
            env={"PATH": path, "WSD_CI_REQUIRE_TOOLS": "0"}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    tail = r.stdout.strip().splitlines()[-1]
    assert "error" not in tail and "failed" not in tail and int(tail.split(" skipped")[0].split()[-1]) >= 4, tail
    assert "apt-get install redis-server" in r.stdout, r.stdout
    r = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "tests/test_redis_engine.py",
            env={"PATH": path, "WSD_CI_REQUIRE_TOOLS": "1"}, timeout=120)
    assert r.returncode != 0 and "apt-get install redis-server" in r.stdout, r.stdout[-2000:]


def test_a_stopped_daemon_leaves_no_temp_directory(wsd_factory):
    w = wsd_factory()
    assert w.sockdir.is_dir() and os.path.exists(w.socket)
    assert w.stop() == 0
    assert not w.sockdir.exists()
    never_started = wsd_factory(start=False)
    never_started.stop()
    assert not never_started.sockdir.exists()


# ----------------------------------------------------------------------------------- websockets range

def test_websockets_version_check():
    from wsd.runtime.compat import websockets_problem

    assert websockets_problem("16.0") is None and websockets_problem("17.4") is None
    for old in ("15.0.1", "14.2", "9.1"):
        msg = websockets_problem(old)
        assert msg is not None and "\n" not in msg
        assert "16.0 or newer" in msg and f"found {old}" in msg and "pip install 'websockets>=16,<18'" in msg
    assert "websockets >=16,<18" in (websockets_problem("unknown") or "")


def test_pyproject_pins_the_websockets_range_the_runtime_checks():
    from wsd.runtime.compat import WEBSOCKETS_RANGE

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"websockets{WEBSOCKETS_RANGE}" in deps


def test_wsd_serve_with_a_too_old_websockets_is_one_line():
    """`wsd serve` against websockets 15 stops at import with the version it needs, no traceback."""
    r = run("-c", "import sys, websockets; websockets.__version__ = '15.0.1'; sys.argv = ['wsd', 'serve']; "
            "from wsd.cli import main; main()")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == ("wsd: error: wsd needs websockets 16.0 or newer, found 15.0.1: "
                                "pip install 'websockets>=16,<18'")


# -------------------------------------------------------------------------------------------- routing

ALERT_RULE = """
[[routing.rules]]
id = "alerts"
priority = 10
filter = { message_types = ["system_alert"] }
target = { type = "channel" }
transform = { set = { routed = true } }
"""


async def test_unrouted_counts_messages_when_no_rules_are_configured(wsd):
    for i in range(3):
        r = await wsctl(wsd, "publish", "system-status", "--data", json.dumps({"i": i}))
        assert r.returncode == 0, r.stderr
    r = await wsctl(wsd, "broadcast", "--data", "{}")
    assert r.returncode == 0, r.stderr
    routing = json.loads((await wsctl(wsd, "--json", "metrics")).stdout)["routing"]
    assert routing["messages_unrouted"] == 3 and routing["messages_routed"] == 0  # broadcasts skip the rules
    fams = scrape(wsd)
    assert sample(fams, "wsd_messages_unrouted", "wsd_messages_unrouted_total") == 3
    assert sample(fams, "wsd_messages_routed", "wsd_messages_routed_total") == 0


async def test_broadcast_skips_the_rules_and_publish_goes_through_them(wsd_factory):
    """`wsctl broadcast` is an operator's explicit delivery: a rule matching its type does not touch it."""
    w = wsd_factory(ALERT_RULE)
    async with w.connect(token=make_token("alice")) as ws:
        await welcome(ws)
        r = await wsctl(w, "publish", "system-status", "--type", "system_alert", "--data", '{"a": 1}')
        assert r.returncode == 0, r.stderr
        m = await recv_until(ws, lambda m: m.get("type") == "message")
        assert m["data"] == {"a": 1, "routed": True}
        r = await wsctl(w, "broadcast", "--type", "system_alert", "--data", '{"b": 1}')
        assert r.returncode == 0, r.stderr
        m = await recv_until(ws, lambda m: m.get("type") == "message")
        assert m["data"] == {"b": 1} and m["msg_type"] == "system_alert"
    routing = json.loads((await wsctl(w, "--json", "metrics")).stdout)["routing"]
    assert routing["rule_hits"] == {"alerts": 1}
    assert routing["messages_routed"] == 1 and routing["messages_unrouted"] == 0


# ------------------------------------------------------------------------------------------- packaging

def test_license_and_changelog_ship_with_the_package():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "CHANGELOG.md" in (ROOT / "MANIFEST.in").read_text().split()
    log = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in log and "## 0.1.0" in log
