"""Where an idle wsd connection's memory goes: tracemalloc over N connections, per connection.

    python benchmarks/conn_memory.py --conns 2000 [--no-subscribe] [--frames 25] [--top 25]

The daemon runs IN this process (``wsd.runtime.daemon.Daemon`` with a config from
``wsd.config.load_config`` on a temp file written by ``servers.wsd_config``, on uvloop in the main
thread: the daemon installs signal handlers, which only the main thread may do); the N clients run in
a separate process (this script with ``_clients``: the benchmarks' raw RFC 6455 client, each with its
own JWT, welcome received, subscribed to the global channel ``bench`` unless ``--no-subscribe``).

tracemalloc is started before the daemon; after a warm-up (10 connections opened and closed) and a
``gc.collect()`` a snapshot is taken, then N clients connect, the daemon's ``status`` must count them,
the script settles ``--settle-s``, collects, takes a second snapshot and reports the difference per
connection as JSON: by file:line (top ``--top``), by module (file), and by the innermost wsd frame
of each allocation's traceback (which of our lines made the allocation happen, directly or through
websockets / asyncio). RSS before/after is reported too (with tracemalloc's own overhead included, so
it is higher than ``idle_memory.py``'s figure). Kernel socket buffers are not process memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this tree's wsd, not whatever an installed copy points at


# ---------------------------------------------------------------------------------------------------
# client side (separate process)


async def _clients_main(port: int, secret: str, n: int, subscribe: bool) -> None:
    from loadgen import RawClient, Target, raise_fd_limit

    raise_fd_limit()

    class Null:
        def on_text(self, payload: Any) -> None:
            pass

        def on_closed(self, code: int | None) -> None:
            pass

    t = Target.wsd(port, secret, None, "control")
    if not subscribe:
        t.channel = None
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(100)
    clients: list[Any] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            proto = RawClient(Null(), t.host, t.port, t.request_target(f"u{i}"), True, t.channel)
            try:
                await loop.create_connection(lambda: proto, t.host, t.port)
                await asyncio.wait_for(proto.ready, 20)
                clients.append(proto)
            except Exception:  # noqa: BLE001 - any failure is one failed client
                proto.abort()
                failed += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({"connected": len(clients), "failed": failed}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # hold until the parent closes our stdin
    for c in clients:
        c.abort()


# ---------------------------------------------------------------------------------------------------
# daemon side (this process)


def _module(filename: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(filename).resolve().relative_to(HERE.parent))
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            if marker == "/lib/python3":
                rest = "stdlib/" + rest.split("/", 1)[1] if "/" in rest else rest
            return rest
    with contextlib.suppress(ValueError):
        return str(Path(filename).resolve().relative_to(HERE.parent))
    return filename


def _is_wsd(filename: str) -> bool:
    return "/wsd/" in filename and "site-packages" not in filename


async def _orchestrate(daemon: Any, port: int, secret: str, args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    from loadgen import RawClient, Target

    proc = psutil.Process()
    deadline = time.monotonic() + 20
    while not daemon.ready and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not daemon.ready:
        raise RuntimeError("daemon not ready within 20 s")

    # warm-up: lazy imports, caches, first-use allocations
    t = Target.wsd(port, secret, None, "control")
    loop = asyncio.get_running_loop()

    class Null:
        def on_text(self, payload: Any) -> None:
            pass

        def on_closed(self, code: int | None) -> None:
            pass

    async def warm() -> None:
        warm_clients = []
        for i in range(10):
            p = RawClient(Null(), t.host, t.port, t.request_target(f"w{i}"), True, t.channel)
            await loop.create_connection(lambda p=p: p, t.host, t.port)
            await asyncio.wait_for(p.ready, 10)
            warm_clients.append(p)
        for p in warm_clients:
            p.abort()

    await warm()
    deadline = time.monotonic() + 10
    while daemon.hub.conns and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    gc.collect()
    snap0 = tracemalloc.take_snapshot()
    rss0 = proc.memory_info().rss
    traced0 = tracemalloc.get_traced_memory()[0]

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "_clients",
        str(port),
        secret,
        str(args.conns),
        "1" if args.subscribe else "0",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 120)  # type: ignore[union-attr]
        client_report = json.loads(line or b"{}")
        deadline = time.monotonic() + 10
        while len(daemon.hub.conns) < client_report.get("connected", 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.settle_s)
        n = len(daemon.hub.conns)
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
        rss1 = proc.memory_info().rss
        traced1 = tracemalloc.get_traced_memory()[0]
    finally:
        with contextlib.suppress(Exception):
            child.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.wait(), 10)
        if child.returncode is None:
            child.kill()
            await child.wait()

    flt = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snap0 = snap0.filter_traces(flt)
    snap1 = snap1.filter_traces(flt)
    per = max(n, 1)

    by_line = []
    for st in snap1.compare_to(snap0, "lineno")[: args.top]:
        fr = st.traceback[0]
        by_line.append(
            {
                "site": f"{_module(fr.filename)}:{fr.lineno}",
                "bytes_per_conn": round(st.size_diff / per, 1),
                "blocks_per_conn": round(st.count_diff / per, 2),
            }
        )
    by_module: dict[str, float] = defaultdict(float)
    for st in snap1.compare_to(snap0, "filename"):
        by_module[_module(st.traceback[0].filename)] += st.size_diff
    by_wsd: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for st in snap1.compare_to(snap0, "traceback"):
        # frames are most recent first: the innermost wsd frame is the first one in our code
        # (else the innermost websockets frame; else the allocation came from C code run by the loop:
        # uvloop transports, sockets, tasks and futures created in callbacks)
        site = next((f"{_module(f.filename)}:{f.lineno}" for f in st.traceback if _is_wsd(f.filename)), None)
        if site is None:
            site = next(
                (
                    f"(no wsd frame) {_module(f.filename)}:{f.lineno}"
                    for f in st.traceback
                    if "/websockets/" in f.filename
                ),
                "(no Python frame: event loop C code)",
            )
        by_wsd[site][0] += st.size_diff
        by_wsd[site][1] += st.count_diff
    top_wsd = sorted(by_wsd.items(), key=lambda kv: -kv[1][0])[: args.top]
    return {
        "connections": n,
        "clients": client_report,
        "subscribed": args.subscribe,
        "tracemalloc_frames": args.frames,
        "traced_bytes_per_conn": round((traced1 - traced0) / per, 1),
        "traced_kib_per_conn": round((traced1 - traced0) / per / 1024, 2),
        "rss_kib_per_conn_with_tracemalloc": round((rss1 - rss0) / per / 1024, 2),
        "by_line": by_line,
        "by_module": [
            {"module": m, "bytes_per_conn": round(b / per, 1)}
            for m, b in sorted(by_module.items(), key=lambda kv: -kv[1])[: args.top]
        ],
        "by_wsd_frame": [
            {"site": s, "bytes_per_conn": round(v[0] / per, 1), "blocks_per_conn": round(v[1] / per, 2)}
            for s, v in top_wsd
        ],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_clients":
        from loadgen import run_loop

        port, secret, n, sub = argv[1:5]
        run_loop(_clients_main(int(port), secret, int(n), sub == "1"))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--no-subscribe", dest="subscribe", action="store_false")
    p.add_argument("--frames", type=int, default=25, help="tracemalloc traceback depth")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--settle-s", type=float, default=2.0)
    args = p.parse_args(argv)

    import servers
    from loadgen import log, raise_fd_limit

    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="wsd-connmem-"))
    os.chmod(tmp, 0o700)
    port = servers.free_port()
    secret = secrets.token_urlsafe(48)
    cfg_path = tmp / "wsd.toml"
    cfg_path.write_text(servers.wsd_config(args.conns, port, tmp / "wsd.sock", secret, servers.EXTRA_LIMITS))
    cfg_path.chmod(0o600)

    from wsd.config import load_config
    from wsd.runtime import logs
    from wsd.runtime.daemon import Daemon

    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    cfg = load_config(cfg_path, env=env)
    logs.setup("warning", "text")
    tracemalloc.start(args.frames)
    daemon = Daemon(cfg, config_path=str(cfg_path))
    result: dict[str, Any] = {}

    async def top() -> None:
        run = asyncio.ensure_future(daemon.run())
        try:
            result.update(await _orchestrate(daemon, port, secret, args))
        finally:
            daemon.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run, 15)

    log(
        f"in-process wsd on 127.0.0.1:{port}, {args.conns} clients in a subprocess, tracemalloc {args.frames}"
    )
    try:
        import uvloop

        uvloop.run(top())
    except ImportError:  # pragma: no cover
        asyncio.run(top())
    tracemalloc.stop()
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result.get("connections") else 1


if __name__ == "__main__":
    sys.exit(main())
