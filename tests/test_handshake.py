"""The handshake through real sockets: every refusal (status + JSON body before any frame), every token
source, the welcome of each pool, compression per pool, and the plain-HTTP endpoints on the same port."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect

from tests.harness import BASE_CONFIG, SECRET, Wsd, make_token, welcome
from tests.rawws import RawWs

POOLS = """
[pools.frontend]
type = "frontend"
path = "/ws/frontend"
default_subscriptions = ["system-status"]
compression = true

[pools.mt5]
type = "mt5_client"
path = "/ws/mt5"
allowed_origins = []
compression = false
batching = { enabled = false }

[pools.admin]
type = "admin"
path = "/ws/admin"
roles = ["admin"]

[pools.api]
type = "api"
path = "/ws/api"

[pools.lan]
type = "api"
path = "/ws/lan"
allow_cidrs = ["10.0.0.0/8"]

[pools.web]
type = "frontend"
path = "/ws/web"
allowed_origins = ["https://app.example.com"]

[pools.tiny]
type = "api"
path = "/ws/tiny"
max_connections = 1
"""


def _start(tmp: Path, text: str, env: dict[str, str] | None = None) -> Wsd:
    tmp.mkdir(parents=True, exist_ok=True)
    return Wsd(tmp, text, env=env).start()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wsd]:
    """One daemon for the stateless refusals: seven pools, tokens capped at 1024 bytes."""
    w = _start(tmp_path_factory.mktemp("gw"), BASE_CONFIG + POOLS, env={"WSD_AUTH_MAX_TOKEN_BYTES": "1024"})
    yield w
    assert w.stop() == 0


async def refused(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any],
                                                                                        dict[str, str]]:
    """Upgrade over a raw socket; assert a plain HTTP refusal with a JSON body and no frame after it."""
    raw = await RawWs.open(port, target, headers)
    try:
        assert raw.status != 101, "the handshake was accepted"
        assert raw.headers["content-type"].startswith("application/json")
        body = json.loads(raw.body)
        # (pool_full also says which limit refused: "limit")
        assert set(body) - {"limit"} == {"error", "message"} and body["message"], body
        with pytest.raises(EOFError):  # nothing follows the refusal: no frame, the stream ends
            await raw.read_frame(timeout=3)
        return raw.status, body, raw.headers
    finally:
        raw.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT assembled by hand (PyJWT refuses to build the attacks we need to send)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"sub": "mallory", "company_id": "acme", "roles": [], "iat": now, "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wsd]:
    """One daemon on the embedded default pools and channels (no [pools] in its file)."""
    w = _start(tmp_path_factory.mktemp("defaults"), BASE_CONFIG)
    yield w
    assert w.stop() == 0


# -- 404 and 401 -------------------------------------------------------------------------------------------


async def test_unknown_pool_path_is_404(gw):
    """A path that is no pool's is refused 404 no_such_pool, even with a good token."""
    status, body, _ = await refused(gw.port, f"/ws/nope?token={make_token()}")
    assert (status, body["error"]) == (404, "no_such_pool")


async def test_missing_token_is_401(gw):
    """No token in any of the three places: 401 missing_token."""
    status, body, _ = await refused(gw.port, "/ws/frontend")
    assert (status, body["error"]) == (401, "missing_token")


async def test_bad_signature_is_401(gw):
    """A token signed with another key: 401 invalid_token."""
    token = make_token(secret="another-secret-that-is-long-enough-0123456789")
    status, body, _ = await refused(gw.port, "/ws/frontend", bearer(token))
    assert (status, body["error"]) == (401, "invalid_token")


async def test_expired_token_is_401(gw):
    """A token expired beyond the leeway: 401 token_expired."""
    status, body, _ = await refused(gw.port, "/ws/frontend", bearer(make_token(ttl=-120)))
    assert (status, body["error"]) == (401, "token_expired")


async def test_alg_none_token_is_401(gw):
    """An unsigned `alg: none` token is refused although its claims are fine."""
    token = hand_made_token({"alg": "none", "typ": "JWT"}, claims(), None)
    status, body, _ = await refused(gw.port, "/ws/frontend", bearer(token))
    assert (status, body["error"]) == (401, "invalid_token")


async def test_token_without_exp_is_401(gw):
    """A correctly signed token with no `exp` is refused: exp is required."""
    token = jwt.encode(claims(exp=None), SECRET, algorithm="HS256")
    status, body, _ = await refused(gw.port, "/ws/frontend", bearer(token))
    assert (status, body["error"]) == (401, "invalid_token") and "exp" in body["message"]


async def test_oversized_token_is_401(gw):
    """A correctly signed token larger than auth.max_token_bytes (1024 here) is refused unread."""
    token = make_token(padding="x" * 1500)
    assert len(token) > 1024
    status, body, _ = await refused(gw.port, f"/ws/frontend?token={token}")
    assert (status, body["error"]) == (401, "invalid_token") and "1024" in body["message"]


async def test_request_too_large_for_http_is_refused_with_json(defaults):
    """A token too big for an HTTP header line (10 KB) is refused 431 (414 in the query) with a JSON body."""
    token = make_token(padding="x" * 10000)
    status, body, _ = await refused(defaults.port, "/ws/frontend", bearer(token))
    assert (status, body["error"]) == (431, "request_too_large")
    status, body, _ = await refused(defaults.port, f"/ws/frontend?token={token}")
    assert (status, body["error"]) == (414, "request_too_large")


async def test_plain_http_get_on_a_pool_is_refused_with_json(defaults):
    """A GET without the Upgrade headers on a pool path gets 426 with a JSON body, not a frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", defaults.port)
    try:
        writer.write(f"GET /ws/api?token={make_token()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
        assert head.startswith("HTTP/1.1 426") and "application/json" in head
        body = json.loads(await asyncio.wait_for(reader.read(), 5))
        assert body["error"] == "upgrade_required" and body["message"]
    finally:
        writer.close()


async def test_future_nbf_is_401(gw):
    """A token whose nbf is beyond the leeway in the future is not valid yet."""
    token = make_token(nbf=int(time.time()) + 600)
    status, body, _ = await refused(gw.port, "/ws/frontend", bearer(token))
    assert (status, body["error"]) == (401, "invalid_token")


async def test_wrong_issuer_and_audience_are_401(wsd_factory):
    """With issuer and audience configured, a wrong or missing iss/aud is refused; the right pair passes."""
    w = wsd_factory(env={"WSD_AUTH_ISSUER": "https://idp.example", "WSD_AUTH_AUDIENCE": "wsd"})
    good = {"iss": "https://idp.example", "aud": "wsd"}
    for extra in ({**good, "iss": "https://evil.example"}, {**good, "aud": "other"}, {"aud": "wsd"},
                  {"iss": "https://idp.example"}):
        status, body, _ = await refused(w.port, "/ws/frontend", bearer(make_token(**extra)))
        assert (status, body["error"]) == (401, "invalid_token"), extra
    async with w.connect(token=make_token(**good)) as ws:
        assert (await welcome(ws))["user_id"] == "alice"


async def test_hs_rs_confusion_is_401(wsd_factory, tmp_path):
    """An RS256 daemon refuses an HS256 token whose HMAC key is its own public key PEM; RS256 works."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    (tmp_path / "pub.pem").write_bytes(pub)
    base = BASE_CONFIG.replace('algorithms = ["HS256"]', 'algorithms = ["RS256"]').replace(
        f'secret = "{SECRET}"', f'public_key_file = "{tmp_path / "pub.pem"}"')
    w = wsd_factory(base=base)
    forged = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(), pub)
    status, body, _ = await refused(w.port, "/ws/frontend", bearer(forged))
    assert (status, body["error"]) == (401, "invalid_token")
    real = jwt.encode(claims(sub="bob"), priv, algorithm="RS256")
    async with w.connect(token=real) as ws:
        assert (await welcome(ws))["user_id"] == "bob"


# -- 403 ---------------------------------------------------------------------------------------------------


async def test_ip_outside_pool_cidrs_is_403(gw):
    """A pool that allows only 10.0.0.0/8 refuses 127.0.0.1 with 403 ip_not_allowed."""
    status, body, _ = await refused(gw.port, "/ws/lan", bearer(make_token()))
    assert (status, body["error"]) == (403, "ip_not_allowed")


async def test_origin_not_allowed_is_403(gw):
    """A pool with an Origin allowlist refuses another Origin (403) and admits a listed one."""
    headers = {**bearer(make_token()), "Origin": "https://evil.example"}
    status, body, _ = await refused(gw.port, "/ws/web", headers)
    assert (status, body["error"]) == (403, "origin_not_allowed")
    async with gw.connect("web", make_token(), origin="https://app.example.com") as ws:
        assert (await welcome(ws))["pool"] == "web"


async def test_role_not_allowed_is_403(gw):
    """The admin pool refuses a token without the admin role."""
    status, body, _ = await refused(gw.port, "/ws/admin", bearer(make_token(roles=["trader"])))
    assert (status, body["error"]) == (403, "role_not_allowed")


async def test_pool_claim_for_another_pool_is_403(gw):
    """A token restricted to the mt5 pool cannot open the frontend pool."""
    status, body, _ = await refused(gw.port, "/ws/frontend", bearer(make_token(pool="mt5")))
    assert (status, body["error"]) == (403, "pool_not_allowed")


# -- 429 ---------------------------------------------------------------------------------------------------


async def _open_and_close(w: Wsd, token: str, n: int) -> None:
    for _ in range(n):
        async with w.connect(token=token) as ws:
            await welcome(ws)


async def test_user_connection_rate_is_429_with_retry_after(wsd_factory):
    """connections_per_user_per_minute=2: the third attempt in a minute is 429 with Retry-After."""
    w = wsd_factory(env={"WSD_LIMITS_CONNECTIONS_PER_USER_PER_MINUTE": "2"})
    await _open_and_close(w, make_token("alice"), 2)
    status, body, headers = await refused(w.port, "/ws/frontend", bearer(make_token("alice")))
    assert (status, body["error"]) == (429, "rate_limited")
    assert 1 <= int(headers["retry-after"]) <= 60
    async with w.connect(token=make_token("bob")) as ws:  # another user is not limited
        await welcome(ws)


async def test_ip_connection_rate_is_429_with_retry_after(wsd_factory):
    """connections_per_ip_per_minute=3: the fourth attempt from 127.0.0.1 is 429 with Retry-After."""
    w = wsd_factory(env={"WSD_LIMITS_CONNECTIONS_PER_IP_PER_MINUTE": "3"})
    for user in ("u1", "u2", "u3"):
        await _open_and_close(w, make_token(user), 1)
    status, body, headers = await refused(w.port, "/ws/frontend", bearer(make_token("u4")))
    assert (status, body["error"]) == (429, "rate_limited")
    assert 1 <= int(headers["retry-after"]) <= 60


async def test_max_connections_per_user_is_429(wsd_factory):
    """max_connections_per_user=1: a second open connection of the same user is 429."""
    w = wsd_factory(env={"WSD_LIMITS_MAX_CONNECTIONS_PER_USER": "1"})
    async with w.connect(token=make_token("alice")) as ws:
        await welcome(ws)
        status, body, headers = await refused(w.port, "/ws/api", bearer(make_token("alice")))
        assert (status, body["error"]) == (429, "too_many_connections") and "retry-after" in headers


# -- 503 ---------------------------------------------------------------------------------------------------


async def test_pool_full_is_503(gw):
    """A pool with max_connections=1 refuses the second connection with 503 pool_full."""
    async with gw.connect("tiny", make_token("t1")) as ws:
        await welcome(ws)
        status, body, _ = await refused(gw.port, "/ws/tiny", bearer(make_token("t2")))
        assert (status, body["error"], body["limit"]) == (503, "pool_full", "ceiling")
        assert "ceiling of 1" in body["message"]


async def test_manager_full_is_503(wsd_factory):
    """manager.max_connections=1 refuses a second connection in any pool with 503 manager_full."""
    # (pools that reserve nothing: the built-in mt5 pool reserves more than 1)
    w = wsd_factory('[pools.frontend]\ntype = "frontend"\npath = "/ws/frontend"\n'
                    '[pools.api]\ntype = "api"\npath = "/ws/api"\n', env={"WSD_MANAGER_MAX_CONNECTIONS": "1"})
    async with w.connect(token=make_token("a")) as ws:
        await welcome(ws)
        status, body, _ = await refused(w.port, "/ws/api", bearer(make_token("b")))
        assert (status, body["error"]) == (503, "manager_full")


# -- token sources and the request target ------------------------------------------------------------------


async def test_token_in_authorization_header(gw):
    """`Authorization: Bearer <jwt>` authenticates, and the connection records the header as its source."""
    headers = bearer(make_token("hdr"))
    async with connect(gw.url("frontend"), additional_headers=headers, open_timeout=5) as ws:
        w = await welcome(ws)
        info = (await gw.ctl("connections.get", id=w["connection_id"]))["info"]
        assert w["user_id"] == "hdr" and info["token_source"] == "header"


async def test_token_in_query(gw):
    """`?token=<jwt>` authenticates."""
    async with gw.connect(token=make_token("qry")) as ws:
        w = await welcome(ws)
        info = (await gw.ctl("connections.get", id=w["connection_id"]))["info"]
        assert w["user_id"] == "qry" and info["token_source"] == "query"


async def test_token_in_subprotocol_echoes_wsd_v1_only(gw):
    """A browser offering ["wsd.v1", "bearer.<jwt>"] is admitted and the server echoes wsd.v1 only."""
    token = make_token("sub")
    async with connect(gw.url("frontend"), subprotocols=["wsd.v1", f"bearer.{token}"], open_timeout=5) as ws:
        w = await welcome(ws)
        assert w["user_id"] == "sub"
        assert ws.subprotocol == "wsd.v1"
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "wsd.v1"
        assert token not in str(ws.response.headers)
        info = (await gw.ctl("connections.get", id=w["connection_id"]))["info"]
        assert info["token_source"] == "subprotocol" and info["subprotocol"] == "wsd.v1"


async def test_absolute_form_request_target_reaches_mt5_pool(gw):
    """`GET ws://127.0.0.1:PORT/ws/mt5?token=... HTTP/1.1` (MQL5 style) is a 101 into the mt5 pool."""
    raw = await RawWs.open(gw.port, f"ws://127.0.0.1:{gw.port}/ws/mt5?token={make_token('mt5user')}")
    try:
        assert raw.status == 101
        w = await raw.read_json()
        assert w["type"] == "welcome" and w["pool"] == "mt5" and w["user_id"] == "mt5user"
    finally:
        raw.close()


# -- welcome per pool --------------------------------------------------------------------------------------

WELCOME_FIELDS = {"type", "connection_id", "session_id", "pool", "user_id", "company_id", "heartbeat_ms",
                  "subscriptions"}


@pytest.mark.parametrize(("pool", "roles"),
                         [("frontend", []), ("mt5", []), ("admin", ["admin"]), ("api", [])])
async def test_welcome_in_each_default_pool(defaults, pool, roles):
    """Each of the four default pools greets with the welcome fields of docs/protocol.md."""
    async with defaults.connect(pool, make_token("wel", "acme", roles=roles)) as ws:
        w = await welcome(ws)
    assert WELCOME_FIELDS <= set(w)
    assert (w["pool"], w["user_id"], w["company_id"], w["heartbeat_ms"]) == (pool, "wel", "acme", 30000)
    assert w["connection_id"] and w["session_id"] and isinstance(w["subscriptions"], list)
    if pool == "frontend":
        assert w["subscriptions"] == ["system-status"]


# -- compression -------------------------------------------------------------------------------------------


async def test_compression_negotiated_per_pool(gw):
    """A pool with compression on answers permessage-deflate; the mt5 pool (compression false) does not."""
    async with gw.connect("frontend", make_token(), compression="deflate") as ws:
        await welcome(ws)
        assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
    async with gw.connect("mt5", make_token(), compression="deflate") as ws:
        await welcome(ws)
        assert "Sec-WebSocket-Extensions" not in ws.response.headers


# -- HTTP on the same port ---------------------------------------------------------------------------------


async def http(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode().split("\r\n")
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await asyncio.wait_for(reader.readexactly(int(hdrs.get("content-length", "0"))), 5)
        return int(lines[0].split(" ", 2)[1]), hdrs, body
    finally:
        writer.close()


async def test_health_ready_and_metrics_endpoints(gw):
    """healthz and readyz answer 200, /metrics answers Prometheus text to loopback, no versioned Server."""
    for path in ("/healthz", "/readyz"):
        status, hdrs, body = await http(gw.port, path)
        assert status == 200, path
        assert "server" not in hdrs or not any(c.isdigit() for c in hdrs["server"])
    status, hdrs, body = await http(gw.port, "/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    assert b"# TYPE " in body and b"# HELP " in body
    assert "server" not in hdrs or not any(c.isdigit() for c in hdrs["server"])


async def test_metrics_refused_outside_metrics_allow(wsd_factory):
    """With http.metrics_allow = 10.0.0.0/8, /metrics from 127.0.0.1 is 403 while healthz still answers."""
    w = wsd_factory(env={"WSD_HTTP_METRICS_ALLOW": '["10.0.0.0/8"]'})
    status, _, body = await http(w.port, "/metrics")
    assert status == 403 and b"# TYPE" not in body
    assert (await http(w.port, "/healthz"))[0] == 200


async def test_accepted_handshake_has_no_versioned_server_header(gw):
    """The 101 response does not advertise a server version either."""
    raw = await RawWs.open(gw.port, f"/ws/api?token={make_token()}")
    try:
        assert raw.status == 101
        assert "server" not in raw.headers or not any(c.isdigit() for c in raw.headers["server"])
    finally:
        raw.close()

