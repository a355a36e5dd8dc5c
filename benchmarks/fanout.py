"""Fan-out benchmark: wsd against a bare ``websockets`` server, same generator, same run.

    python benchmarks/fanout.py --sizes 1000,5000,10000 --target both --runs 3
    python benchmarks/fanout.py --quick --target bare          # 1000 connections, short phases, < 60 s

For each size and run, each target gets a fresh server and a fresh generator, and goes through the
phases connect, idle, steady and burst (see docs/benchmarks.md). Targets alternate order between runs.
One JSON document goes to stdout: per size, per target, the median of each figure over the runs
(``median``), every run's full detail (``runs``), and ``ratio`` = wsd median / bare median per figure.
Progress goes to stderr. Exit status 1 if any run failed (the JSON says which and why).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import servers
from loadgen import FIGURES, PhaseOptions, flatten, log, raise_fd_limit, run_loop, run_phases


def machine() -> dict[str, Any]:
    import msgspec
    import psutil
    import uvloop
    import websockets

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "uvloop": uvloop.__version__,
        "msgspec": msgspec.__version__,
        "note": "server and load generator share these CPUs",
    }


def median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return statistics.median(nums) if nums else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def summarize(per_target: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, runs in per_target.items():
        good = [r for r in runs if "error" not in r]
        flat = [flatten(r) for r in good]
        out[kind] = {
            "median": {name: median([f[name] for f in flat]) for name in FIGURES},
            "runs_ok": len(good),
            "runs_failed": len(runs) - len(good),
            "publish_path": good[0]["publish_path"] if good else None,
            "noisy_phases": sum(
                1 for r in good for phase in ("idle", "steady", "burst") if r.get(phase, {}).get("noisy")
            ),
            "runs": runs,
        }
    if "wsd" in out and "bare" in out:
        w, b = out["wsd"]["median"], out["bare"]["median"]
        out["ratio"] = {name: ratio(w[name], b[name]) for name in FIGURES}
    return out


def phase_options(args: argparse.Namespace, size: int) -> PhaseOptions:
    kw: dict[str, Any] = {"conns": size, "procs": args.procs, "client": args.client}
    for name in ("idle_s", "steady_rate", "steady_s", "burst_messages", "settle_s"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    opts = PhaseOptions.quick(**kw) if args.quick else PhaseOptions(**kw)
    return opts.resolve()


async def one_run(kind: str, size: int, args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    server = None
    try:
        server, target = await servers.start(kind, tmpdir, size, args)
        log(f"[{kind}] server pid {server.pid} port {target.port}")
        result = await run_phases(target, phase_options(args, size))
        if not server.alive():
            raise RuntimeError(f"{kind} server died during the run: {server.tail()}")
        result["server_log_tail"] = server.tail(5) or None
        return result
    except Exception as exc:
        tail = server.tail(10) if server is not None else ""
        log(f"[{kind}] run failed: {type(exc).__name__}: {exc}")
        return {"target": kind, "error": f"{type(exc).__name__}: {exc}", "server_log_tail": tail or None}
    finally:
        if server is not None:
            code = await asyncio.to_thread(server.stop)
            log(f"[{kind}] server stopped (exit {code}) after {time.monotonic() - started:.1f}s")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [1000] if args.quick and not args.sizes_given else args.sizes
    targets = ["bare", "wsd"] if args.target == "both" else [args.target]
    runs = 1 if args.quick and not args.runs_given else args.runs
    started = time.time()
    doc: dict[str, Any] = {
        "benchmark": "fanout",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {
            "sizes": sizes,
            "targets": targets,
            "runs": runs,
            "quick": args.quick,
            "procs": args.procs,
            "client": args.client,
            "publish": args.publish,
            "bare_loop": args.bare_loop,
            "bare_frame": args.bare_frame,
            "ping_interval_s": args.ping_interval,
            "phases": {str(s): _phase_dict(phase_options(args, s)) for s in sizes},
        },
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        tmpdir = Path(tmp)
        redis = None
        if args.workers:  # `wsd serve --workers N`: the workers share a private redis-server
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.chaos import RedisServer

            (tmpdir / "redis").mkdir()
            redis = RedisServer(tmpdir / "redis")
            redis.start()
            args.redis_url = redis.url
            doc["config"]["workers"] = args.workers
        try:
            await _sizes(args, sizes, targets, runs, tmpdir, doc)
        finally:
            if redis is not None:
                redis.stop()
    doc["duration_s"] = round(time.time() - started, 1)
    doc["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return doc


async def _sizes(args: argparse.Namespace, sizes: list[int], targets: list[str], runs: int, tmpdir: Path,
                 doc: dict[str, Any]) -> None:
    for size in sizes:
        per_target: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
        for run in range(runs):
            order = targets if run % 2 == 0 else list(reversed(targets))
            for kind in order:
                log(f"=== size {size} run {run + 1}/{runs} target {kind}")
                per_target[kind].append(await one_run(kind, size, args, tmpdir))
        doc["results"][str(size)] = summarize(per_target)


def _phase_dict(opts: PhaseOptions) -> dict[str, Any]:
    keys = (
        "settle_s",
        "idle_s",
        "steady_rate",
        "steady_s",
        "burst_messages",
        "burst_window",
        "payload_bytes",
    )
    return {k: getattr(opts, k) for k in keys}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", default=None, help="comma-separated connection counts (default 1000,5000,10000)"
    )
    p.add_argument("--quick", action="store_true", help="size 1000, one run, short phases (< 60 s)")
    p.add_argument("--target", choices=["wsd", "bare", "both"], default="both")
    p.add_argument(
        "--runs", type=int, default=None, help="runs per size and target (default 3; 1 with --quick)"
    )
    p.add_argument("--procs", type=int, default=2, help="load generator worker processes")
    p.add_argument(
        "--client", choices=["raw", "websockets"], default="raw", help="generator client implementation"
    )
    p.add_argument("--publish", choices=["control", "api"], default="control", help="wsd publish path")
    p.add_argument(
        "--wsd-cmd",
        default=None,
        help='command to run wsd (default: "python -m wsd"); "serve -c FILE" is appended',
    )
    p.add_argument("--bare-loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument(
        "--bare-frame",
        choices=["envelope", "raw"],
        default="envelope",
        help="bare: publish wsd-shaped message frames (default) or the bare payload",
    )
    p.add_argument(
        "--ping-interval", type=float, default=30.0, help="bare server ping interval, s (wsd: 30 s too)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="wsd: run `wsd serve --workers N` on a private redis-server (Redis engine, even for 1); "
        "server CPU and RSS figures then cover the supervisor only",
    )
    p.add_argument("--settle-s", type=float)
    p.add_argument("--idle-s", type=float)
    p.add_argument(
        "--steady-rate",
        type=float,
        help="published msg/s in the steady phase (default: 20000 deliveries/s / size, 1..100)",
    )
    p.add_argument("--steady-s", type=float)
    p.add_argument(
        "--burst-messages",
        type=int,
        help="messages in the burst (default: 500k deliveries / size, 20..500; 200k with --quick)",
    )
    args = p.parse_args(argv)
    args.sizes_given = args.sizes is not None
    args.sizes = [int(s) for s in (args.sizes or "1000,5000,10000").split(",") if s.strip()]
    if not args.sizes or any(s <= 0 for s in args.sizes):
        p.error("--sizes needs positive integers")
    args.runs_given = args.runs is not None
    args.runs = args.runs or 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()  # inherited by the servers and the generator workers, which raise it again
    atexit.register(servers.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        doc = run_loop(bench(args))
    except KeyboardInterrupt:
        log("interrupted; servers and workers stopped")
        return 130
    finally:
        servers.stop_all()
    loadgen.json.dump(doc, sys.stdout, indent=2)
    print()
    failed = any(v.get("runs_failed") for r in doc["results"].values() for k, v in r.items() if k != "ratio")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
