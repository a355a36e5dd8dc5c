"""Chaos, long form: every fault several times over minutes, counts per fault as JSON.

    python benchmarks/chaos.py [--rounds 3] [--rate 40] [--settle 5] [--pause-s 4] [--blackhole-s 4]

Two wsd nodes on one redis-server (AOF, ``appendfsync always``), a publisher at ``--rate`` publications per second
over the control sockets of both nodes in turn, round robin over six channels (two company channels, four user
channels), and four ``wsd.client`` applications (one through a TCP proxy that can black-hole it). Each round injects,
in turn: ``kill -9`` of the node most applications are on (started again on its port), ``kill -9`` of redis-server
(started again on its AOF), SIGSTOP of redis-server for ``--pause-s`` seconds, the proxied application's connection
black-holed for ``--blackhole-s`` seconds; ``--settle`` seconds of steady publishing follow each fault. The harness
is tests/chaos.py (the short form is tests/test_chaos.py); what the counts mean: docs/reliability.md.

Prints one JSON document: ``by_fault`` (each fault's rounds summed), ``phases`` (each injection), ``total``,
``refused`` (publications refused, by code), ``events`` and ``seconds``. Exits 1 if anything acknowledged was lost,
delivered twice or out of order. Needs redis-server on PATH; run from the repository root with it on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos import FAULTS, Chaos, by_fault


async def run(args: argparse.Namespace) -> dict[str, object]:
    t0 = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM stops the run like Ctrl-C does: the nodes, the proxies and redis-server are stopped on the way out.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with Chaos(rate=args.rate, settle=args.settle, pause_s=args.pause_s, blackhole_s=args.blackhole_s,
                     down_s=args.down_s) as chaos:
        await chaos.steady()
        faults = [f for f in args.faults.split(",") if f]
        for r in range(args.rounds):
            for fault in faults:
                print(f"round {r + 1}/{args.rounds}: {fault}", file=sys.stderr, flush=True)
                await chaos.inject(fault)
        await chaos.finish()
        report = chaos.report()
    return {"by_fault": by_fault(report), **report, "seconds": round(time.monotonic() - t0, 1),
            "settings": vars(args)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="how many times each fault is injected")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, in order (of {', '.join(FAULTS)})")
    p.add_argument("--rate", type=float, default=40.0, help="publications per second")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of steady publishing after each fault")
    p.add_argument("--pause-s", type=float, default=4.0, help="seconds redis-server stays stopped (SIGSTOP)")
    p.add_argument("--blackhole-s", type=float, default=4.0, help="seconds the proxy black-holes the connection")
    p.add_argument("--down-s", type=float, default=1.0, help="seconds a killed node or Redis stays down")
    args = p.parse_args()
    bad = [f for f in args.faults.split(",") if f and f not in FAULTS]
    if bad:
        p.error(f"unknown fault {bad[0]!r} (known: {', '.join(FAULTS)})")
    try:
        result = asyncio.run(run(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("stopped before the end: no report", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    total = result["total"]
    assert isinstance(total, dict)
    return 1 if total["lost"] or total["delivered_twice"] or total["out_of_order"] else 0


if __name__ == "__main__":
    sys.exit(main())
