"""Channel groups with a data_schema: valid publications go through, invalid ones are refused with the path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_compiled_schema_names_the_path_and_never_echoes_a_long_value() -> None:
    from wsd.core.schema import SchemaError, compile_schema

    schema = compile_schema({"type": "object", "properties": {"items": {"type": "array",
                                                                         "items": {"type": "integer"}}}})
    assert schema.problem({"items": [1, 2]}) is None
    path, reason = schema.problem({"items": [1, "y" * 5000]})
    assert path == "$.items[1]" and len(reason) <= 200 and "y" * 50 not in reason and "integer" in reason
    # $ref only inside the schema: a remote one is never fetched, the publication is refused with why.
    remote = compile_schema({"$ref": "https://example.com/schema.json"})
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
