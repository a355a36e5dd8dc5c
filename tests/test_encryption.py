"""Message-level encryption end to end: real daemons, raw websockets clients, the Python client, the real wsctl and
`wsd` commands, a private redis-server. Plaintext never reaches a subscriber's wire, a history reply, `wsctl history`
or Redis; the Python client decrypts (and yields what it cannot decrypt, marked); SIGHUP rotates the key id with the
old messages still readable with the old key; every kind of bad config is refused naming its key path; key files
never show in config output. The AAD binding and envelope handling are unit-tested on the client's decrypt."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.harness import REDIS_MISSING, make_token, recv_until, request, tool_missing, wait_for, welcome
from tests.test_wsctl import awsctl, ok, wsctl
from wsd.client import Client, Message
from wsd.client.decrypt import open_envelope, prepare_keys
from wsd.core.encryption import Sealer, parse_key

ROOT = Path(__file__).resolve().parent.parent
SECRET_WORD = "plaintext-marker-7f3a"  # in every published data value; must never appear where ciphertext belongs
FAST = {"backoff_base": 0.05, "backoff_cap": 0.2, "connect_timeout": 10, "request_timeout": 5}


def keygen(path: Path) -> bytes:
    """A key file made by the real `wsd keygen`; its 32 bytes."""
    p = subprocess.run([sys.executable, "-m", "wsd", "keygen", str(path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=30)
    assert p.returncode == 0, p.stderr
    return parse_key(path.read_text())


def config(keys: dict[str, Path], encrypt: str, extra: str = "") -> str:
    lines = "\n".join(f'"{kid}" = "{path}"' for kid, path in keys.items())
    return f"""
[pools.frontend]
type = "frontend"
path = "/ws/frontend"

[pools.api]
type = "api"
path = "/ws/api"

[channels.sig]
type = "company"
history_size = 50
publishers = ["api"]
encrypt = "{encrypt}"

[channels.plain]
type = "company"
history_size = 50
publishers = ["api"]

[encryption.keys]
{lines}
{extra}
"""


def unb64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def decrypt(key: bytes, channel: str, env: dict[str, Any]) -> Any:
    """The contract, spelled out independently of our client: AES-256-GCM, AAD = the channel instance."""
    return json.loads(AESGCM(key).decrypt(unb64url(env["iv"]), unb64url(env["ct"]), channel.encode()))


@pytest.fixture
def key1(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "k1.key"
    return path, keygen(path)


# ----------------------------------------------------------------------------------------------------- the wire


async def test_subscribers_and_history_get_only_ciphertext_for_every_publish_path(wsd_factory, key1):
    """Client `publish` op and `wsctl publish`: the push carries enc and the envelope; the plaintext is in no frame a
    subscriber gets (live, history reply, subscribe-with-history replay); the envelope decrypts per the contract."""
    path, key = key1
    w = wsd_factory(config({"k1": path}, "k1"))
    async with w.connect("frontend", make_token("bob", "acme")) as sub, \
            w.connect("api", make_token("pub", "acme")) as pub:
        await welcome(sub)
        await welcome(pub)
        assert (await request(sub, {"op": "subscribe", "id": 1, "channel": "sig"}))["ok"]
        r = await request(pub, {"op": "publish", "id": 2, "channel": "sig", "type": "signal",
                                "data": {"px": 1.08, "note": SECRET_WORD}})
        assert r["ok"], r
        res = await awsctl(w, "publish", "sig/acme", "--type", "signal", "--data",
                           json.dumps({"n": 2, "note": SECRET_WORD}))
        ok(res)
        assert SECRET_WORD not in res.out
        raw: list[str] = []
        for _ in range(2):
            frame = await asyncio.wait_for(sub.recv(), 5)
            raw.append(frame)
        pushes = [json.loads(f) for f in raw]
        assert all(SECRET_WORD not in f for f in raw)
        for p in pushes:
            assert p["type"] == "message" and p["channel"] == "sig/acme" and p["enc"] == "A256GCM"
            assert set(p["data"]) == {"kid", "iv", "ct"} and p["data"]["kid"] == "k1"
            assert len(unb64url(p["data"]["iv"])) == 12 and "=" not in p["data"]["ct"]
            assert p["msg_type"] == "signal" and p["priority"] == "normal"  # metadata stays in clear
        assert decrypt(key, "sig/acme", pushes[0]["data"]) == {"px": 1.08, "note": SECRET_WORD}
        assert decrypt(key, "sig/acme", pushes[1]["data"]) == {"n": 2, "note": SECRET_WORD}
        assert pushes[0]["data"]["iv"] != pushes[1]["data"]["iv"]  # a fresh nonce per message
        await sub.send(json.dumps({"op": "history", "id": 3, "channel": "sig"}))
        hist_raw = await asyncio.wait_for(sub.recv(), 5)
        hist = json.loads(hist_raw)
        assert hist["ok"] and len(hist["result"]["messages"]) == 2, hist
        assert SECRET_WORD not in hist_raw
        assert [m["data"] for m in hist["result"]["messages"]] == [p["data"] for p in pushes]  # stored as sent
        assert all(m["enc"] == "A256GCM" for m in hist["result"]["messages"])
    async with w.connect("frontend", make_token("carol", "acme")) as late:
        await welcome(late)
        await late.send(json.dumps({"op": "subscribe", "id": 1, "channel": "sig", "history": {"limit": 10}}))
        frames = []
        while len(frames) < 3:  # the reply and the two replayed messages, in whatever order the server sends them
            frames.append(await asyncio.wait_for(late.recv(), 5))
        assert all(SECRET_WORD not in f for f in frames)
        replayed = [json.loads(f) for f in frames if json.loads(f).get("type") == "message"]
        assert [decrypt(key, "sig/acme", m["data"])["note"] for m in replayed] == [SECRET_WORD] * 2
    # the operator's view holds the envelope too
    hist = ok(await awsctl(w, "--json", "history", "sig/acme"))
    assert SECRET_WORD not in hist.out and "A256GCM" in hist.out


async def test_plain_groups_and_operator_deliveries_stay_plain(wsd_factory, key1):
    """Only the encrypted group is encrypted: a plain group's push has no enc, and `wsctl broadcast` / `send`
    (no channel group) are delivered as given, as documented."""
    path, _ = key1
    w = wsd_factory(config({"k1": path}, "k1"))
    async with w.connect("frontend", make_token("bob", "acme")) as sub:
        hello = await welcome(sub)
        assert (await request(sub, {"op": "subscribe", "id": 1, "channel": "plain"}))["ok"]
        ok(await awsctl(w, "publish", "plain/acme", "--data", '{"x": 1}'))
        m = await recv_until(sub, lambda f: f.get("type") == "message")
        assert "enc" not in m and m["data"] == {"x": 1}
        ok(await awsctl(w, "broadcast", "--data", '{"b": 1}'))
        m = await recv_until(sub, lambda f: f.get("type") == "message")
        assert "enc" not in m and m["data"] == {"b": 1}
        ok(await awsctl(w, "send", hello["connection_id"], "--data", '{"s": 1}'))
        m = await recv_until(sub, lambda f: f.get("type") == "message")
        assert "enc" not in m and m["data"] == {"s": 1}


async def test_data_schema_checks_the_plaintext_before_encryption(wsd_factory, key1):
    path, key = key1
    schema = 'data_schema = { type = "object", required = ["px"], properties = { px = { type = "number" } } }'
    w = wsd_factory(config({"k1": path}, "k1").replace('encrypt = "k1"', f'encrypt = "k1"\n{schema}'))
    async with w.connect("api", make_token("pub", "acme")) as pub, \
            w.connect("frontend", make_token("bob", "acme")) as sub:
        await welcome(pub)
        await welcome(sub)
        assert (await request(sub, {"op": "subscribe", "id": 1, "channel": "sig"}))["ok"]
        bad = await request(pub, {"op": "publish", "id": 2, "channel": "sig", "data": {"px": "x"}})
        assert not bad["ok"] and bad["error"]["code"] == "invalid_data", bad
        good = await request(pub, {"op": "publish", "id": 3, "channel": "sig", "data": {"px": 2}})
        assert good["ok"], good
        m = await recv_until(sub, lambda f: f.get("type") == "message")
        assert m["offset"] == good["result"]["offset"] and decrypt(key, "sig/acme", m["data"]) == {"px": 2}


# ----------------------------------------------------------------------------------------------------- the client


async def test_python_client_decrypts_live_and_history(wsd_factory, key1):
    path, key = key1
    w = wsd_factory(config({"k1": path}, "k1"))
    url = w.url("frontend")
    async with Client(url, make_token("bob", "acme"), keys={"k1": key}, **FAST) as c, \
            Client(w.url("api"), make_token("pub", "acme"), **FAST) as p:
        sub = await c.subscribe("sig")
        await p.publish("sig", {"px": 1, "note": SECRET_WORD}, type="signal")
        m = await asyncio.wait_for(sub.__anext__(), 5)
        assert isinstance(m, Message)
        assert m.data == {"px": 1, "note": SECRET_WORD} and m.key_id == "k1" and m.decrypt_error is None
        assert m.type == "signal" and m.channel == "sig/acme"
        page = await c.history("sig")
        assert [(x.data, x.key_id, x.decrypt_error) for x in page] == [({"px": 1, "note": SECRET_WORD}, "k1", None)]
        plain = await c.subscribe("plain")
        await p.publish("plain", {"y": 1})
        m = await asyncio.wait_for(plain.__anext__(), 5)
        assert m.data == {"y": 1} and m.key_id is None and m.decrypt_error is None
    # a key given as a key file's text works the same
    async with Client(url, make_token("bob", "acme"), keys={"k1": path.read_text()}, **FAST) as c:
        page = await c.history("sig")
        assert page[0].data["note"] == SECRET_WORD


async def test_undecryptable_messages_are_yielded_marked_never_dropped(wsd_factory, key1, tmp_path):
    path, _ = key1
    w = wsd_factory(config({"k1": path}, "k1"))
    wrong = os.urandom(32)
    async with Client(w.url("frontend"), make_token("bob", "acme"), **FAST) as nokey, \
            Client(w.url("frontend"), make_token("bob", "acme"), keys={"k1": wrong}, **FAST) as badkey, \
            Client(w.url("api"), make_token("pub", "acme"), **FAST) as p:
        s1, s2 = await nokey.subscribe("sig"), await badkey.subscribe("sig")
        for n in range(3):
            await p.publish("sig", {"n": n, "note": SECRET_WORD})
        got1 = [await asyncio.wait_for(s1.__anext__(), 5) for _ in range(3)]
        got2 = [await asyncio.wait_for(s2.__anext__(), 5) for _ in range(3)]
        assert [m.offset for m in got1] == [m.offset for m in got2] == [1, 2, 3]  # none dropped, in order
        for m in got1:
            assert m.decrypt_error == "no key for kid 'k1'" and m.key_id == "k1"
            assert set(m.data) == {"kid", "iv", "ct"} and SECRET_WORD not in json.dumps(m.data)
        for m in got2:
            assert m.decrypt_error == "authentication failed" and m.key_id == "k1"
        page = await badkey.history("sig")
        assert [x.decrypt_error for x in page] == ["authentication failed"] * 3
        assert nokey.duplicates_dropped == 0 and nokey.gaps == 0


def test_client_refuses_a_key_that_is_not_32_bytes():
    with pytest.raises(ValueError, match=r"keys\['k1'\]: an AES-256 key is 32 bytes"):
        Client("ws://127.0.0.1:1/ws", "t", keys={"k1": b"short"})
    with pytest.raises(ValueError, match=r"keys\['k1'\]: not base64"):
        Client("ws://127.0.0.1:1/ws", "t", keys={"k1": "not base64!"})


def test_aad_binds_the_channel_and_envelopes_are_checked():
    """Unit test of the client's decrypt against the daemon's sealer: a ciphertext moved to another channel (or
    altered) does not authenticate; a broken envelope is "malformed"; nothing raises."""
    key = os.urandom(32)
    env = Sealer("k1", key).seal("sig/acme", {"px": 1.08, "s": "é"})
    keys = prepare_keys({"k1": key})
    assert open_envelope(keys, "sig/acme", "A256GCM", env) == ({"px": 1.08, "s": "é"}, "k1", None)
    assert open_envelope(keys, "sig/evil", "A256GCM", env) == (env, "k1", "authentication failed")
    ct = bytearray(unb64url(env["ct"]))
    ct[0] ^= 1
    flipped = dict(env, ct=base64.urlsafe_b64encode(bytes(ct)).rstrip(b"=").decode())
    assert open_envelope(keys, "sig/acme", "A256GCM", flipped)[2] == "authentication failed"
    other_iv = dict(env, iv=base64.urlsafe_b64encode(os.urandom(12)).rstrip(b"=").decode())
    assert open_envelope(keys, "sig/acme", "A256GCM", other_iv)[2] == "authentication failed"
    for broken in ({"kid": "k1", "iv": "@@", "ct": env["ct"]}, {"kid": "k1", "iv": env["iv"]},
                   {"kid": "k1", "iv": env["iv"][:8], "ct": env["ct"]}, {"kid": "k1", "iv": env["iv"], "ct": 5}):
        assert open_envelope(keys, "sig/acme", "A256GCM", broken) == (broken, "k1", "malformed")
    for broken in ("text", None, [1], {"iv": env["iv"], "ct": env["ct"]}, {"kid": 3}):
        assert open_envelope(keys, "sig/acme", "A256GCM", broken) == (broken, None, "malformed")
    assert open_envelope(keys, "sig/acme", "A128CBC", env) == (env, "k1", "malformed")  # as the JS client says
    # the daemon writes base64url without padding: padding or another alphabet is malformed (as in the JS client)
    for iv in (env["iv"] + "=", env["iv"].replace("-", "+").replace("_", "/") + "+/", " " + env["iv"],
               env["iv"][:8] + "!" + env["iv"][8:]):
        assert open_envelope(keys, "sig/acme", "A256GCM", dict(env, iv=iv))[2] == "malformed", iv
    assert open_envelope(keys, "sig/acme", None, {"kid": "k1"}) == ({"kid": "k1"}, None, None)  # plain stays plain
    assert "key" not in repr(Sealer("k1", key)).replace("kid", "")


# ----------------------------------------------------------------------------------------------------- rotation


async def test_sighup_rotates_the_key_id_and_old_messages_stay_readable(wsd_factory, key1, tmp_path):
    path1, key_1 = key1
    path2 = tmp_path / "k2.key"
    key_2 = keygen(path2)
    w = wsd_factory(config({"k1": path1}, "k1"))
    async with Client(w.url("api"), make_token("pub", "acme"), **FAST) as p:
        await p.publish("sig", {"n": 1})
        w.config_path.write_text(w.config_path.read_text().replace('encrypt = "k1"', 'encrypt = "k2"')
                                 .replace(f'"k1" = "{path1}"', f'"k1" = "{path1}"\n"k2" = "{path2}"'))
        w.signal(signal.SIGHUP)

        async def rotated() -> bool:
            return (await w.ctl("config.get"))["config"]["channels"]["sig"]["encrypt"] == "k2"

        await wait_for(rotated, 10)
        await p.publish("sig", {"n": 2})
    async with Client(w.url("frontend"), make_token("bob", "acme"), keys={"k1": key_1, "k2": key_2}, **FAST) as c:
        page = await c.history("sig")
        assert [(m.data, m.key_id, m.decrypt_error) for m in page] == [({"n": 1}, "k1", None), ({"n": 2}, "k2", None)]
    async with Client(w.url("frontend"), make_token("bob", "acme"), keys={"k2": key_2}, **FAST) as c:
        page = await c.history("sig")
        assert [(m.key_id, m.decrypt_error) for m in page] == [("k1", "no key for kid 'k1'"), ("k2", None)]


async def test_a_reload_with_a_bad_key_is_refused_and_encryption_goes_on(wsd_factory, key1, tmp_path):
    path1, key_1 = key1
    w = wsd_factory(config({"k1": path1}, "k1"))
    bad = tmp_path / "bad.key"
    bad.write_text(base64.b64encode(os.urandom(16)).decode())
    bad.chmod(0o600)
    w.config_path.write_text(w.config_path.read_text().replace('encrypt = "k1"', 'encrypt = "k2"')
                             .replace(f'"k1" = "{path1}"', f'"k1" = "{path1}"\n"k2" = "{bad}"'))
    res = await awsctl(w, "reload")
    assert res.rc != 0
    assert f'encryption.keys.k2: "{bad}" is the base64 of 16 bytes, not 32' in res.err + res.out
    assert base64.b64encode(key_1).decode() not in res.err + res.out
    async with Client(w.url("api"), make_token("pub", "acme"), **FAST) as p:
        await p.publish("sig", {"n": 1})
    async with Client(w.url("frontend"), make_token("bob", "acme"), keys={"k1": key_1}, **FAST) as c:
        page = await c.history("sig")
        assert [(m.data, m.key_id) for m in page] == [({"n": 1}, "k1")]


async def test_a_reload_that_changes_the_key_behind_an_id_is_refused(wsd_factory, key1):
    """An overwritten key file would make the history written under its id unreadable: a key id names one key."""
    path1, key_1 = key1
    w = wsd_factory(config({"k1": path1}, "k1"))
    path1.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    res = await awsctl(w, "reload")
    assert res.rc != 0
    assert f'encryption.keys.k1: "{path1}" holds another key than the one running under this id' in res.err + res.out
    w.signal(signal.SIGHUP)  # the same refusal, logged

    async def logged() -> bool:
        return w.log().count("holds another key than the one running under this id") >= 2

    await wait_for(logged, 10)
    async with Client(w.url("api"), make_token("pub", "acme"), **FAST) as p:
        await p.publish("sig", {"n": 1})
    async with Client(w.url("frontend"), make_token("bob", "acme"), keys={"k1": key_1}, **FAST) as c:
        page = await c.history("sig")
        assert [(m.data, m.decrypt_error) for m in page] == [({"n": 1}, None)]  # still the running key


# ----------------------------------------------------------------------------------------------------- Redis


async def test_redis_holds_only_ciphertext(wsd_factory, key1, tmp_path):
    """What Redis stores (every key, read by type) and carries on its bus holds no plaintext of an encrypted group;
    the same check finds a plain group's message, so it would catch a leak; a second node delivers and replays."""
    if not shutil.which("redis-server"):
        tool_missing(REDIS_MISSING)
    from tests.chaos import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        path, key = key1
        prefix = "t" + secrets.token_hex(3)
        engine = f'[engine]\ntype = "redis"\nurl = "{server.url}"\nprefix = "{prefix}"\n'
        a = wsd_factory(config({"k1": path}, "k1", engine))
        b = wsd_factory(config({"k1": path}, "k1", engine))
        import redis.asyncio as aredis

        spy = aredis.Redis(host="127.0.0.1", port=server.port)
        bus: list[bytes] = []
        ps = spy.pubsub()
        await ps.psubscribe("*")

        async def listen() -> None:
            async for m in ps.listen():
                if m.get("type") == "pmessage":
                    bus.append(m["data"])

        listener = asyncio.create_task(listen())
        try:
            async with Client(b.url("frontend"), make_token("bob", "acme"), keys={"k1": key}, **FAST) as c, \
                    Client(a.url("api"), make_token("pub", "acme"), **FAST) as p:
                sub = await c.subscribe("sig")
                await p.publish("sig", {"note": SECRET_WORD})
                m = await asyncio.wait_for(sub.__anext__(), 10)
                assert m.data == {"note": SECRET_WORD} and m.key_id == "k1"  # delivered by the other node
                await p.publish("plain", {"note": "plain-" + SECRET_WORD})

                async def both_on_bus() -> bool:
                    return len([x for x in bus if b"A256GCM" in x or b"plain-" in x]) >= 2

                await wait_for(both_on_bus, 10)
                page = await c.history("sig")
                assert [x.data for x in page] == [{"note": SECRET_WORD}]
            stored = await dump_redis(spy)
            assert b"plain-" + SECRET_WORD.encode() in stored  # the check sees what is stored
            assert stored.replace(b"plain-" + SECRET_WORD.encode(), b"").find(SECRET_WORD.encode()) == -1
            on_bus = b"\n".join(bus)
            assert b"plain-" + SECRET_WORD.encode() in on_bus and b"A256GCM" in on_bus
            assert on_bus.replace(b"plain-" + SECRET_WORD.encode(), b"").find(SECRET_WORD.encode()) == -1
            aof = b"".join(f.read_bytes() for f in (tmp_path / "redis").rglob("*") if f.is_file())
            assert b"plain-" + SECRET_WORD.encode() in aof
            assert aof.replace(b"plain-" + SECRET_WORD.encode(), b"").find(SECRET_WORD.encode()) == -1
        finally:
            listener.cancel()
            await ps.aclose()
            await spy.aclose()
    finally:
        server.stop()


async def dump_redis(r: Any) -> bytes:
    """Every value of every key, read by its type (not DUMP: that may compress)."""
    out: list[bytes] = []
    async for k in r.scan_iter(count=1000):
        t = (await r.type(k)).decode()
        out.append(k)
        if t == "string":
            out.append(await r.get(k) or b"")
        elif t == "list":
            out += await r.lrange(k, 0, -1)
        elif t == "zset":
            out += await r.zrange(k, 0, -1)
        elif t == "set":
            out += list(await r.smembers(k))
        elif t == "hash":
            for f, v in (await r.hgetall(k)).items():
                out += [f, v]
        elif t == "stream":
            for _, fields in await r.xrange(k):
                for f, v in fields.items():
                    out += [f, v]
    assert out, "redis holds nothing: the engine wrote elsewhere"
    return b"\n".join(out)


# ----------------------------------------------------------------------------------------------------- config


def wsd_cmd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    return subprocess.run([sys.executable, "-m", "wsd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=30, env=env)


BASE = """
[auth]
secret = "0123456789abcdef0123456789abcdef0123456789"

[pools.frontend]
type = "frontend"
path = "/ws/frontend"

[channels.sig]
type = "company"
encrypt = "k1"

[channels.plain]
type = "company"

[encryption.keys]
k1 = "k1.key"
"""


def check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    f = tmp_path / "wsd.toml"
    f.write_text(text)
    p = wsd_cmd("config", "check", str(f))
    return p.returncode, [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]


def test_a_good_encryption_config_checks(tmp_path):
    keygen(tmp_path / "k1.key")
    rc, lines = check(tmp_path, BASE + """
[[routing.rules]]
id = "only-plain-data"
filter = { channels = ["plain"], expression = "msg.data.x > 1" }
target = { type = "broadcast" }
transform = { exclude_fields = ["secret"] }

[[routing.rules]]
id = "type-only"
filter = { expression = 'msg.type == "alert" and conn.pool == "frontend"' }
target = { type = "broadcast" }
""")
    assert rc == 0, lines


BAD_CONFIGS = [
    # (what, extra toml or replacement, expected line)
    ("missing file", ('k1 = "k1.key"', 'k1 = "nope.key"'), 'encryption.keys.k1: cannot read "{d}/nope.key": No such file'),
    ("directory", ('k1 = "k1.key"', 'k1 = "."'), 'encryption.keys.k1: "{d}" is not a regular file, not a key file'),
    ("not UTF-8", ('k1 = "k1.key"', 'k1 = "bin.key"'), 'encryption.keys.k1: cannot read "{d}/bin.key"'),
    ("not base64", ('k1 = "k1.key"', 'k1 = "text.key"'), 'encryption.keys.k1: "{d}/text.key" is not base64'),
    ("16 bytes", ('k1 = "k1.key"', 'k1 = "short.key"'),
     'encryption.keys.k1: "{d}/short.key" is the base64 of 16 bytes, not 32'),
    ("empty", ('k1 = "k1.key"', 'k1 = "empty.key"'), 'encryption.keys.k1: "{d}/empty.key" is empty'),
    ("open to others", ('k1 = "k1.key"', 'k1 = "open.key"'),
     'encryption.keys.k1: "{d}/open.key" is open to other users (mode 0644)'),
    ("empty path", ('k1 = "k1.key"', 'k1 = ""'), "encryption.keys.k1: must name a key file"),
    ("bad key id", ('k1 = "k1.key"', 'k1 = "k1.key"\n"a b" = "k1.key"'),
     'encryption.keys."a b": a key id is 1-64 of A-Z a-z 0-9 _ . : -'),
    ("unknown key id", ('encrypt = "k1"', 'encrypt = "k9"'), 'channels.sig.encrypt: no key "k9" in [encryption.keys]'),
    ("not a string", ('encrypt = "k1"', "encrypt = 1"), "channels.sig.encrypt: expected string"),
    ("unknown key", ('k1 = "k1.key"', 'k1 = "k1.key"\n[encryption.more]'), "encryption.more: unknown key"),
    ("expression reads data", "filter = { expression = 'msg.data.x > 1' }",
     "routing.rules[0].filter.expression: reads msg.data, but channel group sig (encrypt = \"k1\") is encrypted"),
    ("expression reads msg whole", "filter = { channels = ['sig/acme'], expression = 'len(msg) > 1' }",
     "routing.rules[0].filter.expression: reads msg.data, but channel group sig"),
    ("transform", "filter = { channels = ['sig'] }\ntransform = { rename = { a = 'b' } }",
     "routing.rules[0].transform: changes data, but channel group sig (encrypt = \"k1\") is encrypted"),
    ("pool transform", "pool_transforms = { frontend = { set = { a = 1 } } }",
     "routing.rules[0].pool_transforms.frontend: changes data, but channel group sig"),
]


@pytest.mark.parametrize("what,change,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_each_bad_encryption_config_is_refused_naming_the_key(tmp_path, what, change, expected):
    keygen(tmp_path / "k1.key")
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe\x00")
    for name, text in (("text.key", "not base64 at all!"), ("short.key", base64.b64encode(os.urandom(16)).decode()),
                       ("empty.key", "  \n"), ("open.key", base64.b64encode(os.urandom(32)).decode())):
        (tmp_path / name).write_text(text)
    for name in ("bin.key", "text.key", "short.key", "empty.key"):
        (tmp_path / name).chmod(0o600)
    (tmp_path / "open.key").chmod(0o644)
    if isinstance(change, tuple):
        text = BASE.replace(*change)
    else:
        text = BASE + f'\n[[routing.rules]]\nid = "r"\ntarget = {{ type = "broadcast" }}\n{change}\n'
    rc, lines = check(tmp_path, text)
    assert rc == 1
    want = expected.format(d=tmp_path)
    assert any(want in line for line in lines), lines
    assert len(lines) == 1, lines  # one line: the problem, with its key path


def test_the_commented_example_in_the_default_config_works_once_uncommented(tmp_path):
    """What `wsd config init` writes carries a commented [encryption] example and a group's `encrypt`: uncommented
    (with a key file made by `wsd keygen`), it checks and encrypts trading-signals with that key id, as
    docs/configuration.md describes."""
    from wsd.config import default_config_toml, load_config

    text = default_config_toml("s" * 64)
    path = tmp_path / "2026-12.key"
    keygen(path)
    lines = text.splitlines()
    wanted = ('# encrypt = "2026-12"', "# [encryption.keys]", '# "2026-12" = "/etc/wsd/keys/2026-12.key"')
    example = [i for i, line in enumerate(lines) if line.startswith(wanted)]
    assert len(example) == 3, "the commented encryption example in default.toml changed"
    for i in example:
        lines[i] = lines[i][2:].replace("/etc/wsd/keys/2026-12.key", str(path))
    uncommented = "\n".join(lines) + "\n"
    f = tmp_path / "wsd.toml"
    f.write_text(uncommented)
    cfg = load_config(f, env={})
    assert cfg.channels["trading-signals"].encrypt == "2026-12"
    assert cfg.encryption.keys == {"2026-12": str(path)}
    assert wsd_cmd("config", "check", str(f)).returncode == 0
    assert load_config(None, env={}).encryption.keys == {}  # commented out: off by default


def test_the_environment_cannot_set_encryption(tmp_path):
    keygen(tmp_path / "k1.key")
    f = tmp_path / "wsd.toml"
    f.write_text(BASE)
    env = dict(os.environ, WSD_ENCRYPTION_KEYS_K1="/tmp/x")
    p = subprocess.run([sys.executable, "-m", "wsd", "config", "check", str(f)], capture_output=True, text=True,
                       cwd=ROOT, timeout=30, env=env)
    assert p.returncode == 1 and "WSD_ENCRYPTION_KEYS_K1: [encryption] cannot be set from the environment" in p.stderr


async def test_keys_never_show_in_config_output(wsd_factory, key1):
    path, key = key1
    text = path.read_text().strip()
    w = wsd_factory(config({"k1": path}, "k1"))
    shown = wsd_cmd("config", "show", "-c", str(w.config_path))
    assert shown.returncode == 0, shown.stderr
    assert str(path) in shown.stdout and text not in shown.stdout  # the file is named, its key never shown
    for args in (("config",), ("--json", "config")):
        r = ok(await awsctl(w, *args))
        assert str(path) in r.out and text not in r.out
    raw = await w.ctl("config.get")
    assert text not in json.dumps(raw) and key.hex() not in json.dumps(raw)
    # a traced publication reports receivers, not data; the log never holds plaintext or key
    traced = ok(await awsctl(w, "--json", "publish", "sig/acme", "--trace", "--data", json.dumps({"n": SECRET_WORD})))
    assert traced.json()["offset"] == 1 and SECRET_WORD not in traced.out
    assert text not in w.log() and SECRET_WORD not in w.log()


# ----------------------------------------------------------------------------------------------------- keygen


def test_keygen_writes_a_0600_key_and_never_overwrites(tmp_path):
    path = tmp_path / "a.key"
    p = wsd_cmd("keygen", str(path))
    assert p.returncode == 0 and p.stdout.strip() == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert len(base64.b64decode(text.strip(), validate=True)) == 32 and text.strip() not in p.stdout + p.stderr
    again = wsd_cmd("keygen", str(path))
    assert again.returncode == 1 and again.stderr.startswith(f"wsd: error: {path} already exists")
    assert path.read_text() == text
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    assert wsd_cmd("keygen", str(link)).returncode == 1 and not (tmp_path / "elsewhere").exists()
    p = wsd_cmd("keygen", str(tmp_path / "no" / "dir.key"))
    assert p.returncode == 1 and "cannot create" in p.stderr and len(p.stderr.splitlines()) == 1
    assert wsd_cmd("keygen").returncode == 2


async def test_a_refused_publication_to_an_encrypted_group_leaves_no_plaintext_in_the_audit_file(wsd_factory, key1):
    """jsonschema's messages quote the offending value ("'...' is not of type 'integer'"): for an encrypted group
    the audit record names the path and the failed keyword only, so the audit file never holds its plaintext; the
    publisher (who sent the value) still gets the full reason."""
    path, _ = key1
    schema = ('data_schema = { type = "object", properties = { note = { type = "integer" }, '
              'p = { type = "string", pattern = "^a$" } } }')
    text = config({"k1": path}, "k1").replace('encrypt = "k1"', f'encrypt = "k1"\n{schema}')
    text = text.replace("[channels.plain]\n", f"[channels.plain]\n{schema}\n") + '\n[audit]\npath = "audit.log"\n'
    w = wsd_factory(text)
    audit = w.workdir / "audit.log"
    async with w.connect("api", make_token("pub", "acme")) as pub:
        await welcome(pub)
        for i, data in enumerate(({"note": SECRET_WORD}, {"p": SECRET_WORD})):
            bad = await request(pub, {"op": "publish", "id": i, "channel": "sig", "data": data})
            assert bad["error"]["code"] == "invalid_data" and SECRET_WORD in bad["error"]["message"], bad
        bad = await request(pub, {"op": "publish", "id": 9, "channel": "plain", "data": {"note": "visible-1"}})
        assert bad["error"]["code"] == "invalid_data", bad
    res = await awsctl(w, "publish", "sig/acme", "--data", json.dumps({"note": SECRET_WORD}))
    assert res.rc != 0 and SECRET_WORD in res.err  # the operator typed it

    def records() -> list[dict[str, Any]]:
        if not audit.exists():
            return []
        return [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("event") == "invalid_data"]

    await wait_for(lambda: _true(len(records()) == 4))
    assert SECRET_WORD not in audit.read_text()
    sig = [r for r in records() if r["channel"] == "sig/acme"]
    assert [r["path"] for r in sig] == ["$.note", "$.p", "$.note"]
    assert "integer" in sig[0]["reason"] and "pattern" in sig[1]["reason"]
    plain = [r for r in records() if r["channel"] == "plain/acme"]
    assert "visible-1" in plain[0]["reason"]  # plain groups keep jsonschema's own words


async def _true(v: bool) -> bool:
    return v


def test_a_key_written_in_place_of_its_file_is_refused_without_showing_it(tmp_path):
    """A careless operator pastes the key itself where the key file's path goes: the check says so and never
    prints the value (it would end in logs, `wsctl reload` replies and the journal)."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    for value in (key, "/" + key[1:]):
        code, lines = check(tmp_path, BASE.replace('k1 = "k1.key"', f'k1 = "{value}"'))
        assert code != 0
        text = "\n".join(lines)
        assert value not in text and value[1:20] not in text, text
        assert any(line.startswith("error: encryption.keys.k1:") and "key itself" in line for line in lines), lines
