"""What operators rely on: metrics that can be trusted, reload against the running config, startup
errors, resume of default subscriptions, and a test setup that cleans up after itself."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    ControlError,
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
    # Percentile gauges are not exported: they cannot be aggregated across nodes.
    assert not any(n.endswith(("_p50_seconds", "_p99_seconds")) for n in fams)
    # Every latency-like family is in base units.
    timed = [n for n in fams if ("latency" in n or "duration" in n) and not n.endswith("_created")]
    assert timed and all(n.endswith("_seconds") for n in timed), timed


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
