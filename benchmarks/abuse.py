"""Abuse run: every attack class of the hardening pass at once against one wsd, with an honest client watching.

    python benchmarks/abuse.py                     # 60 s of attack, then the wait for sessions to expire
    python benchmarks/abuse.py --attack-s 20       # shorter

Each attacker works from its own loopback address (127.0.0.X), so per-address limits apply to it as they would to
a real remote peer, while the honest client on 127.0.0.1 is judged only by its own behaviour:

- hoarders: ten accounts connect, subscribe to three channels with a 7,000-type filter each, and drop the TCP
  connection without a close, to leave sessions behind;
- history: four connections of one account ask for a full 1,000 x 5 KB history buffer over and over, under
  the message rate limit;
- flood: one connection sends pings far past its message rate, reconnecting when closed;
- origin: wrong-Origin upgrade requests as fast as one loop can send them;
- idle: up to 1,100 TCP connections that never send a byte;
- admin: an admin account publishes 1,000-deep nested data, publishes to thousands of distinct user channels
  (history buffers nobody uses) and refreshes with a non-admin token while subscribed to other tenants.

The honest client (another tenant) sends an application ping every 100 ms through the whole run. Printed as
JSON: the daemon's RSS at baseline, peak, at the end of the attack and after the sessions expired, its CPU over
the attack, the audit records and log lines written, every attacker's counts, and the honest pings' latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ServerProcess, free_port, stop_all  # noqa: E402


def log(msg: str) -> None:
    print(f"[abuse {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def config(port: int, sock: Path, secret: str, audit: Path, session_ttl_s: int) -> str:
    return f"""\
[server]
host = "127.0.0.1"
port = {port}
allowed_origins = ["http://good.example"]

[control]
socket = "{sock}"

[auth]
algorithms = ["HS256"]
secret = "{secret}"

[manager]
heartbeat_interval_ms = 30000
session_ttl_s = {session_ttl_s}

[audit]
path = "{audit}"

[log]
level = "info"

[pools.frontend]
type = "frontend"
path = "/ws/frontend"
default_subscriptions = []

[pools.api]
type = "api"
path = "/ws/api"

[pools.admin]
type = "admin"
path = "/ws/admin"
roles = ["admin"]

[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["api", "admin"]

[channels.notifications]
type = "user"
publishers = ["api", "admin"]
history_ttl_s = {session_ttl_s}

[channels.bulk]
type = "global"
history_size = 1000
publishers = ["api", "admin"]
"""


class Run:
    def __init__(self, port: int, secret: str, deadline: float) -> None:
        self.port = port
        self.secret = secret
        self.deadline = deadline
        self.counts: dict[str, dict[str, int]] = {}

    def count(self, attacker: str, what: str, n: int = 1) -> None:
        c = self.counts.setdefault(attacker, {})
        c[what] = c.get(what, 0) + n

    def token(self, user: str, company: str, roles: list[str] | None = None) -> str:
        now = int(time.time())
        return jwt.encode({"sub": user, "company_id": company, "roles": roles or [], "iat": now,
                           "exp": now + 3600}, self.secret, algorithm="HS256")

    def url(self, pool: str, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{pool}?token={token}"

    def live(self) -> bool:
        return time.monotonic() < self.deadline


async def request(ws: Any, rid: int, timeout: float = 10.0, pushes: list[dict[str, Any]] | None = None,
                  **op: Any) -> dict[str, Any]:
    """Send one op and return its reply (an ``"id": null`` reply counts: the server could not read the id of a
    frame nested too deep); pushes that arrive meanwhile go to ``pushes``."""
    await ws.send(json.dumps({"id": rid, **op}))
    end = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, end - time.monotonic()))
        m = json.loads(raw)
        if "ok" in m and m.get("id") in (rid, None):
            return m
        if pushes is not None and "type" in m:
            pushes.append(m)


async def raw_request(ws: Any, rid: int, frame: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send a frame given as text and return its reply (``"id": null`` counts, as in ``request``)."""
    await ws.send(frame)
    end = time.monotonic() + timeout
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, end - time.monotonic())))
        if "ok" in m and m.get("id") in (rid, None):
            return m


async def hoarder(run: Run, i: int) -> None:
    addr = f"127.0.0.{10 + i}"
    types = [f"t{k}" for k in range(7000)]  # a 63 KB filter, under the 64 KiB frame limit
    tok = run.token(f"hoarder{i}", "evil")
    while run.live():
        try:
            ws = await connect(run.url("frontend", tok), local_addr=(addr, 0), open_timeout=5,
                               max_size=None, compression=None)
        except InvalidStatus as exc:
            run.count("hoarders", f"refused_{exc.response.status_code}")
            await asyncio.sleep(0.2)
            continue
        except (OSError, asyncio.TimeoutError):
            run.count("hoarders", "connect_failed")
            await asyncio.sleep(0.2)
            continue
        run.count("hoarders", "connected")
        try:
            for rid, ch in enumerate(("notifications", "trading-signals", "system-status"), 1):
                r = await request(ws, rid, op="subscribe", channel=ch, filter={"types": types})
                run.count("hoarders", "subscribe_ok" if r["ok"] else f"subscribe_{r['error']['code']}")
        except (ConnectionClosed, asyncio.TimeoutError, OSError):
            run.count("hoarders", "closed_by_server")
        ws.transport.abort()  # dropped TCP, no close handshake: the session stays behind
        run.count("hoarders", "dropped")


async def history_reader(run: Run, i: int) -> None:
    tok = run.token("reader", "evil2")
    rid = 0
    while run.live():
        try:
            async with connect(run.url("api", tok), local_addr=("127.0.0.30", 0), max_size=None,
                               compression=None) as ws:
                while run.live():
                    rid += 1
                    t0 = time.monotonic()
                    await ws.send(json.dumps({"op": "history", "id": rid, "channel": "bulk"}))
                    while True:
                        raw = await asyncio.wait_for(ws.recv(), 30)
                        if f'"id":{rid},' in raw[:40] or f'"id": {rid},' in raw[:40]:
                            break
                    run.count("history", "replies")
                    run.count("history", "reply_bytes", len(raw))
                    # 40 requests/s per connection: under the default 50/s message rate
                    await asyncio.sleep(max(0.0, 0.025 - (time.monotonic() - t0)))
        except InvalidStatus as exc:
            run.count("history", f"refused_{exc.response.status_code}")
            await asyncio.sleep(0.5)
        except ConnectionClosed as exc:
            run.count("history", f"closed_{exc.rcvd.code if exc.rcvd else 'none'}")
        except (OSError, asyncio.TimeoutError):
            run.count("history", "error")
            await asyncio.sleep(0.2)


async def flooder(run: Run) -> None:
    tok = run.token("flooder", "evil3")
    payload = json.dumps({"op": "ping", "id": 1})
    while run.live():
        try:
            async with connect(run.url("frontend", tok), local_addr=("127.0.0.31", 0),
                               compression=None) as ws:
                while run.live():
                    for _ in range(200):
                        await ws.send(payload)
                    run.count("flood", "frames_sent", 200)
                    await asyncio.sleep(0)
        except InvalidStatus as exc:
            run.count("flood", f"refused_{exc.response.status_code}")
            await asyncio.sleep(1.0)
        except ConnectionClosed as exc:
            run.count("flood", f"closed_{exc.rcvd.code if exc.rcvd else 'none'}")
        except OSError:
            run.count("flood", "error")
            await asyncio.sleep(0.2)


async def origin_flood(run: Run) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    req = (f"GET /ws/frontend HTTP/1.1\r\nHost: 127.0.0.1:{run.port}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
           f"Origin: http://evil.example\r\n\r\n").encode()
    while run.live():
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", run.port,
                                                                  local_addr=("127.0.0.32", 0)), 5)
            w.write(req)
            line = await asyncio.wait_for(r.readline(), 5)
            parts = line.split()
            run.count("origin", f"status_{parts[1].decode() if len(parts) > 1 else 'none'}")
            w.close()
        except (OSError, asyncio.TimeoutError, ValueError):
            run.count("origin", "error")
            await asyncio.sleep(0.05)


async def idle_sockets(run: Run, n: int) -> None:
    held: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    for _ in range(n):
        if not run.live():
            break
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", run.port,
                                                                  local_addr=("127.0.0.33", 0)), 2)
            held.append(w)
            readers.append(r)
            run.count("idle", "opened")
        except (OSError, asyncio.TimeoutError):
            run.count("idle", "open_failed")
    while run.live():
        await asyncio.sleep(0.5)
    run.count("idle", "closed_by_server", sum(1 for r in readers if r.at_eof()))
    for w in held:
        w.transport.abort()


async def admin(run: Run) -> None:
    tok = run.token("root", "acme", ["admin"])
    plain = run.token("root", "acme")
    rid = 0
    deep = "[" * 1000 + "1" + "]" * 1000  # built as text: json.dumps stops at Python's recursion limit
    while run.live():
        try:
            async with connect(run.url("api", tok), local_addr=("127.0.0.34", 0), compression=None,
                               max_size=None) as ws:
                if not run.counts.get("admin", {}).get("refresh_ok"):
                    # once: rights that outlive the token (an admin's cross-tenant subscription, then a
                    # refresh with a token of the same user without the admin role), on a second connection
                    async with connect(run.url("api", tok), local_addr=("127.0.0.34", 0),
                                       compression=None) as ws2:
                        r = await request(ws2, 1, op="subscribe", channel="trading-signals/otherco")
                        run.count("admin", "cross_tenant_subscribe_ok" if r["ok"] else "cross_tenant_subscribe_refused")
                        pushes: list[dict[str, Any]] = []
                        r = await request(ws2, 2, pushes=pushes, op="refresh", token=plain)
                        run.count("admin", "refresh_ok" if r["ok"] else f"refresh_{r['error']['code']}")
                        run.count("admin", "unsubscribed_on_refresh",
                                  sum(1 for m in pushes if m["type"] == "unsubscribed"))
                while run.live():
                    t0 = time.monotonic()
                    rid += 1
                    r = await raw_request(ws, rid, '{"op":"publish","id":%d,"channel":"bulk","type":"deep","data":%s}'
                                          % (rid, deep))
                    run.count("admin", "deep_accepted" if r["ok"] else f"deep_{r['error']['code']}")
                    for _ in range(20):
                        rid += 1
                        r = await request(ws, rid, op="publish", channel=f"notifications/acme/u{secrets.token_hex(6)}",
                                          type="churn", data={"n": rid})
                        run.count("admin", "churn_ok" if r["ok"] else f"churn_{r['error']['code']}")
                    await asyncio.sleep(max(0.0, 0.6 - (time.monotonic() - t0)))  # ~35 frames/s
        except InvalidStatus as exc:
            run.count("admin", f"refused_{exc.response.status_code}")
            await asyncio.sleep(1.0)
        except ConnectionClosed as exc:
            run.count("admin", f"closed_{exc.rcvd.code if exc.rcvd else 'none'}")
            await asyncio.sleep(0.2)
        except (OSError, asyncio.TimeoutError):
            run.count("admin", "error")
            await asyncio.sleep(0.2)


async def honest(url: str, seconds: float) -> list[tuple[float, float]]:
    """The honest client: an application ping every 100 ms for ``seconds``; (monotonic time, RTT ms) each."""
    samples: list[tuple[float, float]] = []
    async with connect(url, compression=None) as ws:
        await request(ws, 1, op="subscribe", channel="trading-signals")
        rid = 1
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rid += 1
            t0 = time.perf_counter()
            await request(ws, rid, timeout=30, op="ping")
            samples.append((time.monotonic(), (time.perf_counter() - t0) * 1000))
            await asyncio.sleep(0.1)
    return samples


def honest_process(url: str, seconds: float, out: Any) -> None:
    """Runs in a child process with its own event loop: the attackers' load never delays its readings."""
    out.send(asyncio.run(honest(url, seconds)))


async def control(sock: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 24)
    w.write(json.dumps({"id": 1, "method": method, "params": params or {}}).encode() + b"\n")
    line = await asyncio.wait_for(r.readline(), 30)
    w.close()
    return json.loads(line)


def audit_lines(audit: Path) -> int:
    n = 0
    for p in audit.parent.glob(audit.name + "*"):
        with open(p, "rb") as f:
            n += sum(1 for _ in f)
    return n


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="wsd-abuse-"))
    port, secret = free_port(), secrets.token_urlsafe(48)
    sock, audit = tmp / "wsd.sock", tmp / "audit.log"
    cfg = tmp / "wsd.toml"
    cfg.write_text(config(port, sock, secret, audit, args.session_ttl_s))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    argv = [sys.executable, "-m", "wsd", "serve", "-c", str(cfg)]
    if args.nofile:  # the descriptor limit of the hardening report: soft and hard, so it cannot be raised
        argv = ["prlimit", f"--nofile={args.nofile}:{args.nofile}", "--", *argv]
    server = ServerProcess("wsd", argv, tmp / "wsd.log", env=env)
    server.start()
    end = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < end:
        if not server.alive():
            raise RuntimeError(server.tail())
        await asyncio.sleep(0.1)
    proc = psutil.Process(server.pid)

    # Baseline: the history buffer full (1,000 x 5 KB), an honest client connected.
    big = "x" * 5000
    r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 24)
    for i in range(1000):
        w.write(json.dumps({"id": i, "method": "publish", "params": {"channel": "bulk", "type": "fill",
                                                                      "data": {"i": i, "pad": big}}}).encode() + b"\n")
    await w.drain()
    for _ in range(1000):
        await r.readline()
    w.close()
    run = Run(port, secret, time.monotonic() + 3600)
    ctx = multiprocessing.get_context("spawn")
    rx, tx = ctx.Pipe(duplex=False)
    honest_s = 5 + args.attack_s + 5
    honest_proc = ctx.Process(target=honest_process, args=(run.url("frontend", run.token("honest", "goodco")),
                                                           honest_s, tx), daemon=True)
    honest_proc.start()
    await asyncio.sleep(5)
    rss_base = proc.memory_info().rss
    audit_base = audit_lines(audit) if audit.exists() else 0
    log_base = sum(1 for _ in open(tmp / "wsd.log", "rb"))
    log(f"baseline RSS {rss_base / 2**20:.1f} MiB; attacking for {args.attack_s} s")

    t_attack = time.monotonic()
    run.deadline = t_attack + args.attack_s
    cpu0 = proc.cpu_times()
    only = set(args.only.split(",")) if args.only else set(ATTACKERS)
    attackers = []
    if "hoarders" in only:
        attackers += [asyncio.create_task(hoarder(run, i)) for i in range(10)]
    if "history" in only:
        attackers += [asyncio.create_task(history_reader(run, i)) for i in range(4)]
    if "flood" in only:
        attackers.append(asyncio.create_task(flooder(run)))
    if "origin" in only:
        attackers.append(asyncio.create_task(origin_flood(run)))
    if "idle" in only:
        attackers.append(asyncio.create_task(idle_sockets(run, args.idle)))
    if "admin" in only:
        attackers.append(asyncio.create_task(admin(run)))
    peak = rss_base
    while time.monotonic() < run.deadline:
        peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.5)
    await asyncio.wait(attackers, timeout=30)
    for t in attackers:
        t.cancel()
    cpu1 = proc.cpu_times()
    attack_wall = time.monotonic() - t_attack
    rss_end = proc.memory_info().rss
    samples = await asyncio.to_thread(rx.recv) if await asyncio.to_thread(rx.poll, 60) else []
    honest_proc.join(5)
    during = [ms for t, ms in samples if t_attack <= t <= run.deadline]
    log(f"attack over: RSS {rss_end / 2**20:.1f} MiB (peak {peak / 2**20:.1f}); waiting for sessions to expire")
    await asyncio.sleep(args.session_ttl_s + args.settle_s)
    rss_after = proc.memory_info().rss
    metrics = (await control(sock, "metrics.get")).get("result")
    alive = server.alive()
    server.stop()
    return {
        "benchmark": "abuse",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "note": "attackers, honest client and daemon share these CPUs"},
        "attack_s": args.attack_s,
        "session_ttl_s": args.session_ttl_s,
        "daemon_alive_after": alive,
        "rss_mib": {"baseline": round(rss_base / 2**20, 1), "peak": round(peak / 2**20, 1),
                    "end_of_attack": round(rss_end / 2**20, 1), "after_expiry": round(rss_after / 2**20, 1),
                    "after_vs_baseline": round(rss_after / rss_base, 3)},
        "cpu_percent_during_attack": round(100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system))
                                           / attack_wall, 1),
        "audit_records_written": audit_lines(audit) - audit_base if audit.exists() else 0,
        "log_lines_written": sum(1 for _ in open(tmp / "wsd.log", "rb")) - log_base,
        "honest_ping_ms": {"samples": len(during), "p50": pct(during, 0.5), "p99": pct(during, 0.99),
                           "max": round(max(during), 2) if during else None,
                           "mean": round(statistics.fmean(during), 2) if during else None},
        "attackers": run.counts,
        "daemon_metrics_after": {k: v for k, v in (metrics or {}).items() if k in ("manager", "sessions", "memory",
                                                                                    "limits", "channels")},
    }


ATTACKERS = ("hoarders", "history", "flood", "origin", "idle", "admin")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack-s", type=float, default=60.0)
    ap.add_argument("--session-ttl-s", type=int, default=20, help="the daemon's manager.session_ttl_s")
    ap.add_argument("--settle-s", type=float, default=35.0,
                    help="wait past the ttl before the last RSS reading (the sweep returns freed heap every 30 s)")
    ap.add_argument("--only", default="", help=f"comma-separated attackers to run (default all: {','.join(ATTACKERS)})")
    ap.add_argument("--idle", type=int, default=1100, help="idle TCP connections to open")
    ap.add_argument("--nofile", type=int, default=1024, help="the daemon's descriptor limit (0: inherit)")
    args = ap.parse_args()
    try:
        result = asyncio.run(main_async(args))
    finally:
        stop_all()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
