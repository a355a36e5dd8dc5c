"""The per-publication cost of wsd's own code, in-process: no sockets, no other process, so noise hurts less.

    python benchmarks/publish_path.py                          # this tree
    python benchmarks/publish_path.py --wsd-path /tmp/old      # another tree (e.g. `git archive OLD wsd`)
    python benchmarks/publish_path.py --profile                # and where the time goes (cProfile)

The hub (hub.py, delivery.py), the memory engine, the channel resolution and the reply encoding are the
real ones; each connection's WebSocket is a stand-in whose transport drops what is written (so the figure
leaves out the write system call, which a bare server pays too). ``--conns`` connections each subscribe to
their own ``notifications/c1/u<i>`` instance; each publication goes to a random user's instance, the way
``per_user.py``'s publisher sends them: resolve the name (an admin token naming the instance in full), publish
(store in history, route, encode once, write), encode the reply and hand it to ``send_reply`` when the hub has
it. The figure is CPU time (``time.process_time``) per publication, the minimum over ``--repeat`` rounds of
``--count`` publications: the least disturbed round.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Ws:
    def __init__(self, state: Any) -> None:
        self.protocol = type("P", (), {"state": state, "send_ping": lambda self, d: None})()
        self.transport = _Transport()
        self.pending_pings: dict[bytes, Any] = {}

    def send_data(self) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        pass


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import msgspec

    from wsd.config import load_config
    from wsd.core.auth import Claims
    from wsd.core.channels import Principal, instance_parts, resolve
    from wsd.core.outbox import Priority
    from wsd.engine.memory import MemoryEngine
    from wsd.runtime.conn import Conn
    from wsd.runtime.daemon import PoolRuntime
    from wsd.runtime.events import Events
    from wsd.runtime.hub import Hub
    from wsd.runtime.wsadapter import OPEN

    encode = msgspec.json.Encoder().encode
    cfg = load_config(None, env={})
    cfg = msgspec.structs.replace(cfg, limits=msgspec.structs.replace(cfg.limits, max_history_channels=args.conns + 100))
    hub = Hub(cfg, MemoryEngine(), Events())
    pool = PoolRuntime("frontend", cfg.pools["frontend"], cfg)
    admin = Principal("publisher", "c1", frozenset(["admin"]), "api", "api", True)
    publisher = None
    for i in range(args.conns + 1):
        claims = Claims(f"u{i}", "c1", (), "frontend", 4e9, {})
        who = Principal(f"u{i}", "c1", frozenset(), "frontend", "frontend", False)
        conn = Conn(f"c{i}", _Ws(OPEN), pool, claims, who, "s", hub.now(), 0.0)  # type: ignore[arg-type]
        hub.register(conn)
        if i < args.conns:
            hub.add_subscription(conn, f"notifications/c1/u{i}", "notifications", "realtime", None)
        else:
            publisher = conn
    reply = getattr(hub, "send_reply", None)
    if reply is None:  # an older tree: replies went through send_direct
        def reply(conn: Any, payload: bytes) -> None:
            hub.send_direct(conn, payload, Priority.CRITICAL)

    groups = cfg.channels
    rng = random.Random(1)
    names = [f"notifications/c1/u{rng.randrange(args.conns)}" for _ in range(args.count)]
    data = {"ts": time.time(), "ph": 1, "seq": 1, "sym": "EURUSD", "bid": 1.08412, "ask": 1.08425, "pad": "x" * 100}

    async def one(name: str, rid: int) -> None:
        group, inst = resolve(name, admin, groups)
        prio = Priority.parse("normal")
        _, company, user = instance_parts(inst)
        res = await hub.publish(channel=inst, group=group, msg_type="tick", data=data, priority=int(prio), ttl_s=None,
                                source="client:bench", user_id=user, company_id=company)
        reply(publisher, encode({"id": rid, "ok": True, "result": res}))

    async def round_() -> float:
        t0 = time.process_time()
        for k, name in enumerate(names):
            await one(name, k)
        dt = time.process_time() - t0
        await asyncio.sleep(0)  # the turn ends: replies queued in it are written
        return dt

    await round_()  # warm-up
    rounds = [await round_() for _ in range(args.repeat)]
    out = {
        "wsd": str(Path(sys.modules["wsd"].__file__ or "").parent),
        "conns": args.conns,
        "count": args.count,
        "us_per_publication_min": round(1e6 * min(rounds) / args.count, 2),
        "us_per_publication_median": round(1e6 * sorted(rounds)[len(rounds) // 2] / args.count, 2),
    }
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        await round_()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        print(s.getvalue(), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--count", type=int, default=5000, help="publications per round")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--wsd-path", default=None, help="a directory holding the wsd package to measure")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if args.wsd_path:
        sys.path.insert(0, str(Path(args.wsd_path).resolve()))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import uvloop

    print(json.dumps(uvloop.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
