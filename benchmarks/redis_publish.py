"""Publications through the Redis engine: how many one node sustains, and the latency at 1,000/s.

    python benchmarks/redis_publish.py                     # 1,000 subscribers, 32 publishers (~1 min)
    python benchmarks/redis_publish.py --baseline-wsd-cmd "python /path/to/old/run_wsd.py"   # before/after

A private redis-server (no persistence) on a free port, one wsd node on the Redis engine, ``--users``
subscriber connections (benchmarks/loadgen.py workers), each subscribed to its own ``notifications`` instance,
and ``--publishers`` connections of the ``api`` pool (tokens with the admin role) that publish to random
users' instances. A node serves one connection's requests one after another (a publish waits for Redis), so
the publishers are many connections, each pipelining up to ``--window`` requests.

Phases, for each wsd build:

- **max**: every publisher keeps ``--window`` requests outstanding for ``--max-s`` seconds: publications
  acknowledged ``ok`` per second (stored in Redis: the reply comes only then), errors, and deliveries per
  second at the subscribers (through the Redis bus, as every node delivers).
- **latency**: ``--rate`` publications/s (default 1,000), spread over the publishers, for ``--latency-s``
  seconds: p50/p99 publish-to-receive at the subscribers.

``--engine-only``: no daemon, no sockets to clients: ``--publishers`` coroutines of this process publish through
the Redis engine itself (``wsd.engine.redis.RedisEngine.publish``, one after another each) for ``--max-s``
seconds; ``--wsd-path DIR`` measures the engine of another tree the same way (before/after). What the
engine alone sustains, without the daemon's per-connection and per-delivery work.

One JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import random
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec

import servers
from fanout import machine
from loadgen import Accounting, LoadGen, ServerProbe, latency_figures, log, raise_fd_limit, run_loop
from per_user import NOTIFICATIONS, PubClient, frame_builder, open_publisher


def start_redis(tmpdir: Path) -> tuple[servers.ServerProcess, str]:
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    port = servers.free_port()
    rdir = tmpdir / f"redis-{time.time_ns()}"
    rdir.mkdir()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(rdir)]
    server = servers.ServerProcess("redis", argv, rdir / "redis.log")
    server.start()
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return server, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if not server.alive() or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server did not start: {server.tail()}")
        time.sleep(0.05)


async def max_phase(
    pubs: list[PubClient], build: Any, lg: LoadGen, probe: ServerProbe, args: argparse.Namespace, phase: int
) -> dict[str, Any]:
    await lg.set_phase(phase)
    rng = random.Random(11)
    sent = [0] * len(pubs)
    ok0 = sum(p.ok for p in pubs)
    err0 = sum(p.errors for p in pubs)
    base = [p.ok + p.errors for p in pubs]
    seq = 0
    with Accounting(probe, lg.pids) as acct:
        w0 = time.time()
        t0 = time.monotonic()
        end = t0 + args.max_s
        while time.monotonic() < end:
            for k, p in enumerate(pubs):
                outstanding = sent[k] - (p.ok + p.errors - base[k])
                n = args.window - outstanding
                if n > 0:
                    p.write_frames([build(phase, seq + i, rng.randrange(args.users)) for i in range(n)])
                    seq += n
                    sent[k] += n
            await asyncio.sleep(0.001)
        elapsed = time.monotonic() - t0
        acked = sum(p.ok for p in pubs) - ok0
        errors = sum(p.errors for p in pubs) - err0
        # the rest of the replies (bounded), then the deliveries
        deadline = time.monotonic() + 10
        while sum(p.ok + p.errors for p in pubs) - ok0 - err0 < sum(sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        total_ok = sum(p.ok for p in pubs) - ok0
        await lg.drain(total_ok, 1.0, 15.0)
    rep = await lg.report()
    span = (rep["last_recv"] - w0) if rep["received"] else None
    return {
        "seconds": round(elapsed, 2),
        "publications_acked_per_s": round(acked / elapsed, 1),
        "errors_per_s": round(errors / elapsed, 1),
        "sent": sum(sent),
        "acked_total": total_ok,
        "errors_total": sum(p.errors for p in pubs) - err0,
        "first_error": next((p.first_error for p in pubs if p.first_error), None),
        "received": rep["received"],
        "deliveries_per_s": round(rep["received"] / span, 1) if span else None,
        **latency_figures(rep["samples"], rep["max_lat"]),
        "server_cpu_us_per_publication": None if acct.server is None or not total_ok
        else round(1e6 * acct.server / total_ok, 2),
        **acct.figures(),
    }


async def latency_phase(
    pubs: list[PubClient], build: Any, lg: LoadGen, probe: ServerProbe, args: argparse.Namespace, phase: int
) -> dict[str, Any]:
    await lg.set_phase(phase)
    rng = random.Random(13)
    ok0 = sum(p.ok for p in pubs)
    err0 = sum(p.errors for p in pubs)
    total = int(args.rate * args.latency_s)
    with Accounting(probe, lg.pids) as acct:
        t0 = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - t0) * args.rate) + 1)
            for i in range(sent, due):
                pubs[i % len(pubs)].write_frames([build(phase, i, rng.randrange(args.users))])
            sent = due
            await asyncio.sleep(0.002)
        deadline = time.monotonic() + 10
        while sum(p.ok + p.errors for p in pubs) - ok0 - err0 < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        acked = sum(p.ok for p in pubs) - ok0
        await lg.drain(acked, 1.0, 10.0)
    rep = await lg.report()
    return {
        "rate": args.rate,
        "published": sent,
        "acked": acked,
        "errors": sum(p.errors for p in pubs) - err0,
        "received": rep["received"],
        **latency_figures(rep["samples"], rep["max_lat"]),
        **acct.figures(),
    }


async def one_run(kind: str, args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    redis = server = None
    pubs: list[PubClient] = []
    try:
        redis, url = start_redis(tmpdir)
        engine = f'\n[engine]\ntype = "redis"\nurl = "{url}"\nprefix = "b{secrets.token_hex(3)}"\n'
        server, target = await servers.start_wsd(
            tmpdir,
            args.users + args.publishers,
            publish="api",
            wsd_cmd=args.baseline_wsd_cmd if kind == "wsd_base" else args.wsd_cmd,
            extra_limits={"max_history_channels": args.users + 100},
            extra_toml=NOTIFICATIONS.format(history=args.history_size) + engine,
        )
        target.channel = "notifications"
        log(f"[{kind}] wsd pid {server.pid}, redis pid {redis.pid}")
        probe = ServerProbe(target.server_pid)
        pubs = [await open_publisher(target) for _ in range(args.publishers)]
        build = frame_builder("wsd", args.payload_bytes)
        out: dict[str, Any] = {"target": kind}
        async with LoadGen(target, args.users, args.procs, connect_concurrency=50) as lg:
            c = await lg.connect()
            if c["failures"]:
                raise RuntimeError(f"{c['failures']} connections failed: {c['failure_reasons']}")
            log(f"[{kind}] {c['connected']} subscribers; warm-up")
            await latency_phase(pubs, build, lg, probe, argparse.Namespace(**{**vars(args), "latency_s": 1.0}), 1)
            log(f"[{kind}] max: {args.publishers} publishers x window {args.window} for {args.max_s}s")
            out["max"] = await max_phase(pubs, build, lg, probe, args, 2)
            log(f"[{kind}]   {out['max']['publications_acked_per_s']} publications/s acked, "
                f"{out['max']['deliveries_per_s']} deliveries/s, errors {out['max']['errors_total']}")
            log(f"[{kind}] latency: {args.rate}/s for {args.latency_s}s")
            out["latency"] = await latency_phase(pubs, build, lg, probe, args, 3)
            log(f"[{kind}]   p50 {out['latency']['p50_ms']} ms p99 {out['latency']['p99_ms']} ms")
        if not server.alive():
            raise RuntimeError(f"wsd died: {server.tail()}")
        return out
    except Exception as exc:
        log(f"[{kind}] run failed: {type(exc).__name__}: {exc}")
        return {"target": kind, "error": f"{type(exc).__name__}: {exc}",
                "server_log_tail": server.tail(10) if server is not None else None}
    finally:
        for p in pubs:
            p.abort()
        if server is not None:
            await asyncio.to_thread(server.stop)
        if redis is not None:
            await asyncio.to_thread(redis.stop)


async def engine_only(args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    """Publications/s through ``RedisEngine.publish`` alone: ``--publishers`` concurrent publishers."""
    if args.wsd_path:
        sys.path.insert(0, str(Path(args.wsd_path).resolve()))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from wsd.engine.base import EngineUnavailable, Publication
    from wsd.engine.redis import RedisEngine

    redis, url = start_redis(tmpdir)
    got = [0]
    eng = RedisEngine(url, prefix="e" + secrets.token_hex(3))
    try:
        await eng.start(lambda pub, scope=None: got.__setitem__(0, got[0] + 1))
        data = {"ts": time.time(), "sym": "EURUSD", "bid": 1.08412, "ask": 1.08425, "pad": "x" * 120}
        done = [0, 0]
        end = time.monotonic() + args.max_s

        async def publisher(k: int) -> None:
            i = 0
            while time.monotonic() < end:
                p = Publication(id=secrets.token_hex(8), channel=f"notifications/c1/u{(i * 31 + k) % args.users}",
                                group="notifications", type="tick", priority=2, data=data, ts=time.time())
                try:
                    await eng.publish(p, args.history_size, 3600)
                    done[0] += 1
                except EngineUnavailable:
                    done[1] += 1
                i += 1

        t0 = time.monotonic()
        cpu0 = time.process_time()
        await asyncio.gather(*(publisher(k) for k in range(args.publishers)))
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        return {"engine": str(Path(sys.modules["wsd"].__file__ or "").parent), "publishers": args.publishers,
                "publications_acked_per_s": round(done[0] / elapsed, 1), "refused": done[1],
                "bus_received": got[0], "cpu_us_per_publication": round(1e6 * cpu / max(1, done[0]), 1)}
    finally:
        await eng.stop()
        await asyncio.to_thread(redis.stop)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.engine_only:
        with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
            return {"benchmark": "redis_publish --engine-only", "machine": machine(),
                    "result": await engine_only(args, Path(tmp))}
    targets = ["wsd"] + (["wsd_base"] if args.baseline_wsd_cmd else [])
    doc: dict[str, Any] = {
        "benchmark": "redis_publish",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {k: getattr(args, k) for k in ("users", "publishers", "window", "max_s", "rate", "latency_s",
                                                 "payload_bytes", "history_size", "runs")},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        for run in range(args.runs):
            order = targets if run % 2 == 0 else list(reversed(targets))
            one = {}
            for kind in order:
                log(f"=== run {run + 1}/{args.runs} target {kind}")
                one[kind] = await one_run(kind, args, Path(tmp))
            doc["runs"].append(one)
    summary: dict[str, Any] = {}
    for kind in targets:
        good = [r[kind] for r in doc["runs"] if "error" not in r[kind]]
        vals = sorted(g["max"]["publications_acked_per_s"] for g in good)
        p99s = sorted(g["latency"]["p99_ms"] for g in good if g["latency"]["p99_ms"] is not None)
        summary[kind] = {
            "publications_acked_per_s": vals[len(vals) // 2] if vals else None,
            "all_runs": vals,
            "p99_ms_at_rate": p99s[len(p99s) // 2] if p99s else None,
        }
    doc["summary"] = summary
    return doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1000, help="subscriber connections, one user each")
    p.add_argument("--publishers", type=int, default=32, help="api publisher connections")
    p.add_argument("--window", type=int, default=16, help="outstanding requests per publisher (max phase)")
    p.add_argument("--max-s", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=1000.0, help="publications/s of the latency phase")
    p.add_argument("--latency-s", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--history-size", type=int, default=100)
    p.add_argument("--wsd-cmd", default=None)
    p.add_argument("--baseline-wsd-cmd", default=None, help="also run this wsd build (wsd_base) in the same run")
    p.add_argument("--engine-only", action="store_true", help="the Redis engine alone, in this process")
    p.add_argument("--wsd-path", default=None, help="--engine-only: a directory holding the wsd package to measure")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    atexit.register(servers.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        doc = run_loop(bench(args))
    except KeyboardInterrupt:
        return 130
    finally:
        servers.stop_all()
    print(msgspec.json.format(msgspec.json.encode(doc)).decode())
    return 1 if any("error" in v for r in doc.get("runs", []) for v in r.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
