"""Where did my message go: `wsctl rules test` (a dry run against the live rules) and `wsctl publish --trace`."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from tests.harness import Wsd, make_token, recv_json, request, welcome
from tests.test_delivery import Ctl, RawClient, base, congest

ROOT = Path(__file__).resolve().parents[1]
WSCTL = [sys.executable, "-m", "wsctl"]

CHANNELS = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["mt5", "api", "admin"]
history_size = 10
"""

RULES = """
[[routing.rules]]
id = "vip-mt5"
priority = 100
filter = { message_types = ["vip"] }
target = { type = "broadcast", pools = ["mt5"] }
transform = { rename = { px = "price" } }

[[routing.rules]]
id = "vip-frontend"
priority = 50
stop = true
filter = { message_types = ["vip"], channels = ["system-status"] }
target = { type = "broadcast", pools = ["frontend"] }
transform = { exclude_fields = ["internal"] }
pool_transforms = { frontend = { set = { tier = "gold" } } }

[[routing.rules]]
id = "vip-everyone"
priority = 10
filter = { message_types = ["vip"] }
target = { type = "broadcast" }

[[routing.rules]]
id = "not-vip"
priority = 5
filter = { message_types = ["other"] }
target = { type = "broadcast" }
"""


async def run_wsctl(w: Wsd, *args: str) -> tuple[int, str, str]:
    """The real wsctl, without blocking the loop (the test's clients keep reading meanwhile)."""
    proc = await asyncio.create_subprocess_exec(*WSCTL, "--socket", w.socket, *args, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def hello(w: Wsd, user: str, company: str = "acme", pool: str = "frontend") -> tuple[Any, str]:
    ws = await w.connect(pool, make_token(user, company))
    return ws, (await welcome(ws))["connection_id"]


async def nothing_but_sentinel(w: Wsd, ws: Any, conn_id: str) -> None:
    """The next push the client gets is a sentinel sent now: nothing else reached it."""
    mark = secrets.token_hex(4)
    await w.ctl("send", connection_id=conn_id, type="sentinel", data={"mark": mark})
    m = await recv_json(ws)
    assert m.get("msg_type") == "sentinel" and m["data"] == {"mark": mark}, m


async def test_rules_test_shows_the_walk_stop_pool_counts_and_transforms(wsd_factory):
    w = wsd_factory(CHANNELS + RULES)
    f1, id1 = await hello(w, "alice")
    f2, id2 = await hello(w, "bob", "globex")
    m1, idm = await hello(w, "carol", pool="mt5")
    async with f1, f2, m1:
        args = ["rules", "test", "--channel", "system-status", "--type", "vip",
                "--data", '{"px": 1.5, "internal": "x"}']
        rc, out, err = await run_wsctl(w, "--json", *args)
        assert rc == 0, err
        r = json.loads(out)
        walk = [(s["id"], s["result"]) for s in r["rules"]]
        assert walk == [("vip-mt5", "matched"), ("vip-frontend", "matched"), ("vip-everyone", "not_tried"),
                        ("not-vip", "not_tried")]
        assert "vip-frontend" in r["rules"][2]["why"] and "stop" in r["rules"][2]["why"]
        assert r["routed"] is True and [t["rule_id"] for t in r["targets"]] == ["vip-mt5", "vip-frontend"]
        mt5, front = r["targets"]
        assert mt5["connections"] == 1 and mt5["by_pool"]["mt5"] == {
            "connections": 1, "data": {"price": 1.5, "internal": "x"}}
        assert front["connections"] == 2 and front["by_pool"]["frontend"] == {
            "connections": 2, "data": {"px": 1.5, "tier": "gold"}}
        assert front["data"] == {"px": 1.5}

        # The same on the terminal: the walk, where stop ended it, counts per pool, the data.
        rc, out, err = await run_wsctl(w, *args)
        assert rc == 0, err
        assert "stop = true: the walk ends here" in out, out
        lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
        assert "not tried" in lines["3"] and "vip-everyone" in lines["3"], out
        assert '{"px":1.5,"tier":"gold"}' in out and '{"internal":"x","price":1.5}' in out, out
        assert "reach 3 connection(s); nothing was sent" in out, out

        # A message that no rule matches goes to its channel's subscribers (here: every frontend
        # client's default subscription to system-status).
        rc, out, err = await run_wsctl(w, "--json", "rules", "test", "--channel", "system-status",
                                       "--type", "plain", "--data", "{}")
        r = json.loads(out)
        assert r["routed"] is False and all(s["result"] == "skipped" for s in r["rules"])
        assert r["rules"][0]["why"] == "message_types"
        assert r["channel"]["by_pool"] == {"frontend": {"connections": 2, "data": {}}}

        # A dry run: nothing was delivered and no hit was counted.
        for ws, cid in ((f1, id1), (f2, id2), (m1, idm)):
            await nothing_but_sentinel(w, ws, cid)
        listing = await w.ctl("rules.list")
        assert all(rule["hits"] == 0 for rule in listing["rules"])
        assert listing["metrics"]["messages_routed"] == 0

        # Bad input gets a one-line error.
        rc, out, err = await run_wsctl(w, "rules", "test", "--channel", "nope/acme", "--type", "vip")
        assert rc == 1 and "nope" in err and err.count("\n") <= 2, err
        rc, out, err = await run_wsctl(w, "rules", "test", "--channel", "system-status", "--data", "{bad")
        assert rc == 2 and "invalid JSON" in err, err


async def test_publish_trace_reports_each_receiver(wsd_factory):
    w = wsd_factory(CHANNELS, base=base(write_high_water_bytes=16384, message_buffer_size=3,
                                        slow_consumer_timeout_ms=60000, overflow_close_count=1000))
    written, id_written = await hello(w, "alice")
    filtered, id_filtered = await hello(w, "bob")
    unsub, id_unsub = await hello(w, "carol")
    batch, id_batch = await hello(w, "dave")
    other, id_other = await hello(w, "erin", "globex")
    raw = RawClient(w, make_token("stall", "acme"))
    id_stalled = (await raw.open())["connection_id"]
    try:
        async with written, filtered, unsub, batch, other:
            assert (await request(written, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
            assert (await request(filtered, {"op": "subscribe", "id": 1, "channel": "trading-signals",
                                             "filter": {"types": ["quote"]}}))["ok"]
            assert (await request(batch, {"op": "subscribe", "id": 1, "channel": "trading-signals",
                                          "mode": "batch"}))["ok"]
            assert (await raw.request({"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]

            # The stalled client stops reading until its queue is full; the others drain what it took.
            drained = asyncio.Event()

            async def drain(ws: Any) -> None:
                while True:
                    m = await recv_json(ws, 30)
                    if m.get("msg_type") == "traced":
                        drained.set()

            tasks = [asyncio.create_task(drain(ws)) for ws in (written, filtered, batch)]
            async with Ctl(w) as ctl:
                await congest(ctl, id_stalled, priority="normal", size=16384, at_least=3)

            rc, out, err = await run_wsctl(w, "--json", "publish", "trading-signals/acme", "--type", "traced",
                                           "--data", '{"n": 1}', "--trace")
            assert rc == 0, err
            r = json.loads(out)
            tr = r["trace"]
            rows = {x["connection_id"]: x for x in tr["receivers"]}
            assert rows[id_written]["outcome"] == "written"
            assert rows[id_filtered]["outcome"] == "filtered" and "quote" in rows[id_filtered]["reason"]
            assert rows[id_batch]["outcome"] == "batched"
            stalled = rows[id_stalled]
            assert stalled["outcome"] == "queued" and stalled["queue_depth"] == 3, stalled
            assert stalled["breaker"] == "open" and "dropped for it" in stalled["reason"]
            assert id_unsub not in rows and id_other not in rows
            assert tr["not_subscribed"] == {"connections": 1, "by_pool": {"frontend": 1}}
            assert tr["counts"] == {"written": 1, "filtered": 1, "batched": 1, "queued": 1, "not_subscribed": 1}
            assert r["delivered"] == 3
            await asyncio.wait_for(drained.wait(), 10)  # "written" was true: the client got it

            # A low-priority message finds the stalled client's queue full of normal ones: dropped.
            rc, out, err = await run_wsctl(w, "publish", "trading-signals/acme", "--type", "traced",
                                           "--priority", "low", "--data", '{"n": 2}', "--trace")
            assert rc == 0, err
            counts = {}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[-1].isdigit() and parts[0] in (
                        "written", "filtered", "batched", "queued", "dropped", "not"):
                    counts[" ".join(parts[:-1])] = int(parts[-1])
            assert counts == {"written": 1, "filtered": 1, "batched": 1, "dropped": 1, "not subscribed": 1}, out
            assert id_stalled[:8] in out and "overflow" in out, out
            for t in tasks:
                t.cancel()
    finally:
        raw.close()


async def test_trace_of_a_routed_message_and_of_a_closed_receiver(wsd_factory):
    w = wsd_factory(CHANNELS + RULES)
    f1, id1 = await hello(w, "alice")
    m1, idm = await hello(w, "carol", pool="mt5")
    async with f1, m1:
        res = await w.ctl("publish.trace", channel="system-status", type="vip", data={"px": 2, "internal": 1})
        tr = res["trace"]
        assert tr["routed"] is True
        rows = {x["connection_id"]: x["outcome"] for x in tr["receivers"]}
        assert rows == {id1: "written", idm: "written"}
        assert (await recv_json(f1))["data"] == {"px": 2, "tier": "gold"}
        assert (await recv_json(m1))["data"] == {"price": 2, "internal": 1}
        # A message no rule matches, to a channel nobody in scope is subscribed to but the frontend
        # client (default subscription): the mt5 client counts as not subscribed.
        res = await w.ctl("publish.trace", channel="system-status", type="plain", data={})
        assert res["trace"]["counts"] == {"written": 1, "not_subscribed": 1}


async def test_trace_in_a_burst_reports_coalesced(wsd_factory):
    w = wsd_factory(CHANNELS, base=base(coalesce_window_ms=1000))
    ws, _ = await hello(w, "alice")
    async with ws:
        assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        async with Ctl(w) as ctl:
            await ctl("publish", channel="trading-signals/acme", type="first", data={})
            res = await ctl("publish.trace", channel="trading-signals/acme", type="second", data={})
        rows = res["trace"]["receivers"]
        assert [r["outcome"] for r in rows] == ["coalesced"], rows
        assert (await recv_json(ws))["msg_type"] == "first"
        assert (await recv_json(ws, 10))["msg_type"] == "second"  # written when the window closes
