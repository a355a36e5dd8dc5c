"""wsd behind a load balancer: Debian's nginx (X-Forwarded-For) and HAProxy (PROXY protocol v2) in front of a
real daemon, and raw sockets for what a proxy would never send (spoofed headers from untrusted peers, malformed
PROXY preambles). Linux routes all of 127.0.0.0/8 to loopback: distinct clients are distinct source addresses
(127.0.0.3, 127.0.0.4, ...), and the trusted proxy is 127.0.0.1 (nginx) or 127.0.0.2 (HAProxy, raw sockets).

nginx and haproxy missing: the tests that need them skip, and fail under WSD_CI_REQUIRE_TOOLS=1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.harness import BASE_CONFIG, Wsd, http_get, make_token, recv_json, recv_until, request, tool_missing, wait_for, welcome
from wsd.config import ConfigError, load_config
from wsd.core.proxyproto import V2_SIGNATURE

DOCS = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"


def need(tool: str) -> str:
    path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)),
                                      None)
    if path is None:
        why = f"{tool} is not installed (apt-get install {tool})"
        tool_missing(why)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/readyz", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_get(port, path, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answers {path} on port {port}")
        time.sleep(0.05)


def snippet(name: str) -> str:
    """The ```<name> block of docs/deployment.md: the tests run the configuration the docs give."""
    m = re.search(rf"```{name}\n(.*?)```", DOCS.read_text(), re.S)
    assert m, f"no ```{name} block in docs/deployment.md"
    return m.group(1)


class Proxy:
    """A proxy process (nginx, haproxy) in the foreground, stopped at the end."""

    def __init__(self, cmd: list[str], port: int, workdir: Path) -> None:
        self.port = port
        self.log_path = workdir / "proxy.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def base_toml(limits: dict[str, int] | None = None, **server: Any) -> str:
    text = BASE_CONFIG
    for k, v in (limits or {}).items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
        assert n == 1, k
    lines = [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    return text.replace("[server]\n", "[server]\n" + "\n".join(lines) + "\n", 1)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """``start(extra_toml, limits={...}, **server_keys)`` -> a running Wsd; all stopped at the end."""
    started: list[Wsd] = []

    def make(extra: str = "", limits: dict[str, int] | None = None, env: dict[str, str] | None = None,
             **server: Any) -> Wsd:
        d = tmp_path / f"wsd{len(started)}"
        d.mkdir()
        w = Wsd(d, base_toml(limits, **server) + "\n" + extra, env=env)
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.stop()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    running: list[Proxy] = []
    yield running
    for p in running:
        p.stop()


def ws_url(port: int, pool: str = "frontend", user: str = "alice", **claims: Any) -> str:
    return f"ws://127.0.0.1:{port}/ws/{pool}?token={make_token(user, **claims)}"


async def remotes(w: Wsd) -> set[str]:
    """`wsctl connections --json`: the remote_address of every connection, as the operator sees it."""
    p = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "wsctl", "--socket", w.socket,
                                                 "connections", "--json"], capture_output=True, text=True,
                                timeout=30, env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "")))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    rows = out["items"] if isinstance(out, dict) else out
    return {r["remote_address"] for r in rows}


async def refused_status(url: str, source: str, **kw: Any) -> int:
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, open_timeout=5, local_addr=(source, 0), **kw):
            pass
    return exc.value.response.status_code


def audit_records(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


# -- nginx: X-Forwarded-For ---------------------------------------------------------------------------------------
def start_nginx(tmp_path: Path, upstream: int, proxies: list[Proxy]) -> Proxy:
    nginx = need("nginx")
    root = tmp_path / "nginx"
    (root / "tmp").mkdir(parents=True)
    port = free_port()
    site = snippet("nginx").replace("127.0.0.1:8765", f"127.0.0.1:{upstream}").replace(
        "listen 80;", f"listen 127.0.0.1:{port};").replace("server_name ws.example.com;", "")
    (root / "nginx.conf").write_text(f"""
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
{site}
}}
""")
    p = Proxy([nginx, "-e", "stderr", "-p", str(root), "-c", str(root / "nginx.conf"),
               "-g", f"daemon off; pid {root}/nginx.pid; error_log stderr;"], port, root)
    proxies.append(p)
    try:
        wait_http(port)
    except TimeoutError:
        raise AssertionError(f"nginx did not come up:\n{p.log()}") from None
    return p


async def test_through_nginx_upgrade_works_and_limits_count_the_forwarded_client(start, proxies, tmp_path):
    """The documented nginx site in front of wsd trusting only nginx (127.0.0.1): the upgrade works (welcome,
    subscribe, publish, receive); connections_per_ip_per_minute = 2 counts each client behind nginx (127.0.0.3
    and 127.0.0.4 are each allowed 2, the third of 127.0.0.3 gets 429); `wsctl connections` shows the clients'
    addresses; an X-Forwarded-For a client sets itself is not believed."""
    w = start(limits={"connections_per_ip_per_minute": 2}, trusted_proxies=["127.0.0.1/32"])
    nx = start_nginx(tmp_path, w.port, proxies)
    spoof = {"additional_headers": {"X-Forwarded-For": "198.51.100.66"}}
    async with connect(ws_url(nx.port), local_addr=("127.0.0.3", 0), open_timeout=5, **spoof) as a, \
            connect(ws_url(nx.port, "api", "bob"), local_addr=("127.0.0.3", 0), open_timeout=5) as b:
        await welcome(a)
        await welcome(b)
        r = await request(a, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        assert r["ok"] and r["result"]["channel"] == "trading-signals/acme"
        r = await request(b, {"op": "publish", "id": 2, "channel": "trading-signals", "type": "t", "data": {"px": 7}})
        assert r["ok"], r
        msg = await recv_until(a, lambda m: m.get("type") == "message")
        assert msg["data"] == {"px": 7}
        assert await remotes(w) == {"127.0.0.3"}  # not nginx's 127.0.0.1, not the spoofed 198.51.100.66
        # the same client a third time: its own budget is spent
        assert await refused_status(ws_url(nx.port), "127.0.0.3") == 429
        # another client behind the same nginx has a budget of its own
        async with connect(ws_url(nx.port, user="carol"), local_addr=("127.0.0.4", 0), open_timeout=5) as c, \
                connect(ws_url(nx.port, user="dave"), local_addr=("127.0.0.4", 0), open_timeout=5) as d:
            await welcome(c)
            await welcome(d)
            assert await remotes(w) == {"127.0.0.3", "127.0.0.4"}
            assert await refused_status(ws_url(nx.port, user="erin"), "127.0.0.4") == 429
        # a ping through nginx still works on the first connection
        r = await request(a, {"op": "ping", "id": 3})
        assert r["ok"]
    assert http_get(w.port, "/healthz")[0] == 200


async def test_nginx_pool_allowlist_sees_the_forwarded_client(start, proxies, tmp_path):
    """A pool with allow_cidrs = ["127.0.0.3/32"] behind nginx: 127.0.0.3 gets in through nginx, 127.0.0.4 gets
    403 ip_not_allowed although nginx's own address (127.0.0.1) connects."""
    w = start('[pools.frontend]\ntype = "frontend"\npath = "/ws/frontend"\nallow_cidrs = ["127.0.0.3/32"]\n',
              trusted_proxies=["127.0.0.1/32"])
    nx = start_nginx(tmp_path, w.port, proxies)
    async with connect(ws_url(nx.port), local_addr=("127.0.0.3", 0), open_timeout=5) as a:
        await welcome(a)
    assert await refused_status(ws_url(nx.port), "127.0.0.4") == 403


# -- HAProxy: PROXY protocol v2 -----------------------------------------------------------------------------------
async def test_through_haproxy_proxy_protocol_v2(start, proxies, tmp_path):
    """The documented HAProxy backend (TCP mode, send-proxy-v2) from 127.0.0.2, wsd with proxy_protocol = true
    trusting 127.0.0.2: the upgrade works through it, `wsctl connections` shows each client's own address, and
    the per-IP limit counts them apart."""
    haproxy = need("haproxy")
    w = start(trusted_proxies=["127.0.0.2/32"], proxy_protocol=True)
    port = free_port()
    conf = snippet("haproxy").replace("127.0.0.1:8765", f"127.0.0.1:{w.port}").replace(
        "bind :80", f"bind 127.0.0.1:{port}")
    conf = re.sub(r"(?m)^global\n", "global\n    pidfile " + str(tmp_path / "haproxy.pid") + "\n", conf, count=1)
    conf = conf.replace("send-proxy-v2", "send-proxy-v2 source 127.0.0.2").replace("maxconn 200000", "maxconn 1000")
    conf = re.sub(r"(?m)^\s*(log|stats|chroot|user|group|daemon)\b.*\n", "", conf)
    (tmp_path / "haproxy.cfg").write_text(conf)
    hp = Proxy([haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")], port, tmp_path)
    proxies.append(hp)
    try:
        wait_http(port)
    except TimeoutError:
        raise AssertionError(f"haproxy did not come up:\n{hp.log()}\n{conf}") from None
    async with connect(ws_url(port), local_addr=("127.0.0.3", 0), open_timeout=5) as a, \
            connect(ws_url(port, user="bob"), local_addr=("127.0.0.4", 0), open_timeout=5) as b:
        await welcome(a)
        await welcome(b)
        r = await request(a, {"op": "ping", "id": 1})
        assert r["ok"]
        assert await remotes(w) == {"127.0.0.3", "127.0.0.4"}
    # the direct (untrusted) path still answers: no preamble is expected from 127.0.0.1
    assert http_get(w.port, "/readyz")[0] == 200


# -- raw sockets: what a well-behaved proxy never sends ------------------------------------------------------------
def sock_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def upgrade_request(port: int, target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response_of(s: socket.socket) -> tuple[int | None, bytes]:
    """(status, body) of the reply on ``s``; (None, b"") when the daemon closed without a reply."""
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?i)content-length: *(\d+)", head)
                if head.startswith(b"HTTP/1.1 101") or (m and len(body) >= int(m.group(1))):
                    break
    except ConnectionResetError:
        pass
    if not data:
        return None, b""
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def v2(src: str, sport: int = 40000, cmd: int = 1) -> bytes:
    a = ipaddress.ip_address(src)
    fam = 0x11 if a.version == 4 else 0x21
    dst = ipaddress.ip_address("127.0.0.1" if a.version == 4 else "::1")
    body = a.packed + dst.packed + struct.pack("!HH", sport, 8765)
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


async def test_untrusted_peer_forwarded_headers_are_ignored(start, tmp_path):
    """From an untrusted peer, X-Forwarded-For and Forwarded change nothing: the pool allowlist refuses it
    (403, its own address in the reason), /metrics stays refused, and the connection shows its own address.
    From the trusted peer the same header is believed, and a malformed one is 400 naming the header."""
    w = start('[pools.frontend]\ntype = "frontend"\npath = "/ws/frontend"\nallow_cidrs = ["198.51.100.0/24"]\n'
              '[pools.api]\ntype = "api"\npath = "/ws/api"\n[http]\nmetrics_allow = ["198.51.100.0/24"]\n',
              trusted_proxies=["127.0.0.2/32"])
    tok = make_token()
    with sock_from("127.0.0.3", w.port) as s:
        s.sendall(upgrade_request(w.port, f"/ws/frontend?token={tok}", "X-Forwarded-For: 198.51.100.9"))
        status, body = response_of(s)
    assert status == 403 and "127.0.0.3" in json.loads(body)["message"]
    with sock_from("127.0.0.3", w.port) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.9\r\n\r\n")
        assert response_of(s)[0] == 403
    # the trusted peer vouches for 198.51.100.9: allowed in the pool and to /metrics
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(upgrade_request(w.port, f"/ws/frontend?token={tok}", "X-Forwarded-For: 6.6.6.6, 198.51.100.9"))
        assert response_of(s)[0] == 101
        await wait_for(lambda: _has_remote(w, "198.51.100.9"))
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.9\r\n\r\n")
        assert response_of(s)[0] == 200
    async with connect(ws_url(w.port, "api"), local_addr=("127.0.0.3", 0), open_timeout=5,
                       additional_headers={"X-Forwarded-For": "198.51.100.9"}) as ws:
        await welcome(ws)
        assert "127.0.0.3" in await remotes(w)
    for bad in ("X-Forwarded-For: 198.51.100.9, not-an-ip", "X-Forwarded-For: 1.2.3.4:99999"):
        with sock_from("127.0.0.2", w.port) as s:
            s.sendall(upgrade_request(w.port, f"/ws/api?token={tok}", bad))
            status, body = response_of(s)
        assert status == 400, bad
        err = json.loads(body)
        assert err["error"] == "bad_request" and err["message"].startswith("X-Forwarded-For: not an address")
    assert http_get(w.port, "/healthz")[0] == 200


async def _has_remote(w: Wsd, addr: str) -> bool:
    rows = (await w.ctl("connections.list"))["items"]
    return any(r["remote_address"] == addr for r in rows)


async def test_forwarded_rfc7239_header(start):
    """forwarded_header = "forwarded": the right-most untrusted for= is the client; X-Forwarded-For is then
    not read at all."""
    w = start(trusted_proxies=["127.0.0.2/32", "2001:db8:ffff::/48"], forwarded_header="forwarded")
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(upgrade_request(w.port, f"/ws/api?token={make_token()}", "X-Forwarded-For: 198.51.100.1",
                                  'Forwarded: for=6.6.6.6, for="[2001:db8::17]:4711";proto=https',
                                  'Forwarded: for="[2001:db8:ffff::1]"'))
        assert response_of(s)[0] == 101
        await wait_for(lambda: _has_remote(w, "2001:db8::17"))


async def test_overlong_forwarded_header_from_the_proxy_is_400_naming_it(start):
    """A client behind a pass-through proxy can make its Forwarded header as long as the proxy allows: past
    8192 characters (two full header lines here) it is 400 naming the header, not parsed; the daemon answers
    the next request at once."""
    w = start(trusted_proxies=["127.0.0.2/32"], forwarded_header="forwarded")
    line = "Forwarded: " + ",".join(["for=127.0.0.2"] * 570)
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(upgrade_request(w.port, f"/ws/api?token={make_token()}", line, line,
                                  "Forwarded: for=192.0.2.9"))
        status, body = response_of(s)
    assert status == 400, body
    assert json.loads(body)["message"] == "Forwarded: longer than 8192 characters (every line of it)"
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(upgrade_request(w.port, f"/ws/api?token={make_token()}", line, "Forwarded: for=192.0.2.9"))
        assert response_of(s)[0] == 101
        await wait_for(lambda: _has_remote(w, "192.0.2.9"))


async def test_proxy_protocol_v1_v2_local_and_ipv6(start, tmp_path):
    """proxy_protocol = true, trusted 127.0.0.2: v1 and v2 preambles give the client's address (IPv4 and IPv6),
    even split across writes and with the request in the same write; LOCAL means the proxy itself; the
    per-IP limit counts the relayed clients apart."""
    w = start(limits={"connections_per_ip_per_minute": 2}, trusted_proxies=["127.0.0.2/32"], proxy_protocol=True)
    tok = make_token()
    keep = []
    for pre in (b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 8765\r\n", v2("198.51.100.8"), v2("2001:db8::9"),
                v2("198.51.100.1", cmd=0)):
        s = sock_from("127.0.0.2", w.port)
        keep.append(s)
        req = upgrade_request(w.port, f"/ws/api?token={tok}")
        s.sendall(pre[:5])  # a preamble may come in pieces
        await asyncio.sleep(0.05)
        s.sendall(pre[5:] + req)
        assert response_of(s)[0] == 101, pre
    await wait_for(lambda: _has_remote(w, "127.0.0.2"))  # LOCAL: the proxy's own connection
    assert await remotes(w) == {"198.51.100.7", "198.51.100.8", "2001:db8::9", "127.0.0.2"}
    # the per-IP budget is the relayed client's: 198.51.100.7 has one attempt left, then 429
    statuses = []
    for _ in range(2):
        with sock_from("127.0.0.2", w.port) as s:
            s.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 8765\r\n" + upgrade_request(w.port,
                                                                                       f"/ws/api?token={tok}"))
            statuses.append(response_of(s)[0])
    assert statuses == [101, 429]
    for s in keep:
        s.close()


async def test_proxy_header_without_a_client_address_does_not_let_the_client_choose_one(start):
    """proxy_protocol with the default forwarded_header: a PROXY header naming no client (v1 UNKNOWN, v2
    AF_UNSPEC / AF_UNIX, LOCAL) is followed by the client's own bytes (TCP mode), so its X-Forwarded-For is
    not read: the pool allowlist sees the proxy's address and refuses; the connection shows the proxy's."""
    w = start('[pools.frontend]\ntype = "frontend"\npath = "/ws/frontend"\n'
              'allow_cidrs = ["198.51.100.0/24"]\n[pools.api]\ntype = "api"\npath = "/ws/api"\n',
              trusted_proxies=["127.0.0.2/32"], proxy_protocol=True)
    tok = make_token()
    spoof = "X-Forwarded-For: 198.51.100.9"
    unspec = V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"\x00" * 216
    for pre in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", unspec, unix,
                v2("127.0.0.9", cmd=0)):
        with sock_from("127.0.0.2", w.port) as s:
            s.sendall(pre + upgrade_request(w.port, f"/ws/frontend?token={tok}", spoof))
            status, body = response_of(s)
        assert status == 403 and "address 127.0.0.2 not allowed" in json.loads(body)["message"], (pre, body)
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(b"PROXY UNKNOWN\r\n" + upgrade_request(w.port, f"/ws/api?token={tok}", spoof))
        assert response_of(s)[0] == 101
        await wait_for(lambda: _has_remote(w, "127.0.0.2"))
        assert await remotes(w) == {"127.0.0.2"}


async def test_bad_proxy_preambles_close_the_connection_and_are_recorded(start, tmp_path):
    """From the trusted peer: no preamble, a malformed v1 line, a bad v2 version, TLS bytes, an overlong line
    — each connection is closed without a reply, counted (proxy_header) and audited; the daemon stays up.
    From an untrusted peer a PROXY line is never read as one: it is not HTTP, and the connection is closed by the
    HTTP parser; the peer's own plain requests work."""
    audit = tmp_path / "audit.jsonl"
    w = start(f'[audit]\npath = "{audit}"\n', env={"WSD_LOG_REPEAT_SUMMARY_INTERVAL_S": "1"},
              trusted_proxies=["127.0.0.2/32"], proxy_protocol=True)
    bad = [upgrade_request(w.port, "/ws/api"), b"PROXY TCP4 1.2.3.400 1.2.3.4 1 2\r\n",
           V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
           b"PROXY " + b"9" * 200]
    for payload in bad:
        with sock_from("127.0.0.2", w.port) as s:
            s.sendall(payload)
            assert response_of(s) == (None, b""), payload
    assert http_get(w.port, "/readyz")[0] == 200
    text = (await w.ctl("metrics.prometheus"))["text"]
    assert re.search(r'wsd_handshakes_refused_total\{code="proxy_header"\} 5', text), text

    async def audited() -> bool:
        recs = [r for r in audit_records(audit) if r.get("code") == "proxy_header"]
        return sum(r.get("repeated", 1) for r in recs) == 5

    await wait_for(audited, timeout=15)
    rec = next(r for r in audit_records(audit) if r.get("code") == "proxy_header")
    assert rec["event"] == "handshake_refused" and rec["remote"] == "127.0.0.2"
    assert "does not start with a PROXY protocol header" in rec["reason"]
    # an untrusted peer's PROXY line is not a preamble: it is not HTTP, and the HTTP parser closes the connection
    # (the same bytes from the trusted peer are a handshake: 101)
    line = b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 8765\r\n" + upgrade_request(w.port, f"/ws/api?token={make_token()}")
    with sock_from("127.0.0.3", w.port) as s:
        s.sendall(line)
        assert response_of(s) == (None, b"")
    with sock_from("127.0.0.2", w.port) as s:
        s.sendall(line)
        assert response_of(s)[0] == 101
    async with connect(ws_url(w.port, "api"), local_addr=("127.0.0.3", 0), open_timeout=5) as ws:
        await welcome(ws)
        assert await remotes(w) == {"127.0.0.3"}
    assert w.proc is not None and w.proc.poll() is None
    assert "Traceback" not in w.log(), w.log()


async def test_trusted_proxy_is_not_held_to_the_per_address_handshake_bound(start):
    """A trusted proxy's connections carry many clients: handshakes_in_progress_per_ip = 2 does not apply to
    them (5 idle proxy connections do not stop a 6th from completing), only handshakes_in_progress does; an
    untrusted address still meets its bound."""
    w = start(limits={"handshakes_in_progress_per_ip": 2}, trusted_proxies=["127.0.0.2/32"], proxy_protocol=True)
    idle = [sock_from("127.0.0.2", w.port) for _ in range(5)]
    try:
        with sock_from("127.0.0.2", w.port) as s:
            s.sendall(v2("198.51.100.7") + upgrade_request(w.port, f"/ws/api?token={make_token()}"))
            assert response_of(s)[0] == 101
    finally:
        for s in idle:
            s.close()
    idle = [sock_from("127.0.0.3", w.port) for _ in range(2)]
    try:
        with sock_from("127.0.0.3", w.port) as s:
            s.sendall(upgrade_request(w.port, f"/ws/api?token={make_token()}"))
            assert response_of(s) == (None, b"")  # the third handshake in progress from 127.0.0.3: closed
    finally:
        for s in idle:
            s.close()


def test_config_checks_name_the_key(tmp_path):
    """A bad CIDR names its index; proxy_protocol without trusted_proxies or with tls_cert is refused."""
    def errors_of(server: str) -> list[str]:
        p = tmp_path / "c.toml"
        p.write_text(f'[auth]\nsecret = "{"x" * 40}"\n[server]\n{server}\n')
        with pytest.raises(ConfigError) as exc:
            load_config(str(p))
        return exc.value.errors

    errs = errors_of('trusted_proxies = ["10.0.0.0/8", "10.0.0.300/8", "::1/129"]')
    assert any(e.startswith('server.trusted_proxies[1]: not an IP network (CIDR), got "10.0.0.300/8"') for e in errs)
    assert any(e.startswith("server.trusted_proxies[2]:") for e in errs)
    assert not any("trusted_proxies[0]" in e for e in errs)
    errs = errors_of("proxy_protocol = true")
    assert any(e.startswith("server.proxy_protocol: needs server.trusted_proxies") for e in errs), errs
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    errs = errors_of(f'proxy_protocol = true\ntrusted_proxies = ["10.0.0.1"]\ntls_cert = "{cert}"\n'
                     f'tls_key = "{cert}"')
    assert any(e.startswith("server.proxy_protocol: cannot be combined with server.tls_cert") for e in errs), errs
    errs = errors_of('forwarded_header = "x-real-ip"')
    assert any(e.startswith("server.forwarded_header:") for e in errs), errs


def test_config_check_refuses_trusting_every_address(tmp_path):
    """A careless ``trusted_proxies = ["0.0.0.0/0"]`` (or ``::/0``) lets every client claim any address and
    lifts the per-address handshake bound for everyone: `wsd config check` refuses it, one line naming the
    key."""
    p = tmp_path / "c.toml"
    p.write_text(f'[auth]\nsecret = "{"x" * 40}"\n[server]\n'
                 'trusted_proxies = ["10.0.0.0/8", "0.0.0.0/0", "::/0"]\n')
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "wsd", "config", "check", str(p)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode != 0
    lines = [line.removeprefix("error: ") for line in r.stderr.strip().splitlines()]
    assert any(line.startswith("server.trusted_proxies[1]: trusts every address") for line in lines), r.stderr
    assert any(line.startswith("server.trusted_proxies[2]: trusts every address") for line in lines), r.stderr
    assert not any("trusted_proxies[0]" in line for line in lines)
