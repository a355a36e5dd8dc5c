"""Server CPU per connect: N clients connect to a fresh server (wsd: token, welcome, subscribe; bare: handshake).

    python benchmarks/connect_cpu.py --target both --conns 3000 [--spy]

Tokens are minted before the clock starts. Reported per target (JSON lines on stdout): connected, elapsed,
connections per second, and the server's CPU time (user + system, from /proc via psutil) over the connect phase
divided by the connections: a figure that a shared, loaded machine inflates far less than the rate (the rate
also pays for the clients' CPU and for waiting). ``--spy`` records the server with ``py-spy record --format
raw`` into ``connect_<target>.txt`` (py-spy must be installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
from loadgen import RawClient, raise_fd_limit, run_loop


class _Opts:
    ping_interval = 30.0
    bare_loop = "uvloop"
    bare_frame = "envelope"
    publish = "control"
    wsd_cmd = None


class _Null:
    def on_text(self, payload: Any) -> None:
        pass

    def on_closed(self, code: int | None) -> None:
        pass


async def one_target(kind: str, n: int, concurrency: int, spy: bool) -> dict[str, Any]:
    import psutil

    server, t = await servers.start(kind, Path(tempfile.mkdtemp(prefix="wsd-conncpu-")), n, _Opts())
    loop = asyncio.get_running_loop()
    targets = [t.request_target(f"u{i}") for i in range(n)]
    prof = None
    clients: list[RawClient] = []
    try:
        if spy:
            prof = subprocess.Popen(["py-spy", "record", "-r", "300", "--nonblocking", "-f", "raw",
                                     "-o", f"connect_{kind}.txt", "-p", str(server.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
        sem = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            async with sem:
                p = RawClient(_Null(), t.host, t.port, targets[i], kind == "wsd", t.channel)
                try:
                    await loop.create_connection(lambda: p, t.host, t.port)
                    await asyncio.wait_for(p.ready, 60)
                    clients.append(p)
                except Exception:  # noqa: BLE001 - counted
                    p.abort()
                    failed += 1

        ps = psutil.Process(server.pid)
        cpu0 = sum(ps.cpu_times()[:2])
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.3)  # what the server still does for the last welcome
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        ok = len(clients)
        return {"target": kind, "connected": ok, "failed": failed, "elapsed_s": round(elapsed, 3),
                "rate_cps": round(ok / elapsed), "server_cpu_us_per_connect": round(cpu / max(ok, 1) * 1e6),
                "load_avg": round(os.getloadavg()[0], 2)}
    finally:
        if prof is not None:
            prof.send_signal(2)
            prof.wait()
        for c in clients:
            c.abort()
        await asyncio.to_thread(server.stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["wsd", "bare", "both"], default="both")
    p.add_argument("--conns", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--spy", action="store_true")
    args = p.parse_args(argv)
    raise_fd_limit()
    kinds = ["bare", "wsd"] if args.target == "both" else [args.target]
    try:
        for kind in kinds:
            print(json.dumps(run_loop(one_target(kind, args.conns, args.concurrency, args.spy))), flush=True)
    finally:
        servers.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
