"""Scaling: RSS per connection and server CPU per delivery at 1k, 5k, 10k and 20k connections, wsd and bare.

    python benchmarks/scaling.py                              # 1000,5000,10000,20000; both targets (~6 min)
    python benchmarks/scaling.py --sizes 1000,10000 --runs 2

For each size, each target gets a fresh server and goes through fanout.py's phases (benchmarks/loadgen.py
``run_phases``, the short ``--quick`` lengths): every connection subscribes to one channel; the figures
kept are the idle RSS per connection ((RSS with N connections - RSS before) / N) and the server CPU per
delivery in the burst (server CPU seconds / messages delivered: the fan-out's cost per receiver), plus the
steady phase's p99. Both should stay flat across sizes: the JSON gives each figure relative to the
smallest size (``vs_smallest``) and wsd/bare per size (``ratio``).

File descriptors: the server holds one per connection. The script raises ``RLIMIT_NOFILE`` to the hard
limit; a size the hard limit cannot hold (plus 200 for the server's own files) is lowered to what fits and
the JSON says so (``sizes_capped``): on a box whose hard limit is 20000, 20,000 connections become 19,800.
Raise the hard limit (``ulimit -Hn``, or ``LimitNOFILE=`` for a service) to run the full size.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec

import fanout
import servers
from loadgen import log, raise_fd_limit, run_loop

FIGURES = {
    "rss_per_conn_kib": ("idle", "rss_per_conn_kib"),
    "cpu_us_per_delivery": ("burst", "server_cpu_us_per_delivery"),
    "burst_deliveries_per_s": ("burst", "deliveries_per_s"),
    "steady_p99_ms": ("steady", "p99_ms"),
    "connect_rate_cps": ("connect", "rate_cps"),
}
FD_RESERVE = 200


def run_args(args: argparse.Namespace) -> argparse.Namespace:
    """What fanout.one_run reads: the quick phase lengths, the api publish path, default servers."""
    return argparse.Namespace(
        quick=True,
        procs=args.procs,
        client="raw",
        publish="control",
        wsd_cmd=args.wsd_cmd,
        bare_loop="uvloop",
        bare_frame="envelope",
        ping_interval=30.0,
        settle_s=2.0,
        idle_s=None,
        steady_rate=None,
        steady_s=None,
        burst_messages=None,
    )


def figures(result: dict[str, Any]) -> dict[str, Any]:
    return {name: result.get(phase, {}).get(key) for name, (phase, key) in FIGURES.items()}


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    soft = raise_fd_limit()
    capped = {}
    sizes = []
    for s in args.sizes:
        fit = min(s, soft - FD_RESERVE)
        if fit != s:
            capped[str(s)] = fit
            log(f"size {s} needs more file descriptors than RLIMIT_NOFILE ({soft}) allows: running {fit}")
        sizes.append(fit)
    targets = ["bare", "wsd"] if args.target == "both" else [args.target]
    fa = run_args(args)
    doc: dict[str, Any] = {
        "benchmark": "scaling",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": fanout.machine(),
        "config": {"sizes": sizes, "targets": targets, "runs": args.runs, "procs": args.procs,
                   "fd_limit": soft, "sizes_capped": capped,
                   "phases": {str(s): fanout._phase_dict(fanout.phase_options(fa, s)) for s in sizes}},
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        for size in sizes:
            per: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
            for run in range(args.runs):
                for kind in targets if run % 2 == 0 else list(reversed(targets)):
                    log(f"=== size {size} run {run + 1}/{args.runs} target {kind}")
                    r = await fanout.one_run(kind, size, fa, Path(tmp))
                    per[kind].append(r)
            entry: dict[str, Any] = {}
            for kind, runs in per.items():
                good = [figures(r) for r in runs if "error" not in r]
                entry[kind] = {
                    "median": {f: _median([g[f] for g in good]) for f in FIGURES},
                    "runs": [figures(r) if "error" not in r else {"error": r["error"]} for r in runs],
                }
            if "wsd" in entry and "bare" in entry:
                w, b = entry["wsd"]["median"], entry["bare"]["median"]
                entry["ratio"] = {f: (round(w[f] / b[f], 3) if w[f] and b[f] else None) for f in FIGURES}
            doc["results"][str(size)] = entry
    first = str(sizes[0])
    for size, entry in doc["results"].items():
        for kind in targets:
            base = doc["results"][first][kind]["median"]
            m = entry[kind]["median"]
            entry[kind]["vs_smallest"] = {
                f: (round(m[f] / base[f], 3) if m[f] and base[f] else None)
                for f in ("rss_per_conn_kib", "cpu_us_per_delivery")
            }
    return doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,5000,10000,20000")
    p.add_argument("--target", choices=["wsd", "bare", "both"], default="both")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--wsd-cmd", default=None)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    atexit.register(servers.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log(f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}")
    try:
        doc = run_loop(bench(args))
    except KeyboardInterrupt:
        return 130
    finally:
        servers.stop_all()
    print(msgspec.json.format(msgspec.json.encode(doc)).decode())
    failed = any("error" in r for e in doc["results"].values() for k, v in e.items() if k in ("wsd", "bare")
                 for r in v["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
