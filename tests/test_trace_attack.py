"""`wsctl publish --trace` and `wsctl rules test` against hostile clients and careless operators."""

from __future__ import annotations

import json

from tests.harness import ControlError, make_token, request
from tests.test_delivery import Ctl, RawClient, base, congest
from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401 (a fixture)
from tests.test_trace import CHANNELS, hello, nothing_but_sentinel, run_wsctl

EVIL = "\x1b[2J\x1b]0;owned\x07[bold red]boom[/]\u202e"


async def test_client_strings_in_trace_and_rules_test_are_shown_escaped_and_cut(wsd_factory):
    w = wsd_factory(CHANNELS)
    ws, _ = await hello(w, "mallory")
    async with ws:
        # A client's type filter is its own text: control characters, Rich markup, and a lot of it.
        types = [EVIL + "x" * 90, *(f"t{i}" for i in range(60))]  # within limits.max_filter_types and _length
        r = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals",
                               "filter": {"types": types}})
        assert r["ok"], r
        rc, out, err = await run_wsctl(w, "publish", "trading-signals/acme", "--type", "signal" + EVIL,
                                       "--data", json.dumps({"note": EVIL}), "--trace")
        assert rc == 0, err
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
        assert "type filter \\x1b[2J" in out and "filtered" in out, out

        rc, out, err = await run_wsctl(w, "--json", "publish", "trading-signals/acme", "--type", "signal",
                                       "--data", "{}", "--trace")
        assert rc == 0, err
        row = json.loads(out)["trace"]["receivers"][0]
        assert row["outcome"] == "filtered" and len(row["reason"]) < 300, row

        rc, out, err = await run_wsctl(w, "rules", "test", "--channel", "trading-signals/acme",
                                       "--type", EVIL, "--data", json.dumps({"k": EVIL + "\x9b"}))
        assert rc == 0, err
        assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out, repr(out)
        assert "\\x1b" in out and "boom[/]" in out, out  # markup shown as text, not applied


async def test_trace_reply_is_bounded_and_lists_the_unusual_outcomes_first(wsd_factory):
    w = wsd_factory(CHANNELS)
    clients = [await hello(w, f"u{i}") for i in range(12)]
    try:
        for i, (ws, _) in enumerate(clients):
            frame = {"op": "subscribe", "id": 1, "channel": "trading-signals"}
            if i == 7:
                frame["filter"] = {"types": ["quote"]}
            assert (await request(ws, frame))["ok"]
        res = await w.ctl("publish.trace", channel="trading-signals/acme", type="signal", data={}, limit=3)
        tr = res["trace"]
        assert tr["receivers_total"] == 12 and len(tr["receivers"]) == 3, tr
        assert tr["receivers"][0]["outcome"] == "filtered", tr["receivers"]
        assert tr["counts"] == {"written": 11, "filtered": 1}, tr["counts"]
        full = await w.ctl("publish.trace", channel="trading-signals/acme", type="signal", data={})
        assert len(full["trace"]["receivers"]) == 12 == full["trace"]["receivers_total"]
        try:
            await w.ctl("publish.trace", channel="trading-signals/acme", data={}, limit=-1)
        except ControlError as exc:
            assert exc.code == "bad_request" and "limit" in exc.message
        else:
            raise AssertionError("a negative limit was accepted")
    finally:
        for ws, _ in clients:
            await ws.close()


async def test_trace_is_a_real_publish_of_its_own_channel_tenant_only(wsd_factory):
    w = wsd_factory(CHANNELS)
    globex, gid = await hello(w, "eve", "globex")
    async with globex:
        assert (await request(globex, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        for key, value in (("company", "globex"), ("user", "eve")):
            try:
                await w.ctl("publish.trace", channel="trading-signals/acme", data={"x": 1}, **{key: value})
            except ControlError as exc:
                assert exc.code == "bad_request" and f"params.{key}" in exc.message, exc
            else:
                raise AssertionError(f"publish.trace accepted {key}")
        hist = await w.ctl("history.get", channel="trading-signals/acme")
        assert hist["messages"] == []
        await nothing_but_sentinel(w, globex, gid)
        # Bad input: each kind gets its own clear error, and nothing is published.
        for params, code in (({"channel": "nope/acme"}, "unknown_channel"),
                             ({"channel": "trading-signals/acme", "priority": "urgent"}, "bad_request"),
                             ({"channel": "trading-signals/acme", "ttl_s": -1}, "bad_request")):
            try:
                await w.ctl("publish.trace", data={}, **params)
            except ControlError as exc:
                assert exc.code == code, (params, exc)
            else:
                raise AssertionError(f"accepted {params}")
        assert (await w.ctl("history.get", channel="trading-signals/acme"))["messages"] == []
        assert (await w.ctl("metrics.get"))["manager"]["published"] == 0


async def test_with_the_redis_engine_trace_is_refused_clearly_and_rules_test_works(wsd_factory, redis_url):
    w = wsd_factory(CHANNELS + engine_toml(redis_url, "wsdtrace"))
    rc, out, err = await run_wsctl(w, "publish", "trading-signals/acme", "--data", "{}", "--trace")
    assert rc == 1 and "memory engine" in err and err.count("\n") <= 2, (out, err)
    assert (await w.ctl("history.get", channel="trading-signals/acme"))["messages"] == []
    rc, out, err = await run_wsctl(w, "--json", "rules", "test", "--channel", "trading-signals/acme")
    assert rc == 0 and json.loads(out)["routed"] is False, err


async def test_a_receiver_closed_by_the_traced_message_is_reported_dropped_closed(wsd_factory):
    w = wsd_factory(CHANNELS, base=base(write_high_water_bytes=16384, message_buffer_size=3,
                                        slow_consumer_timeout_ms=60000, overflow_close_count=1,
                                        coalesce_window_ms=0))  # fillers one by one: no window flushes 4
    raw = RawClient(w, make_token("stall", "acme"))
    cid = (await raw.open())["connection_id"]
    try:
        assert (await raw.request({"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        async with Ctl(w) as ctl:
            await congest(ctl, cid, priority="normal", size=16384, at_least=3)
        res = await w.ctl("publish.trace", channel="trading-signals/acme", type="traced", data={})
        row = next(x for x in res["trace"]["receivers"] if x["connection_id"] == cid)
        assert row["outcome"] == "dropped" and row["reason"] == "closed: slow consumer: queue overflow", row
    finally:
        raw.close()
