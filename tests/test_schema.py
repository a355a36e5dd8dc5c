"""Channel groups with a data_schema: valid publications go through, invalid ones are refused with the path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import websockets

from tests.harness import BASE_CONFIG, ControlError, Wsd, make_token, recv_json, request, welcome

ROOT = Path(__file__).resolve().parents[1]
WSCTL = [sys.executable, "-m", "wsctl"]

SIGNAL_SCHEMA = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["api", "admin"]
data_schema = { type = "object", required = ["symbol", "price"], properties = { symbol = { type = "string", maxLength = 12 }, price = { type = "number", exclusiveMinimum = 0 } } }

[audit]
path = "audit.log"
"""


async def _client(w: Wsd, pool: str, user: str = "alice") -> tuple[object, str]:
    ws = await w.connect(pool, make_token(user, "acme"))
    return ws, (await welcome(ws))["connection_id"]


def _audit(w: Wsd, kind: str) -> list[dict]:
    path = w.workdir / "audit.log"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == kind]


async def test_valid_data_delivered_invalid_refused_with_path_not_delivered_not_stored(wsd_factory):
    w = wsd_factory(SIGNAL_SCHEMA)
    sub, _ = await _client(w, "frontend", "bob")
    pub, _ = await _client(w, "api")
    async with sub, pub:
        r = await request(sub, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        assert r["ok"], r
        ok = await request(pub, {"op": "publish", "id": 2, "channel": "trading-signals", "type": "signal",
                                 "data": {"symbol": "EURUSD", "price": 1.08}})
        assert ok["ok"], ok
        got = await recv_json(sub)
        assert got["type"] == "message" and got["data"] == {"symbol": "EURUSD", "price": 1.08}

        huge = "x" * 20_000
        bad = await request(pub, {"op": "publish", "id": 3, "channel": "trading-signals", "type": "signal",
                                  "data": {"symbol": "EURUSD", "price": huge}})
        assert not bad["ok"] and bad["error"]["code"] == "invalid_data", bad
        msg = bad["error"]["message"]
        assert "$.price" in msg and "number" in msg, msg
        assert len(msg) < 400  # the refused value is never echoed whole

        missing = await request(pub, {"op": "publish", "id": 4, "channel": "trading-signals", "type": "signal",
                                      "data": {"symbol": "EURUSD"}})
        assert missing["error"]["code"] == "invalid_data" and "'price' is a required property" in \
            missing["error"]["message"]

        # Not delivered: the next frame the subscriber sees is the valid marker published after them.
        ok2 = await request(pub, {"op": "publish", "id": 5, "channel": "trading-signals", "type": "marker",
                                  "data": {"symbol": "MARK", "price": 2}})
        assert ok2["ok"]
        nxt = await recv_json(sub)
        assert nxt["msg_type"] == "marker", nxt

    hist = await w.ctl("history.get", channel="trading-signals/acme")
    assert [m["type"] for m in hist["messages"]] == ["signal", "marker"]
    metrics = await w.ctl("metrics.get")
    assert metrics["manager"]["invalid_data"] == 2
    assert "wsd_publish_invalid_data_total 2.0" in (await w.ctl("metrics.prometheus"))["text"]
    records = _audit(w, "invalid_data")
    assert len(records) == 2
    assert records[0]["path"] == "$.price" and records[0]["channel"] == "trading-signals/acme"
    assert records[0]["source"].startswith("client:")
    assert huge not in (w.workdir / "audit.log").read_text()


async def test_operator_publish_is_validated_and_wsctl_shows_the_error(wsd_factory):
    w = wsd_factory(SIGNAL_SCHEMA)
    p = subprocess.run([*WSCTL, "--socket", w.socket, "publish", "trading-signals/acme", "--type", "signal",
                        "--data", '{"symbol": "EURUSD", "price": -1}'],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 1, p
    assert "$.price" in p.stderr and "exclusiveMinimum" not in p.stdout, p.stderr
    assert "less than or equal to the minimum of 0" in p.stderr, p.stderr
    p = subprocess.run([*WSCTL, "--socket", w.socket, "--json", "publish", "trading-signals/acme",
                        "--data", '{"symbol": "EURUSD", "price": 1}'],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 0, p
    # A channel group without a schema takes any data.
    res = await w.ctl("publish", channel="system-status", type="up", data=["anything", 1])
    assert res["delivered"] == 0
    assert len(_audit(w, "invalid_data")) == 1 and _audit(w, "invalid_data")[0]["source"] == "control"


async def test_reload_applies_a_changed_schema(wsd_factory):
    w = wsd_factory(SIGNAL_SCHEMA)
    await w.ctl("publish", channel="trading-signals/acme", data={"symbol": "A", "price": 1})
    changed = SIGNAL_SCHEMA.replace('required = ["symbol", "price"]', 'required = ["symbol", "price", "side"]')
    w.config_path.write_text(BASE_CONFIG + "\n" + changed)
    res = await w.ctl("reload")
    assert res["ok"], res
    try:
        await w.ctl("publish", channel="trading-signals/acme", data={"symbol": "A", "price": 1})
    except ControlError as exc:
        assert exc.code == "invalid_data" and "'side' is a required property" in exc.message
    else:
        raise AssertionError("the reloaded schema was not applied")
    await w.ctl("publish", channel="trading-signals/acme", data={"symbol": "A", "price": 1, "side": "buy"})


async def test_schema_file_relative_to_the_config(wsd_factory):
    extra = SIGNAL_SCHEMA.replace(
        'data_schema = { type = "object", required = ["symbol", "price"], properties = { symbol = '
        '{ type = "string", maxLength = 12 }, price = { type = "number", exclusiveMinimum = 0 } } }',
        'data_schema_file = "schemas/signal.json"')
    assert "data_schema_file" in extra
    w = wsd_factory(extra, start=False)
    (w.workdir / "schemas").mkdir()
    (w.workdir / "schemas" / "signal.json").write_text(json.dumps({
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"qty": {"type": "integer"}}}))
    w.start()
    await w.ctl("publish", channel="trading-signals/acme", data={"qty": 3})
    try:
        await w.ctl("publish", channel="trading-signals/acme", data={"qty": 1.5})
    except ControlError as exc:
        assert exc.code == "invalid_data" and "$.qty" in exc.message
    else:
        raise AssertionError("data_schema_file was not applied")


def _check(tmp_path: Path, channels: str, files: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    cfg = tmp_path / "wsd.toml"
    cfg.write_text(BASE_CONFIG + "\n[pools.frontend]\ntype = \"frontend\"\npath = \"/ws/frontend\"\n" + channels)
    return subprocess.run([sys.executable, "-m", "wsd", "config", "check", str(cfg)], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def test_bad_schema_fails_config_check_with_the_key_path(tmp_path: Path) -> None:
    p = _check(tmp_path, '[channels.trading-signals]\ntype = "company"\n'
                         'data_schema = { type = "object", properties = { price = { type = "numbr" } } }\n')
    assert p.returncode != 0
    assert "channels.trading-signals.data_schema: not a valid JSON Schema" in p.stderr, p.stderr
    assert "$.properties.price.type" in p.stderr


def test_schema_file_problems_fail_config_check(tmp_path: Path) -> None:
    p = _check(tmp_path, '[channels.a]\ntype = "global"\ndata_schema_file = "missing.json"\n'
                         '[channels.b]\ntype = "global"\ndata_schema_file = "b.json"\n'
                         '[channels.c]\ntype = "global"\ndata_schema_file = "c.json"\ndata_schema = {}\n'
                         '[channels.d]\ntype = "global"\ndata_schema = { "$schema" = "https://json-schema.org/draft/2020-12/schema", minLength = -1 }\n',
               {"b.json": "{not json", "c.json": "{}"})
    assert p.returncode != 0
    err = p.stderr
    assert "channels.a.data_schema_file: cannot read" in err and "missing.json" in err, err
    assert "channels.b.data_schema_file:" in err and "is not JSON" in err, err
    assert "channels.c.data_schema_file: set data_schema or data_schema_file, not both" in err, err
    assert "channels.d.data_schema: not a valid JSON Schema" in err and "$.minLength" in err, err


def test_schema_file_that_is_no_plain_small_json_object_fails_config_check(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # reading it would block the load (and a reload) for ever
    (tmp_path / "big.json").write_text('{"description": "' + "x" * (1 << 20) + '"}')
    (tmp_path / "latin1.json").write_bytes(b'{"description": "caf\xe9"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    channels = "".join(f'[channels.{n}]\ntype = "global"\ndata_schema_file = "{f}"\n' for n, f in (
        ("a", "dir"), ("b", "fifo"), ("c", "big.json"), ("d", "latin1.json"), ("e", "list.json"),
        ("f", "/dev/zero")))
    p = _check(tmp_path, channels)
    assert p.returncode != 0
    err = p.stderr
    assert 'channels.a.data_schema_file: "' in err and 'dir" is not a regular file' in err, err
    assert 'fifo" is not a regular file' in err and '"/dev/zero" is not a regular file' in err, err
    assert 'channels.c.data_schema_file: "' in err and "is larger than 1 MiB" in err, err
    assert "channels.d.data_schema_file: cannot read" in err and "utf-8" in err, err
    assert "channels.e.data_schema_file: not a valid JSON Schema: a schema is a JSON object, got list" in err, err


def test_compiled_schema_names_the_path_and_never_echoes_a_long_value() -> None:
    from wsd.core.schema import SchemaError, compile_schema

    schema = compile_schema({"type": "object", "properties": {"items": {"type": "array",
                                                                         "items": {"type": "integer"}}}})
    assert schema.problem({"items": [1, 2]}) is None
    path, reason = schema.problem({"items": [1, "y" * 5000]})
    assert path == "$.items[1]" and len(reason) <= 200 and "y" * 50 not in reason and "integer" in reason
    # $ref only inside the schema: a remote one is never fetched; a schema with nested $ids (refs relative
    # to them are left to validation time) refuses the publication with why.
    remote = compile_schema({"$defs": {"x": {"$id": "https://example.com/x"}},
                             "$ref": "https://example.com/schema.json"})
    path, reason = remote.problem({})
    assert "cannot be resolved" in reason
    # The draft named by $schema applies (draft 4's boolean exclusiveMaximum).
    d4 = compile_schema({"$schema": "http://json-schema.org/draft-04/schema#", "maximum": 5,
                         "exclusiveMaximum": True})
    assert d4.problem(5) is not None and d4.problem(4) is None
    try:
        compile_schema(["not", "an", "object"])
    except SchemaError as exc:
        assert "JSON object" in exc.message
    else:
        raise AssertionError("a non-object schema was accepted")


HOSTILE_SCHEMA = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["api", "admin"]
data_schema = { type = "object", properties = { code = { type = "string", pattern = "^(a|aa)+$" }, legs = { type = "array", uniqueItems = true } } }
"""


async def test_hostile_data_cannot_stall_the_daemon_with_a_backtracking_pattern_or_unique_items(wsd_factory):
    w = wsd_factory(HOSTILE_SCHEMA)
    pub, _ = await _client(w, "api")
    other, _ = await _client(w, "frontend", "bob")
    async with pub, other:
        loop = asyncio.get_running_loop()
        # Python's re needs hours for this one (it backtracks through every split of the a's).
        t0 = loop.time()
        r = await request(pub, {"op": "publish", "id": 1, "channel": "trading-signals",
                                "data": {"code": "a" * 60 + "!"}}, timeout=3)
        assert r["error"]["code"] == "invalid_data" and "took longer than" in r["error"]["message"], r
        # 5000 distinct objects: the library's uniqueItems compares every pair (about 50 s).
        legs = [{"n": i} for i in range(5000)]
        r = await request(pub, {"op": "publish", "id": 2, "channel": "trading-signals", "data": {"legs": legs}},
                          timeout=3)
        assert r["ok"], r
        r = await request(pub, {"op": "publish", "id": 3, "channel": "trading-signals",
                                "data": {"legs": [*legs, {"n": 0}]}}, timeout=3)
        assert r["error"]["code"] == "invalid_data" and "uniqueItems" in r["error"]["message"], r
        assert loop.time() - t0 < 3
        # The daemon stayed responsive for everyone else, and honest data still passes.
        pong = await request(other, {"op": "ping", "id": 9}, timeout=2)
        assert pong["ok"], pong
        ok = await request(pub, {"op": "publish", "id": 4, "channel": "trading-signals",
                                 "data": {"code": "aaaa", "legs": [1, 2]}})
        assert ok["ok"], ok


async def test_a_client_that_keeps_sending_costly_data_is_warned_then_closed(wsd_factory):
    w = wsd_factory(HOSTILE_SCHEMA)
    pub, _ = await _client(w, "api", "mallory")
    async with pub:
        for i in range(40):  # each takes the whole validation budget
            await pub.send(json.dumps({"op": "publish", "id": i, "channel": "trading-signals",
                                       "data": {"code": "a" * 60 + "!"}}))
        seen: list[dict] = []
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            async with asyncio.timeout(20):
                while True:
                    seen.append(json.loads(await pub.recv()))
        assert pub.close_code == 1011 and "unhealthy" in (pub.close_reason or ""), (pub.close_code, seen[-3:])
        assert any(m.get("type") == "error" and m["error"]["code"] == "unhealthy" for m in seen), seen[-3:]
        refusals = [m for m in seen if m.get("ok") is False]
        assert refusals and all(m["error"]["code"] == "invalid_data" for m in refusals)
        assert len(refusals) <= 10  # warned at 5, closed at 10: not 40 x 250 ms of a busy loop


def test_validation_time_is_bounded_and_unique_items_keeps_json_equality() -> None:
    from wsd.core.schema import VALIDATION_BUDGET_S, compile_schema

    evil = "^(a|aa)+$"
    cases = [
        ({"properties": {"s": {"pattern": evil}}}, {"s": "a" * 60 + "!"}),
        ({"patternProperties": {evil: {"type": "integer"}}}, {"a" * 60 + "!": 1}),
        ({"patternProperties": {evil: {}}, "additionalProperties": False}, {"a" * 60 + "!": 1}),
        ({"type": "array", "items": {"pattern": evil}}, ["a" * 40 + "!"] * 50),
    ]
    for schema, data in cases:
        t0 = time.perf_counter()
        path, reason = compile_schema(schema).problem(data)
        # Without the budget each of these runs for minutes; a loaded machine may stretch the budget itself,
        # so the bound is generous and the verdict below is what proves the budget cut the work short.
        assert time.perf_counter() - t0 < VALIDATION_BUDGET_S + 10, schema
        assert path == "$" and "took longer than" in reason, (schema, reason)
    # The swapped-in keywords give the library's answers.
    pp = compile_schema({"patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False})
    assert pp.problem({"x-a": 1}) is None
    assert pp.problem({"x-a": "s"})[0] == "$['x-a']"
    assert "do not match any of the regexes" in pp.problem({"b": 1, "c": 2})[1]
    ap = compile_schema({"properties": {"a": {}}, "additionalProperties": False})
    assert ap.problem({"a": 1, "b": 2})[1] == "Additional properties are not allowed ('b' was unexpected)"
    assert compile_schema({"pattern": "^[A-Z]{3}$"}).problem("EURUSD") is not None
    uniq = compile_schema({"uniqueItems": True})
    assert uniq.problem([1, 1.0]) is not None and uniq.problem([1, True]) is None
    assert uniq.problem([{"a": 1, "b": [2]}, {"b": [2], "a": 1}]) is not None
    assert uniq.problem([{"a": 1}, {"a": 2}, [1], [True], None, False, 0]) is None
    # Data nested deeper than the recursion limit is refused, not crashed on.
    nested = compile_schema({"$defs": {"n": {"type": ["array", "null"], "items": {"$ref": "#/$defs/n"}}},
                             "$ref": "#/$defs/n"})
    deep: object = None
    for _ in range(5000):
        deep = [deep]
    assert nested.problem(deep) == ("$", "the data is nested too deeply to validate")


def test_unevaluated_properties_with_pattern_properties_fails_config_check(tmp_path: Path) -> None:
    p = _check(tmp_path, '[channels.d]\ntype = "global"\ndata_schema = { patternProperties = { "^x" = {} }, '
                         'unevaluatedProperties = false }\n')
    assert p.returncode != 0
    assert "channels.d.data_schema: not a valid JSON Schema: unevaluatedProperties together with " \
           "patternProperties" in p.stderr + p.stdout, p


def test_a_ref_that_does_not_resolve_inside_the_schema_fails_config_check(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "string"}')
    for ref in ("https://example.com/s.json", secret.as_uri(), "#/$defs/typo"):
        p = _check(tmp_path, '[channels.d]\ntype = "global"\ndata_schema = { properties = { a = '
                             f'{{ "$ref" = "{ref}" }} }} }}\n')
        assert p.returncode != 0, p
        out = p.stderr + p.stdout
        assert f"channels.d.data_schema: not a valid JSON Schema: $ref '{ref[:60]}" in out, p
        assert "does not resolve inside the schema (the daemon never fetches" in out, p
    ok = _check(tmp_path, '[channels.d]\ntype = "global"\ndata_schema = { "$defs" = { p = { type = "number" } }, '
                          'properties = { a = { "$ref" = "#/$defs/p" } } }\n')
    assert "channels.d" not in ok.stderr + ok.stdout, ok


def test_the_documented_formats_are_asserted() -> None:
    from wsd.core.schema import compile_schema

    for fmt, good, bad in (("date-time", "2026-01-01T10:00:00Z", "yesterday"), ("time", "10:00:00Z", "25:00"),
                           ("date", "2026-01-31", "2026-13-01"), ("email", "a@b.c", "nobody"),
                           ("ipv4", "10.0.0.1", "10.0.0.256"), ("uuid", "12345678-1234-5678-1234-567812345678",
                                                                  "1234"), ("regex", "^a+$", "(a")):
        s = compile_schema({"type": "string", "format": fmt})
        assert s.problem(good) is None, fmt
        assert s.problem(bad) == ("$", f"{bad!r} is not a {fmt!r}"), fmt
