"""Reconnect storm: N subscribed wsd connections dropped at once and reconnected all together.

    python benchmarks/reconnect_storm.py --conns 5000 [--procs 2] [--variants resume,fresh]

One wsd (config from ``servers.wsd_config``: one frontend pool, one global channel ``bench``, every
connection rate limit at 1,000,000), N authenticated connections (each its own user ``u<i>`` and JWT),
spread over P generator processes on uvloop, each subscribed to ``bench``. Then, per variant:

1. every client connection is aborted at the same moment (``SO_LINGER`` 0, so the kernel sends RST:
   the server sees a dropped TCP connection, not a close handshake);
2. after ``--pause-s`` (default 0), all N reconnect concurrently (no client-side concurrency limit):
   ``resume`` with ``?session=<session_id of its welcome>`` (the daemon restores the subscriptions
   and answers ``resumed: true``), ``fresh`` without it (a new session, then ``subscribe`` again).

Reported (JSON on stdout, progress on stderr): the time from the start of the reconnect until every
client is welcomed again (and the percentiles of the per-client welcome time), failures by kind (HTTP
status of a refused upgrade, or the exception), how many resumed clients got ``resumed: true``, the
daemon's RSS and its ``status`` connection count once the storm settled.

A storm from one IP needs ``limits.connections_per_ip_per_minute`` far above the default 600,
``limits.handshakes_in_progress_per_ip`` above the default 128 (and
per-connection user ids, or ``connections_per_user_per_minute`` above 60): with the defaults, wsd
refuses all but 600 of the reconnects with HTTP 429, which is what it is for. The bench config sets
every connection limit to 1,000,000. Everything runs on 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import multiprocessing as mp
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
from loadgen import RawClient, Target, _decode, _reason, log, percentile, raise_fd_limit, run_loop

LINGER_RST = struct.pack("ii", 1, 0)


class _NullSink:
    def on_text(self, payload: Any) -> None:
        pass

    def on_closed(self, code: int | None) -> None:
        pass


class StormClient(RawClient):
    """RawClient that keeps its welcome (session id, ``resumed``) and the time it arrived."""

    def __init__(self, *a: Any, resume: bool = False) -> None:
        super().__init__(*a)
        self.resume = resume
        self.session_id: str | None = None
        self.resumed: bool | None = None
        self.welcome_at: float | None = None

    def _on_text(self, payload: Any) -> None:
        if self.state == "welcome":
            try:
                obj = _decode(payload)
            except Exception:  # noqa: BLE001 - not JSON: the base class reports it
                obj = None
            if type(obj) is dict and obj.get("type") == "welcome":
                self.welcome_at = time.monotonic()
                self.session_id = obj.get("session_id")
                self.resumed = obj.get("resumed") is True
                if self.resume and self.resumed:  # the session brought its subscriptions back
                    self._open()
                    return
        super()._on_text(payload)

    def drop(self) -> None:
        """Abort with RST, as a dropped network path looks to the server."""
        tr = self.transport
        if tr is None:
            return
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        tr.abort()


class StormWorker:
    def __init__(self, target: Target, first: int, count: int, timeout_s: float) -> None:
        self.target = target
        self.paths = [target.request_target(f"u{i}") for i in range(first, first + count)]  # minted up front
        self.timeout_s = timeout_s
        self.clients: list[StormClient] = []
        self.sessions: list[str | None] = [None] * count

    async def _open(self, k: int, resume: bool) -> StormClient:
        t = self.target
        path = self.paths[k]
        if resume and self.sessions[k]:
            path += f"&session={self.sessions[k]}"
        proto = StormClient(_NullSink(), t.host, t.port, path, True, t.channel, resume=resume)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: proto, t.host, t.port)
            await proto.ready
        except BaseException:
            proto.abort()
            raise
        return proto

    async def connect(self, concurrency: int | None, resume: bool) -> dict[str, Any]:
        n = len(self.paths)
        results: list[StormClient | None] = [None] * n
        failures: Counter[str] = Counter()
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        started = time.monotonic()

        async def one(k: int) -> None:
            try:
                if sem is None:
                    results[k] = await asyncio.wait_for(self._open(k, resume), self.timeout_s)
                else:
                    async with sem:
                        results[k] = await asyncio.wait_for(self._open(k, resume), self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - counted by kind
                failures[_reason(exc)] += 1

        await asyncio.gather(*(one(k) for k in range(n)))
        self.clients = [c for c in results if c is not None]
        for k, c in enumerate(results):
            if c is not None:
                self.sessions[k] = c.session_id
        welcomes = sorted(c.welcome_at - started for c in self.clients if c.welcome_at is not None)
        return {
            "started": started,
            "connected": len(self.clients),
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "last_welcome": max((c.welcome_at for c in self.clients if c.welcome_at), default=None),
            "welcome_s": welcomes,
            "resumed_true": sum(1 for c in self.clients if c.resumed),
            "resumed_false": sum(1 for c in self.clients if c.resumed is False),
        }

    def drop_all(self) -> int:
        clients, self.clients = self.clients, []
        for c in clients:
            c.drop()
        return len(clients)


def worker_main(pipe: Any, target: Target, first: int, count: int, timeout_s: float) -> None:
    raise_fd_limit()

    async def serve() -> None:
        w = StormWorker(target, first, count, timeout_s)
        loop = asyncio.get_running_loop()
        while True:
            cmd, arg = await loop.run_in_executor(None, pipe.recv)
            if cmd == "connect":
                pipe.send(await w.connect(arg["concurrency"], arg["resume"]))
            elif cmd == "drop":
                pipe.send(w.drop_all())
            elif cmd == "exit":
                w.drop_all()
                pipe.send("bye")
                return

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve())


class Workers:
    def __init__(self, target: Target, conns: int, procs: int, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.handles = []
        per, extra = divmod(conns, procs)
        first = 0
        for i in range(procs):
            count = per + (1 if i < extra else 0)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, target, first, count, timeout_s), daemon=True)
            p.start()
            self.handles.append((p, parent))
            first += count

    def call_all(self, cmd: str, arg: Any = None, wait_s: float = 120.0) -> list[Any]:
        for _, pipe in self.handles:
            pipe.send((cmd, arg))
        out = []
        deadline = time.monotonic() + wait_s
        for p, pipe in self.handles:
            if not pipe.poll(max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"worker {p.pid}: no answer to {cmd} within {wait_s}s")
            out.append(pipe.recv())
        return out

    def stop(self) -> None:
        for p, pipe in self.handles:
            with contextlib.suppress(Exception):
                pipe.send(("exit", None))
        for p, _ in self.handles:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)


def ctl(sock: str, method: str, **params: Any) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(json.dumps({"id": 1, "method": method, "params": params}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def wait_connections(sock: str, want: int, max_s: float) -> tuple[int, float]:
    """Poll ``status`` until the daemon counts ``want`` connections (bounded); (count, seconds)."""
    t0 = time.monotonic()
    count = -1
    while time.monotonic() - t0 < max_s:
        count = int(ctl(sock, "status")["connections"])
        if count == want:
            break
        time.sleep(0.1)
    return count, round(time.monotonic() - t0, 2)


def merge(parts: list[dict[str, Any]], n: int) -> dict[str, Any]:
    started = min(p["started"] for p in parts)
    failures: Counter[str] = Counter()
    for p in parts:
        failures.update(p["failures"])
    lasts = [p["last_welcome"] for p in parts if p["last_welcome"]]
    welcomes = sorted(w for p in parts for w in p["welcome_s"])
    connected = sum(p["connected"] for p in parts)
    return {
        "connected": connected,
        "failed": sum(failures.values()),
        "failures": dict(failures.most_common()),
        "all_welcomed": connected == n,
        "time_to_all_welcomed_s": round(max(lasts) - started, 3) if lasts and connected == n else None,
        "time_to_last_welcome_s": round(max(lasts) - started, 3) if lasts else None,
        "welcome_p50_s": round(percentile(welcomes, 50) or 0, 3),
        "welcome_p99_s": round(percentile(welcomes, 99) or 0, 3),
        "resumed_true": sum(p["resumed_true"] for p in parts),
        "resumed_false": sum(p["resumed_false"] for p in parts),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="wsd-storm-"))
    server, target = run_loop(servers.start_wsd(tmp, args.conns, "control"))
    sock = target.control_socket
    assert sock
    import psutil

    proc = psutil.Process(server.pid)
    workers = Workers(target, args.conns, args.procs, args.timeout_s)
    doc: dict[str, Any] = {
        "config": {
            "conns": args.conns,
            "procs": args.procs,
            "pause_s": args.pause_s,
            "timeout_s": args.timeout_s,
            "variants": args.variants,
            "connections_per_ip_per_minute": 1_000_000,
            "users": "one per connection (u<i>)",
        },
        "server_pid": server.pid,
        "rss_before_connect_mib": round(proc.memory_info().rss / 2**20, 1),
    }
    try:
        log(f"connect {args.conns} over {args.procs} workers")
        first = merge(workers.call_all("connect", {"concurrency": 100, "resume": False}), args.conns)
        doc["initial_connect"] = first
        count, _ = wait_connections(sock, args.conns, 10)
        doc["rss_connected_mib"] = round(proc.memory_info().rss / 2**20, 1)
        doc["status_connections_connected"] = count
        for variant in args.variants:
            log(f"[{variant}] drop all, reconnect all at once")
            dropped = sum(workers.call_all("drop"))
            if args.pause_s:
                time.sleep(args.pause_s)
            cpu0 = proc.cpu_times()
            res = merge(
                workers.call_all(
                    "connect",
                    {"concurrency": None, "resume": variant == "resume"},
                    wait_s=args.timeout_s + 60,
                ),
                args.conns,
            )
            count, settle = wait_connections(sock, res["connected"], 15)
            cpu1 = proc.cpu_times()
            res["dropped"] = dropped
            res["server_cpu_s"] = round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 2)
            res["status_connections_after"] = count
            res["status_settle_s"] = settle
            res["rss_after_mib"] = round(proc.memory_info().rss / 2**20, 1)
            if variant == "resume":
                res["every_resumed_client_got_resumed_true"] = (
                    res["resumed_true"] == res["connected"] == args.conns
                )
            doc[variant] = res
            log(
                f"[{variant}] {json.dumps({k: res[k] for k in ('connected', 'failed', 'time_to_all_welcomed_s')})}"
            )
        doc["server_alive"] = server.alive()
        doc["server_log_tail"] = server.tail(5)
    finally:
        workers.stop()
        server.stop()
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=5000)
    p.add_argument("--procs", type=int, default=2, help="generator worker processes")
    p.add_argument("--variants", default="resume,fresh", help="comma list of resume, fresh (in that order)")
    p.add_argument("--pause-s", type=float, default=0.0, help="wait between the drop and the reconnect")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-client bound on one reconnect")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.conns <= 0 or args.procs <= 0 or not set(args.variants) <= {"resume", "fresh"}:
        p.error("--conns/--procs must be positive; --variants: resume, fresh")
    raise_fd_limit()
    atexit.register(servers.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    doc = run(args)
    json.dump(doc, sys.stdout, indent=2)
    print()
    ok = all(doc.get(v, {}).get("all_welcomed") for v in args.variants)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
