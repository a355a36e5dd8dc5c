"""The handshake edge under abuse: attempt budgets, refusal floods, idle sockets, descriptor exhaustion,
duplicated headers, resumes refused late, tokens in paths and frames, control characters in the text
log, and the control socket's path. Real daemons, raw sockets, the real `wsd serve` and `wsctl`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import select
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import (SECRET, Wsd, http_get, make_token, recv_until, request, wait_for, welcome)

ORIGINS = '["https://app.example.com"]'


def raw(port: int, lines: list[str], source: str = "127.0.0.1", timeout: float = 5.0) -> tuple[int, dict[str, str],
                                                                                               bytes]:
    """Send a GET upgrade whose request line and headers are exactly ``lines`` (duplicates allowed)."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        hl = head.decode("latin-1").split("\r\n")
        status = int(hl[0].split(" ", 2)[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in hl[1:])}
        length = int(hdrs.get("content-length", "0"))
        while status != 101 and len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return status, hdrs, body


def upgrade(port: int, target: str, *extra: str) -> list[str]:
    return [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *extra]


def audit_records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


async def prom_refused(w: Wsd, code: str) -> int:
    text = (await w.ctl("metrics.prometheus"))["text"]
    m = re.search(r'wsd_handshakes_refused_total\{code="%s"\} ([0-9.e+]+)' % code, text)
    return int(float(m.group(1))) if m else 0


# -- every attempt counts against its address -----------------------------------------------------------------
async def test_wrong_origin_flood_meets_429_after_the_per_ip_budget(wsd_factory):
    """connections_per_ip_per_minute=20: wrong-Origin attempts get 403 for the budget, then 429 + Retry-After;
    so do unknown paths; health endpoints stay exempt."""
    w = wsd_factory(env={"WSD_SERVER_ALLOWED_ORIGINS": ORIGINS, "WSD_LIMITS_CONNECTIONS_PER_IP_PER_MINUTE": "20"})
    statuses = [raw(w.port, upgrade(w.port, "/ws/frontend", "Origin: https://evil.example"))[0] for _ in range(20)]
    assert statuses == [403] * 20
    status, hdrs, body = raw(w.port, upgrade(w.port, "/ws/frontend", "Origin: https://evil.example"))
    assert status == 429 and int(hdrs["retry-after"]) >= 1
    assert json.loads(body)["error"] == "rate_limited"
    assert raw(w.port, upgrade(w.port, "/no/such/pool"))[0] == 429
    assert http_get(w.port, "/healthz")[0] == 200 and http_get(w.port, "/readyz")[0] == 200


# -- refusal floods are aggregated ---------------------------------------------------------------------------------
async def test_refusal_flood_is_aggregated_with_a_count(wsd_factory, tmp_path):
    """2,000 wrong-Origin attempts from one address: a bounded number of audit records and log lines, whose
    counts add up to 2,000."""
    audit = tmp_path / "audit.jsonl"
    w = wsd_factory(env={"WSD_SERVER_ALLOWED_ORIGINS": ORIGINS, "WSD_AUDIT_PATH": str(audit),
                         "WSD_LOG_REPEAT_SUMMARY_INTERVAL_S": "1"})

    def flood(n: int) -> list[int]:
        return [raw(w.port, upgrade(w.port, "/ws/frontend", "Origin: https://evil.example"))[0] for _ in range(n)]

    loop = asyncio.get_running_loop()
    parts = await asyncio.gather(*(loop.run_in_executor(None, flood, 500) for _ in range(4)))
    assert all(s == 403 for p in parts for s in p)

    def refused() -> list[dict]:
        return [r for r in audit_records(audit) if r["event"] == "handshake_refused"]

    async def all_counted() -> bool:
        return sum(r.get("repeated", 1) for r in refused()) == 2000

    await wait_for(all_counted, timeout=10)
    recs = refused()
    assert len(recs) <= 20, len(recs)
    assert any(r.get("repeated", 0) > 100 for r in recs)
    assert all(r["code"] == "origin_not_allowed" and r["remote"] == "127.0.0.1" for r in recs)
    lines = [ln for ln in w.log().splitlines() if "refused " in ln and "origin_not_allowed" in ln]
    assert 1 <= len(lines) <= 20, len(lines)
    assert sum(int(m.group(1)) if (m := re.search(r"repeated=(\d+)", ln)) else 1 for ln in lines) == 2000
    # The counter still counts every refusal.
    assert await prom_refused(w, "origin_not_allowed") == 2000


# -- sockets that never finish a handshake -------------------------------------------------------------------
class LimitedWsd(Wsd):
    """A daemon started with a low descriptor hard limit (as `prlimit --nofile=N:N` would)."""

    nofile = 256

    def start(self, timeout: float = 15.0) -> Wsd:
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "wsd", "serve", "-c", str(self.config_path), "--port", str(self.port),
               "--socket", self.socket, *self.args]
        n = self.nofile

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n // 2, n))  # the daemon raises the soft limit to n

        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=cap)
        self.wait_ready(timeout)
        return self


def limited(tmp_path: Path, nofile: int, env: dict[str, str]) -> LimitedWsd:
    from tests.harness import BASE_CONFIG

    d = tmp_path / f"lim{nofile}"
    d.mkdir()
    w = LimitedWsd(d, BASE_CONFIG, env=env)
    w.nofile = nofile
    return w


def idle_sockets(port: int, n: int, source: str) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


def closed_by_peer(socks: list[socket.socket], timeout: float, want: int | None = None) -> set[socket.socket]:
    """The sockets the daemon closed within ``timeout`` (EOF or reset), returning early once ``want`` are."""
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [s for s in socks if s not in closed]
        if not left or (want is not None and len(closed) >= want):
            break
        readable, _, _ = select.select(left, [], [], 0.1)
        for s in readable:
            try:
                if s.recv(1) == b"":
                    closed.add(s)
            except OSError:
                closed.add(s)
    return closed


async def test_idle_sockets_from_one_address_are_bounded(tmp_path):
    """300 idle TCP connections from one address under a 256-descriptor limit: all but
    handshakes_in_progress_per_ip are closed at once, counted, logged a bounded number of times; an honest
    client still gets its welcome."""
    w = limited(tmp_path, 256, {"WSD_LIMITS_HANDSHAKES_IN_PROGRESS_PER_IP": "8"}).start()
    try:
        assert "descriptor limit raised from 128 to 256" in w.log()
        socks = idle_sockets(w.port, 300, "127.0.0.2")
        try:
            closed = closed_by_peer(socks, 8.0, want=292)  # well before the 10 s handshake deadline
            assert len(closed) == 292
            async with w.connect(token=make_token("alice")) as ws:
                assert (await welcome(ws))["type"] == "welcome"
            assert await prom_refused(w, "handshakes_in_progress") == 292
            lines = [ln for ln in w.log().splitlines() if "handshake_limit" in ln]
            assert 1 <= len(lines) <= 3 and "remote=127.0.0.2" in lines[0]
            assert "bound=handshakes_in_progress_per_ip" in lines[0]
            # The rest are held only until the handshake deadline (10 s), then closed too.
            left = [s for s in socks if s not in closed]
            assert len(closed_by_peer(left, 15.0)) == 8
        finally:
            for s in socks:
                s.close()
    finally:
        assert w.stop() == 0


async def test_descriptor_exhaustion_is_logged_rate_limited_and_counted(tmp_path):
    """With the per-address bound out of the way, 200 idle sockets under a 128-descriptor limit: the daemon
    keeps a reserve (its control socket still answers), counts the exhaustion, logs it at most a few times."""
    w = limited(tmp_path, 128, {"WSD_LIMITS_HANDSHAKES_IN_PROGRESS_PER_IP": "10000"}).start()
    try:
        socks = idle_sockets(w.port, 200, "127.0.0.2")
        try:
            closed = closed_by_peer(socks, 8.0, want=80)
            assert len(closed) >= 80
            assert await prom_refused(w, "descriptors_exhausted") >= 80
            lines = [ln for ln in w.log().splitlines() if "descriptors_exhausted" in ln]
            assert 1 <= len(lines) <= 3
        finally:
            for s in socks:
                s.close()
        async with w.connect(token=make_token("alice")) as ws:  # descriptors back: connections work again
            assert (await welcome(ws))["type"] == "welcome"
    finally:
        assert w.stop() == 0


# -- duplicated headers -------------------------------------------------------------------------------------------
async def test_duplicated_headers_get_400_never_500(wsd):
    tok = make_token("alice")
    for name, a, b in (("Origin", "https://a.example", "https://b.example"),
                       ("Authorization", f"Bearer {tok}", f"Bearer {tok}"),
                       ("User-Agent", "one", "two"), ("Cookie", "a=1", "b=2"), ("Host", "a", "b")):
        status, hdrs, body = raw(wsd.port, upgrade(wsd.port, f"/ws/frontend?token={tok}", f"{name}: {a}",
                                                   f"{name}: {b}") if name != "Host" else
                                 upgrade(wsd.port, f"/ws/frontend?token={tok}", "Host: other"))
        assert status == 400, (name, status, body)
        assert hdrs["content-type"] == "application/json"
        err = json.loads(body)
        assert err["error"] == "bad_request" and name in err["message"]
    # Sec-WebSocket-Protocol may come several times: the offers are joined, wsd.v1 is chosen.
    status, hdrs, _ = raw(wsd.port, upgrade(wsd.port, f"/ws/frontend?token={tok}", "Sec-WebSocket-Protocol: x",
                                            "Sec-WebSocket-Protocol: wsd.v1"))
    assert status == 101 and hdrs["sec-websocket-protocol"] == "wsd.v1"
    assert "Traceback" not in wsd.log() and "process_request failed" not in wsd.log()


# -- nothing is consumed before a handshake is accepted -------------------------------------------------------
async def test_a_refused_resume_leaves_the_session_for_the_next(wsd):
    tok = make_token("alice")
    async with wsd.connect(token=tok) as ws:
        hello = await welcome(ws)
        await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        ws.transport.abort()  # a dropped network: the daemon keeps the session

    async def gone() -> bool:
        return (await wsd.ctl("connections.list"))["total"] == 0

    await wait_for(gone, timeout=5)
    for i in range(2):
        await wsd.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": i})
    sid = hello["session_id"]
    target = f"/ws/frontend?token={tok}&session={sid}"
    # A duplicated header (refused by wsd) and a bad WebSocket version (refused by websockets after wsd
    # admitted the request): neither takes the session.
    assert raw(wsd.port, upgrade(wsd.port, target, "Origin: https://a.example", "Origin: https://b.example"))[0] == 400
    lines = [ln.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8") for ln in upgrade(wsd.port, target)]
    assert raw(wsd.port, lines)[0] in (400, 426)
    async with wsd.connect(token=tok, query={"session": sid}) as ws2:
        w2 = await welcome(ws2)
        assert w2["resumed"] is True and "trading-signals/acme" in w2["subscriptions"]
        got = [await recv_until(ws2, lambda m: m.get("type") == "message") for _ in range(2)]
        assert [m["data"]["i"] for m in got] == [0, 1]


# -- redaction ------------------------------------------------------------------------------------------------------
def wsctl_events(w: Wsd) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    p = subprocess.run([sys.executable, "-m", "wsctl", "--socket", w.socket, "events", "--json", "-n", "200"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


async def test_a_jwt_in_the_path_is_recorded_nowhere(wsd_factory, tmp_path):
    audit = tmp_path / "audit.jsonl"
    w = wsd_factory(env={"WSD_AUDIT_PATH": str(audit), "WSD_SERVER_ALLOWED_ORIGINS": ORIGINS},
                    args=["--log-level", "debug"])
    tok = make_token("alice")
    sig = tok.rsplit(".", 1)[1]
    for target in (f"/ws/{tok}", f"/ws/{tok[:40]}", f"/ws/frontend/{tok}"):
        status, _, body = raw(w.port, upgrade(w.port, target))
        assert status == 404 and tok[:20] not in body.decode()
    # An audited refusal from the same address, so the audit file exists and is checked too.
    assert raw(w.port, upgrade(w.port, "/ws/frontend", "Origin: https://evil.example"))[0] == 403

    async def logged() -> bool:
        return "no_such_pool" in w.log() and audit.exists()

    await wait_for(logged, timeout=5)
    events = wsctl_events(w)
    assert "no pool at /ws/[redacted]" in events
    for where in (events, w.log(), audit.read_text()):
        assert tok[:20] not in where and sig[-12:] not in where and tok.split(".")[1][:12] not in where


async def test_debug_frame_logs_keep_no_tail_of_a_token(wsd_factory):
    """At debug level websockets logs frames cut to their start and end: a refresh token leaves no trace."""
    w = wsd_factory(args=["--log-level", "debug"])
    tok = make_token("alice")
    fresh = make_token("alice", ttl=7200, note="x" * 40)  # a long token: its frame is elided in the log
    async with w.connect(token=tok) as ws:
        await welcome(ws)
        reply = await request(ws, {"op": "refresh", "id": 7, "token": fresh})
        assert reply["ok"] is True

    async def frame_logged() -> bool:
        return "refresh" in w.log()

    await wait_for(frame_logged, timeout=5)
    log = w.log()
    assert "'{\"op\": \"refresh\"" in log or '"op": "refresh"' in log
    for t in (tok, fresh):
        header, payload, sig = t.split(".")
        for piece in (sig[-8:], sig[:8], payload[-8:], payload[:12]):
            assert piece not in log, piece


# -- control characters in the text log -------------------------------------------------------------------------
async def test_client_text_reaches_the_log_escaped_on_one_line(wsd_factory):
    """A terminal escape in the path and a newline in a close reason: escaped, no fake log line."""
    w = wsd_factory(args=["--log-level", "debug"])
    status, _, _ = raw(w.port, upgrade(w.port, "/ws/\x1b]0;owned\x07\x1b[2J"))
    assert status == 404
    fake = "2026-01-01 00:00:00,000 WARNING wsd: forged line"
    async with w.connect(token=make_token("alice")) as ws:
        hello = await welcome(ws)
        await ws.close(4999, "bye\n" + fake)

    async def both_logged() -> bool:
        log = w.log()
        return "no_such_pool" in log and log.count(hello["connection_id"]) >= 2

    await wait_for(both_logged, timeout=5)
    log = w.log()
    assert "\x1b" not in log and "\x07" not in log
    assert "\\x1b]0;owned\\x07\\x1b[2J" in log
    assert not any(line.startswith(fake) for line in log.splitlines())
    assert "bye\\n" + fake in log


# -- the control socket's path --------------------------------------------------------------------------------------
def serve_fails(sock: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    env["WSD_AUTH_SECRET"] = SECRET
    return subprocess.run([sys.executable, "-m", "wsd", "serve", "--port", "0", "--socket", sock],
                          capture_output=True, text=True, timeout=timeout, env=env)


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="wsde-"))


def test_socket_path_on_a_regular_file_is_refused_and_the_file_kept():
    d = short_dir()
    f = d / "notes.txt"
    f.write_text("precious\n")
    p = serve_fails(str(f))
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("wsd: error:")]
    assert len(err) == 1 and "exists and is not a socket" in err[0] and str(f) in err[0]
    assert f.read_text() == "precious\n"


def test_socket_path_that_cannot_be_bound_names_the_path():
    # /proc refuses new files even to root; an over-long path is refused by AF_UNIX itself.
    for sock in ("/proc/wsd-attack.sock", str(short_dir() / ("d" * 120) / "x.sock")):
        p = serve_fails(sock)
        assert p.returncode == 1
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("wsd: error:")]
        assert len(err) == 1 and sock in err[0] and "control socket" in err[0], p.stderr


def test_socket_in_a_world_writable_directory_without_sticky_bit_is_refused():
    d = short_dir() / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    p = serve_fails(str(d / "wsd.sock"))
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("wsd: error:")]
    assert len(err) == 1 and "writable by everyone without the sticky bit" in err[0]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777
    assert not (d / "wsd.sock").exists()


def test_socket_in_a_directory_owned_by_another_user_is_refused():
    if os.getuid() != 0:
        import pytest

        pytest.skip("needs root to give a directory to another user")
    d = short_dir() / "theirs"
    d.mkdir()
    os.chmod(d, 0o755)
    os.chown(d, 4321, 4321)
    p = serve_fails(str(d / "wsd.sock"))
    assert p.returncode != 0 and "owned by uid 4321" in p.stderr
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


async def test_socket_directory_modes(wsd_factory):
    """A sticky 1777 directory and an existing 0755 one keep their modes; a new one is made 0700; the socket
    is 0600; a stale socket is replaced."""
    base = short_dir()
    sticky = base / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    mine = base / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    stale = mine / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    for path, mode in ((sticky / "wsd.sock", 0o1777), (stale, 0o755), (base / "new" / "wsd.sock", 0o700)):
        w = wsd_factory(start=False)
        w.socket = str(path)
        w.start()
        try:
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == mode
            assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert (await w.ctl("hello"))["pid"] == w.proc.pid
        finally:
            assert w.stop() == 0
        assert not path.exists()


# -- the edge's state machines (injected clock) -----------------------------------------------------------------
def test_in_progress_bounds_per_address_and_in_total():
    from wsd.runtime.gate import InProgress

    g = InProgress(per_ip=2, total=3)
    assert [g.try_enter("a"), g.try_enter("a"), g.try_enter("a")] == ["", "", "per_ip"]
    assert g.try_enter("b") == "" and g.try_enter("c") == "total"
    g.leave("a")
    assert g.try_enter("c") == "" and g.count == 3
    for ip in ("a", "b", "c", "c"):  # a second leave of "c" gives back nothing
        g.leave(ip)
    assert g.count == 0 and g.by_ip == {}


def test_repeats_pass_the_first_and_summarise_the_rest():
    from wsd.runtime.gate import Repeats

    r = Repeats(max_keys=2)
    assert r.hit(("ip1", "x"), 0.0, "d1") is True
    assert [r.hit(("ip1", "x"), 0.5) for _ in range(4)] == [False] * 4
    assert r.hit(("ip2", "x"), 1.0, "d2") is True
    # Over max_keys a new key folds into its overflow key: memory stays bounded.
    assert r.hit(("ip3", "x"), 1.0, "d3", overflow=("*", "x")) is True
    assert r.hit(("ip4", "x"), 1.0, "d4", overflow=("*", "x")) is False
    assert len(r) == 3
    out = r.flush(10.0)
    assert out == [(("ip1", "x"), 4, 10.0, "d1"), (("*", "x"), 1, 9.0, "d3")]
    # A key that keeps repeating yields only summaries; a quiet one is forgotten.
    assert r.hit(("ip1", "x"), 11.0) is False
    assert r.flush(20.0) == [(("ip1", "x"), 1, 10.0, "d1")]
    assert r.flush(30.0) == [] and len(r) == 0
    assert r.hit(("ip1", "x"), 31.0, "again") is True


def test_redact_and_escape_cover_cut_tokens_and_control_characters():
    from wsd.runtime.logs import escape, redact

    tok = make_token("alice")
    header, payload, sig = tok.split(".")
    for text in (f"/ws/{tok}", f"/ws/{header}", f"/ws/{header}.{payload[:10]}", '{"op":"refresh","token":"' + tok[:30],
                 f"TEXT '{{\"op\":\"x\",\"tok...{payload[-10:]}.{sig}\"}}' [300 bytes]"):
        out = redact(text)
        assert "[redacted]" in out and sig[-8:] not in out and header[3:] not in out, out
    assert escape("a\nb\r\x1b[2J\x07\u202e\x85") == "a\\nb\\r\\x1b[2J\\x07\\u202e\\x85"
    assert escape("plain text: é ü 中") == "plain text: é ü 中"
