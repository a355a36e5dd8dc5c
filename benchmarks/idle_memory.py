"""Server memory per idle connection, wsd against the bare ``websockets`` reference.

    python benchmarks/idle_memory.py --conns 2000 --target both [--runs 3] [--subscribe]

For each target and run: a fresh server, a warm-up (10 connections opened and closed), the server's
RSS, then N connections opened (compression off; for wsd each one authenticated with its own JWT and
its welcome frame received; with ``--subscribe`` also subscribed to one global channel), a settle
time, RSS again. Per connection = (RSS after - RSS before) / connected, in KiB. One JSON document on
stdout with the median per target, every run, the ratio wsd / bare, and the check against the
acceptance figure (idle authenticated connection <= 24 KiB with compression off).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
from fanout import machine
from loadgen import json, log, measure_idle, raise_fd_limit, run_loop

ACCEPTANCE_KIB = 24.0


async def one_run(kind: str, args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    server = None
    try:
        server, target = await servers.start(kind, tmpdir, args.conns, args)
        if not args.subscribe:
            target.channel = None
        log(f"[{kind}] server pid {server.pid}: opening {args.conns} idle connections")
        result = await measure_idle(target, args.conns, args.procs, args.client, args.settle_s)
        if not server.alive():
            raise RuntimeError(f"{kind} server died during the run: {server.tail()}")
        log(f"[{kind}] {result['rss_per_conn_kib']} KiB per idle connection")
        return result
    except Exception as exc:
        log(f"[{kind}] run failed: {type(exc).__name__}: {exc}")
        return {
            "target": kind,
            "error": f"{type(exc).__name__}: {exc}",
            "server_log_tail": server.tail(10) if server is not None else None,
        }
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    targets = ["bare", "wsd"] if args.target == "both" else [args.target]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        for run in range(args.runs):
            for kind in targets if run % 2 == 0 else list(reversed(targets)):
                runs[kind].append(await one_run(kind, args, Path(tmp)))
    doc: dict[str, Any] = {
        "benchmark": "idle_memory",
        "started": started,
        "machine": machine(),
        "config": {
            "conns": args.conns,
            "runs": args.runs,
            "subscribe": args.subscribe,
            "procs": args.procs,
            "client": args.client,
            "compression": None,
            "settle_s": args.settle_s,
        },
        "results": {},
    }
    for kind, rs in runs.items():
        good = [r["rss_per_conn_kib"] for r in rs if "error" not in r]
        doc["results"][kind] = {
            "rss_per_conn_kib": round(statistics.median(good), 2) if good else None,
            "runs_ok": len(good),
            "runs_failed": len(rs) - len(good),
            "runs": rs,
        }
    w = doc["results"].get("wsd", {}).get("rss_per_conn_kib")
    b = doc["results"].get("bare", {}).get("rss_per_conn_kib")
    if "wsd" in runs and "bare" in runs:
        doc["ratio"] = round(w / b, 3) if w is not None and b else None
    if w is not None:
        doc["acceptance"] = {"limit_kib": ACCEPTANCE_KIB, "wsd_kib": w, "pass": w <= ACCEPTANCE_KIB}
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--target", choices=["wsd", "bare", "both"], default="both")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument(
        "--subscribe", action="store_true", help="wsd: also subscribe each connection to a channel"
    )
    p.add_argument("--procs", type=int, default=2, help="load generator worker processes")
    p.add_argument("--client", choices=["raw", "websockets"], default="raw")
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--publish", default="control", help=argparse.SUPPRESS)
    p.add_argument("--wsd-cmd", default=None, help='command to run wsd (default: "python -m wsd")')
    p.add_argument("--bare-loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--ping-interval", type=float, default=30.0)
    args = p.parse_args(argv)
    args.bare_frame = "envelope"
    if args.conns <= 0 or args.runs <= 0:
        p.error("--conns and --runs must be positive")
    raise_fd_limit()
    atexit.register(servers.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        doc = run_loop(bench(args))
    except KeyboardInterrupt:
        log("interrupted; servers and workers stopped")
        return 130
    finally:
        servers.stop_all()
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 1 if any(r["runs_failed"] for r in doc["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
