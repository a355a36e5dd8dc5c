"""The Redis bus across nodes: what each node receives from Redis against what its own subscribers need.

    python benchmarks/cluster_bus.py [--nodes 4] [--users 1000] [--publications 2000] [--rate 200]
                                     [--code PATH] [--baseline PATH] [--runs N]

One private redis-server, ``--nodes`` wsd nodes on it (Redis engine), ``--users`` users each connected to one
node (user i to node i mod nodes) and subscribed to their own ``notifications`` channel; then ``--publications``
publications to random users at ``--rate`` per second, through the control sockets of the nodes in turn. Per node:
the publications it received from Redis pub/sub (its bus input: ``bus.messages_channel`` + ``messages_shared`` of
``wsctl metrics``, or the engine's ``received`` count where the code has no bus metrics) against the publications
its own subscribers needed, and the publish-to-deliver latency (the publisher's clock in the data, the receiver's
on arrival: one process, one clock).

``--code PATH`` runs the daemons from another checkout (its tree on PYTHONPATH); ``--baseline PATH`` runs the
same load on that checkout first, then on this tree, and prints both. Prints one JSON document. Needs
redis-server on PATH; run from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import RedisServer  # noqa: E402
from tests.harness import BASE_CONFIG, Wsd, make_token  # noqa: E402

GROUP = "notifications"
COMPANY = "acme"


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(len(v) * p))], 2)


class Ctl:
    """One control-socket connection to a node, requests one after another."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.n = 0

    async def open(self) -> Ctl:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        return self

    async def call(self, method: str, **params: Any) -> Any:
        self.n += 1
        self.writer.write(json.dumps({"id": self.n, "method": method, "params": params}).encode() + b"\n")
        await self.writer.drain()
        reply = json.loads(await asyncio.wait_for(self.reader.readline(), 10))
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self.writer.close()


async def bus_input(ctl: Ctl) -> dict[str, int]:
    m = await ctl.call("metrics.get")
    bus = m.get("bus") or {}
    if bus:
        return {"channel": bus["messages_channel"], "shared": bus["messages_shared"],
                "total": bus["messages_channel"] + bus["messages_shared"], "channels": bus["channels"]}
    st = await ctl.call("status")
    n = int(st["engine"]["received"])
    return {"channel": 0, "shared": n, "total": n, "channels": 0}


async def run_once(code: Path, args: argparse.Namespace) -> dict[str, Any]:
    import websockets

    work = Path(tempfile.mkdtemp(prefix="wsdbus-"))
    redis = RedisServer(work)
    redis.start()
    nodes: list[Wsd] = []
    conns: list[Any] = []
    ctls: list[Ctl] = []
    try:
        prefix = "b" + secrets.token_hex(3)
        toml = BASE_CONFIG + f'\n[engine]\ntype = "redis"\nurl = "{redis.url}"\nprefix = "{prefix}"\n'
        env = {"PYTHONPATH": str(code)}
        here = os.getcwd()
        os.chdir(code)  # `python -m wsd` puts its working directory first on sys.path: the checkout under test
        try:
            for i in range(args.nodes):
                d = work / f"node{i}"
                d.mkdir()
                nodes.append(Wsd(d, toml, env=env).start(timeout=30))
        finally:
            os.chdir(here)
        ctls = [await Ctl(n.socket).open() for n in nodes]
        users = [f"u{i:05d}" for i in range(args.users)]
        node_of = {u: i % args.nodes for i, u in enumerate(users)}
        latencies: list[float] = []
        per_node_got = [0] * args.nodes
        done = asyncio.Event()
        expected_total = args.publications

        async def connect(u: str) -> Any:
            ws = await websockets.connect(nodes[node_of[u]].url(token=make_token(u, COMPANY)), compression=None,
                                          open_timeout=30, max_size=None)
            json.loads(await ws.recv())  # welcome
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "channel": GROUP}))
            while True:
                f = json.loads(await ws.recv())
                if f.get("id") == 1:
                    assert f["ok"], f
                    return ws

        t0 = time.monotonic()
        sem = asyncio.Semaphore(50)

        async def connect_bounded(u: str) -> Any:
            async with sem:
                return await connect(u)

        conns = list(await asyncio.gather(*(connect_bounded(u) for u in users)))
        connect_s = time.monotonic() - t0
        received = [0]

        async def reader(u: str, ws: Any) -> None:
            n = node_of[u]
            async for raw in ws:
                now = time.time()
                f = json.loads(raw)
                for m in f["messages"] if f.get("type") == "batch" else [f]:
                    if m.get("type") == "message":
                        latencies.append((now - m["data"]["t"]) * 1000)
                        per_node_got[n] += 1
                        received[0] += 1
                        if received[0] >= expected_total:
                            done.set()

        readers = [asyncio.create_task(reader(u, ws)) for u, ws in zip(users, conns)]
        await asyncio.sleep(1.0)  # the channel buses are subscribed (each subscribe waited for its confirmation)
        before = [await bus_input(c) for c in ctls]
        rng = random.Random(7)
        targets = [rng.choice(users) for _ in range(args.publications)]
        need = [0] * args.nodes
        for u in targets:
            need[node_of[u]] += 1

        async def publisher(k: int) -> None:
            # Publisher k sends every nodes-th publication through node k's control socket, at its share of --rate.
            mine = list(range(k, len(targets), args.nodes))
            interval = args.nodes / args.rate
            start = time.monotonic()
            for j, i in enumerate(mine):
                delay = start + j * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                u = targets[i]
                await ctls[k].call("publish", channel=f"{GROUP}/{COMPANY}/{u}", type="n",
                                   data={"i": i, "t": time.time()})

        t1 = time.monotonic()
        await asyncio.gather(*(publisher(k) for k in range(args.nodes)))
        publish_s = time.monotonic() - t1
        try:
            await asyncio.wait_for(done.wait(), 20)
        except TimeoutError:
            pass
        await asyncio.sleep(0.5)
        after = [await bus_input(c) for c in ctls]
        for t in readers:
            t.cancel()
        per_node = []
        for i in range(args.nodes):
            got = {k: after[i][k] - before[i][k] for k in ("channel", "shared", "total")}
            per_node.append({"node": i, "users": sum(1 for u in users if node_of[u] == i),
                             "needed": need[i], "bus_input": got["total"], "bus_channel": got["channel"],
                             "bus_shared": got["shared"], "channel_buses": after[i]["channels"],
                             "delivered": per_node_got[i],
                             "input_per_needed": round(got["total"] / need[i], 2) if need[i] else None})
        total_in = sum(p["bus_input"] for p in per_node)
        return {"code": str(code), "nodes": args.nodes, "users": args.users, "publications": args.publications,
                "rate": args.rate, "connect_s": round(connect_s, 2), "publish_s": round(publish_s, 2),
                "delivered": received[0], "lost": args.publications - received[0],
                "bus_input_total": total_in, "bus_input_per_publication": round(total_in / args.publications, 2),
                "latency_ms": {"p50": _pct(latencies, 0.50), "p99": _pct(latencies, 0.99),
                               "max": _pct(latencies, 1.0)},
                "per_node": per_node}
    finally:
        for ws in conns:
            try:
                await asyncio.wait_for(ws.close(), 2)
            except Exception:
                pass
        for c in ctls:
            c.close()
        for n in nodes:
            n.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


def _median(values: list[Any]) -> Any:
    v = sorted(x for x in values if x is not None)
    return v[len(v) // 2] if v else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"bus_input_total": _median([r["bus_input_total"] for r in runs]),
            "bus_input_per_publication": _median([r["bus_input_per_publication"] for r in runs]),
            "p50_ms": _median([r["latency_ms"]["p50"] for r in runs]),
            "p99_ms": _median([r["latency_ms"]["p99"] for r in runs]),
            "lost": sum(r["lost"] for r in runs)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    base: list[dict[str, Any]] = []
    this: list[dict[str, Any]] = []
    for _ in range(args.runs):  # alternated, so a noisy neighbour weighs on both alike
        if args.baseline is not None:
            base.append(await run_once(args.baseline, args))
        this.append(await run_once(args.code, args))
    out["this"] = {"median": _summary(this), "runs": this}
    if base:
        out["baseline"] = {"median": _summary(base), "runs": base}
        b, t = out["baseline"]["median"], out["this"]["median"]
        out["ratio"] = {
            "bus_input": round(t["bus_input_total"] / b["bus_input_total"], 3) if b["bus_input_total"] else None,
            "p99": round(t["p99_ms"] / b["p99_ms"], 3) if b["p99_ms"] and t["p99_ms"] else None}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--users", type=int, default=1000, help="users, each connected to one node")
    p.add_argument("--publications", type=int, default=2000)
    p.add_argument("--rate", type=float, default=200.0, help="publications per second (all nodes together)")
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout the nodes run (default: this one)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run first, for comparison")
    p.add_argument("--runs", type=int, default=1, help="runs of each (alternated); medians are reported")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        p.error("redis-server is not on PATH")
    for path in (args.code, args.baseline):
        if path is not None and not (path / "wsd" / "__main__.py").exists():
            p.error(f"{path} is not a wsd checkout (no wsd/__main__.py)")
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
