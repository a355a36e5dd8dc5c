"""Per-user traffic: N connections, each subscribed to its own user channel; every publication has one receiver.

    python benchmarks/per_user.py                          # 10,000 connections, wsd and bare, ramp (~4 min)
    python benchmarks/per_user.py --quick                  # 2,000 connections, short steps (< 90 s)
    python benchmarks/per_user.py --conns 10000 --runs 2   # two runs, alternating order; medians

wsd: every connection subscribes to ``notifications`` (a ``user`` group: its instance is
``notifications/c1/u<i>``); one publisher connection of the ``api`` pool (a token with the admin role, which
may name any instance) sends ``publish`` requests to random users' instances, pipelined (it never waits for a
reply before sending the next request; replies are counted). The bare reference (bare_server.py) keeps each
subscriber in a dict by its ``?user=`` id; its publisher connection sends ``ID PAYLOAD`` frames, and the
server looks the connection up and sends ``PAYLOAD`` (the same bytes wsd's ``message`` push would carry).
Both publishers are the same minimal client (benchmarks/loadgen.py ``RawClient``), writing the frames due
every 2 ms in one write.

The publication rate is ramped: steps of ``--step-s`` seconds at ``--start-rate`` publications/s, times
``--factor`` each step, until two steps in a row are not sustained. A step is sustained when the publisher
kept the rate (the frames went out on time: the server read them), at least 99.9 % of the publications were
delivered (for wsd: of those acknowledged ``ok``), and the p99 publish-to-receive latency stayed under
``--max-p99-ms``. The figures: the highest sustained rate (deliveries/s: one receiver each), the p99 at it,
server CPU per delivery, and the same at the highest rate both targets sustained, as wsd/bare ratios.
One JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec

import servers
from fanout import machine
from loadgen import (
    Accounting,
    LoadGen,
    RawClient,
    ServerProbe,
    Sink,
    Target,
    latency_figures,
    log,
    make_payload,
    raise_fd_limit,
    run_loop,
)

_enc = msgspec.json.Encoder().encode
ZERO_MASK = b"\x00\x00\x00\x00"  # a client frame must be masked; a zero key leaves the bytes as they are

NOTIFICATIONS = """
[channels.notifications]
type = "user"
publishers = ["api"]
history_size = {history}
"""


def publisher_token(secret: str) -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": "bench-publisher", "company_id": "c1", "roles": ["admin"], "iat": now, "exp": now + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


class PubClient(RawClient):
    """The publisher: opened as a subscriber would be (handshake, wsd's welcome), then it only writes
    frames (zero mask key: no per-byte work) and counts the replies (wsd)."""

    def __init__(self, host: str, port: int, request_target: str, expect_welcome: bool) -> None:
        super().__init__(Sink(1), host, port, request_target, expect_welcome, None)
        self.ok = 0
        self.errors = 0
        self.first_error: str | None = None

    def _on_text(self, payload: Any) -> None:
        if self.state != "open":
            super()._on_text(payload)
            return
        b = bytes(payload)
        if b'"ok":true' in b:
            self.ok += 1
        else:
            self.errors += 1
            if self.first_error is None:
                self.first_error = b[:200].decode(errors="replace")

    def write_frames(self, payloads: list[bytes]) -> None:
        parts: list[bytes] = []
        for p in payloads:
            n = len(p)
            if n < 126:
                parts.append(bytes((0x81, 0x80 | n)))
            elif n < 65536:
                parts.append(b"\x81\xfe" + n.to_bytes(2, "big"))
            else:
                parts.append(b"\x81\xff" + n.to_bytes(8, "big"))
            parts.append(ZERO_MASK)
            parts.append(p)
        assert self.transport is not None
        self.transport.write(b"".join(parts))


async def open_publisher(target: Target) -> PubClient:
    if target.kind == "wsd":
        assert target.secret
        req = f"{target.api_path}?token={publisher_token(target.secret)}"
    else:
        req = target.user_publish_path
    pub = PubClient(target.host, target.port, req, target.kind == "wsd")
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.create_connection(lambda: pub, target.host, target.port), 10)
    await asyncio.wait_for(pub.ready, 10)
    return pub


def frame_builder(kind: str, payload_bytes: int) -> Any:
    """``build(phase, seq, user index) -> bytes``: one publish request (wsd) or ``ID PAYLOAD`` frame (bare)."""
    if kind != "bare":

        def build(phase: int, seq: int, u: int) -> bytes:
            return _enc(
                {
                    "op": "publish",
                    "id": seq,
                    "channel": f"notifications/c1/u{u}",
                    "type": "tick",
                    "data": make_payload(phase, seq, payload_bytes),
                    "priority": "normal",
                }
            )

        return build

    def build_bare(phase: int, seq: int, u: int) -> bytes:
        data = make_payload(phase, seq, payload_bytes)
        push = {  # the shape of wsd's message push: both servers write the same bytes
            "type": "message",
            "channel": f"notifications/c1/u{u}",
            "offset": seq + 1,
            "epoch": "bare",
            "msg_type": "tick",
            "priority": "normal",
            "ts": data["ts"],
            "data": data,
        }
        return b"u%d " % u + _enc(push)

    return build_bare


async def ramp_step(
    kind: str,
    pub: PubClient,
    build: Any,
    lg: LoadGen,
    probe: ServerProbe,
    phase: int,
    rate: float,
    seconds: float,
    users: int,
    rng: random.Random,
    args: argparse.Namespace,
) -> dict[str, Any]:
    await lg.set_phase(phase)
    ok0, err0 = pub.ok, pub.errors
    total = max(1, int(rate * seconds))
    blocked_s = 0.0
    with Accounting(probe, lg.pids) as acct:
        w0 = time.time()
        t0 = time.monotonic()
        sent = 0
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - t0) * rate) + 1)
            if due > sent:
                assert pub.transport is not None
                if pub.transport.get_write_buffer_size() > 1 << 20:  # the server does not read: we fall behind
                    await asyncio.sleep(0.002)
                    blocked_s += time.monotonic() - now
                    continue
                pub.write_frames([build(phase, sent + i, rng.randrange(users)) for i in range(due - sent)])
                sent = due
            await asyncio.sleep(0.002)
        publish_s = time.monotonic() - t0
        if kind != "bare":  # every request answered (bounded)
            deadline = time.monotonic() + args.drain_max_s
            while pub.ok + pub.errors - ok0 - err0 < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            errors = pub.errors - err0
            answered = pub.ok + pub.errors - ok0 - err0
            expected = pub.ok - ok0
        else:
            errors = 0
            answered = None
            expected = sent
        await lg.drain(expected, 1.0, args.drain_max_s)
    rep = await lg.report()
    cpu = acct.figures()
    span = (rep["last_recv"] - w0) if rep["received"] else None
    lat = latency_figures(rep["samples"], rep["max_lat"])
    kept_rate = publish_s <= seconds / 0.95 + 0.01
    delivered_ok = expected > 0 and rep["received"] >= 0.999 * sent and errors == 0
    sustained = bool(kept_rate and delivered_ok and lat["p99_ms"] is not None and lat["p99_ms"] <= args.max_p99_ms)
    out = {
        "rate": round(rate, 1),
        "published": sent,
        "publish_s": round(publish_s, 3),
        "publisher_blocked_s": round(blocked_s, 3),
        "answered": answered,
        "publish_errors": errors,
        "expected": expected,
        "received": rep["received"],
        "stray": rep["stray"],
        "deliveries_per_s": round(rep["received"] / span, 1) if span else None,
        **lat,
        "server_cpu_us_per_delivery": (
            None if acct.server is None or not rep["received"] else round(1e6 * acct.server / rep["received"], 2)
        ),
        **cpu,
        "sustained": sustained,
    }
    if kind != "bare" and pub.first_error:
        out["first_error"] = pub.first_error
    return out


async def one_run(kind: str, args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    server = None
    try:
        if kind == "bare":
            server, target = await servers.start_bare(tmpdir, 30.0, uvloop=True)
            target.per_user = True
        else:
            server, target = await servers.start_wsd(
                tmpdir,
                args.conns,
                publish="api",
                wsd_cmd=args.baseline_wsd_cmd if kind == "wsd_base" else args.wsd_cmd,
                extra_limits={"max_history_channels": args.conns + 100},
                extra_toml=NOTIFICATIONS.format(history=args.history_size),
            )
            target.channel = "notifications"
        log(f"[{kind}] server pid {server.pid} port {target.port}")
        probe = ServerProbe(target.server_pid)
        pub = await open_publisher(target)
        build = frame_builder(kind, args.payload_bytes)
        rng = random.Random(7)
        result: dict[str, Any] = {"target": kind}
        try:
            async with LoadGen(target, args.conns, args.procs, connect_concurrency=50) as lg:
                await asyncio.sleep(0.5)
                rss0 = probe.rss()
                log(f"[{kind}] connect {args.conns}")
                c = await lg.connect()
                result["connect"] = {k: c[k] for k in ("connected", "failures", "failure_reasons")}
                result["connect"]["rate_cps"] = round(c["rate_cps"] or 0, 1)
                if c["failures"]:
                    raise RuntimeError(f"{c['failures']} connections failed: {c['failure_reasons']}")
                rss1 = probe.rss()
                if rss0 is not None and rss1 is not None:
                    result["rss_per_conn_kib"] = round((rss1 - rss0) / c["connected"] / 1024, 2)
                # warm-up: not counted
                await ramp_step(kind, pub, build, lg, probe, 1, args.start_rate / 4, 1.0, args.conns, rng, args)
                steps: list[dict[str, Any]] = []
                rate = args.start_rate
                failed_in_row = 0
                phase = 2
                while rate <= args.max_rate and failed_in_row < 2:
                    log(f"[{kind}] step {rate:.0f} publications/s x {args.step_s}s")
                    st = await ramp_step(kind, pub, build, lg, probe, phase, rate, args.step_s, args.conns, rng, args)
                    log(
                        f"[{kind}]   delivered {st['received']}/{st['published']} "
                        f"p99 {st['p99_ms']} ms cpu/delivery {st['server_cpu_us_per_delivery']} us "
                        f"{'ok' if st['sustained'] else 'NOT sustained'}"
                    )
                    steps.append(st)
                    failed_in_row = 0 if st["sustained"] else failed_in_row + 1
                    phase += 1
                    rate *= args.factor
                result["steps"] = steps
                best = max((s for s in steps if s["sustained"]), key=lambda s: s["rate"], default=None)
                result["max_sustained_rate"] = best["rate"] if best else None
                result["at_max"] = (
                    None
                    if best is None
                    else {
                        k: best[k]
                        for k in ("deliveries_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_delivery", "noisy")
                    }
                )
        finally:
            pub.abort()
        if not server.alive():
            raise RuntimeError(f"{kind} server died during the run: {server.tail()}")
        return result
    except Exception as exc:
        tail = server.tail(10) if server is not None else ""
        log(f"[{kind}] run failed: {type(exc).__name__}: {exc}")
        return {"target": kind, "error": f"{type(exc).__name__}: {exc}", "server_log_tail": tail or None}
    finally:
        if server is not None:
            code = await asyncio.to_thread(server.stop)
            log(f"[{kind}] server stopped (exit {code}) after {time.monotonic() - started:.1f}s")


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def compare(run_w: dict[str, Any], run_b: dict[str, Any]) -> dict[str, Any]:
    """One run pair: max sustained rates, and p99 / CPU per delivery at the highest rate both sustained."""
    out: dict[str, Any] = {
        "max_rate_ratio": _ratio(run_w.get("max_sustained_rate"), run_b.get("max_sustained_rate")),
    }
    sw = {s["rate"]: s for s in run_w.get("steps", []) if s["sustained"]}
    sb = {s["rate"]: s for s in run_b.get("steps", []) if s["sustained"]}
    common = sorted(set(sw) & set(sb))
    if common:
        r = common[-1]
        out["common_rate"] = r
        out["p99_ms"] = {"wsd": sw[r]["p99_ms"], "bare": sb[r]["p99_ms"]}
        out["p99_ratio"] = _ratio(sw[r]["p99_ms"], sb[r]["p99_ms"])
        out["cpu_per_delivery_ratio"] = _ratio(sw[r]["server_cpu_us_per_delivery"], sb[r]["server_cpu_us_per_delivery"])
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    targets = ["bare", "wsd"] if args.target == "both" else [args.target]
    if args.baseline_wsd_cmd:
        targets.append("wsd_base")
    doc: dict[str, Any] = {
        "benchmark": "per_user",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {
            k: getattr(args, k)
            for k in (
                "conns",
                "procs",
                "runs",
                "start_rate",
                "factor",
                "max_rate",
                "step_s",
                "max_p99_ms",
                "payload_bytes",
                "history_size",
            )
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        for run in range(args.runs):
            order = targets if run % 2 == 0 else list(reversed(targets))
            one: dict[str, Any] = {}
            for kind in order:
                log(f"=== run {run + 1}/{args.runs} target {kind}")
                one[kind] = await one_run(kind, args, Path(tmp))
            for w in ("wsd", "wsd_base"):
                if w in one and "bare" in one and "error" not in one[w] and "error" not in one["bare"]:
                    one["compare" if w == "wsd" else "compare_base"] = compare(one[w], one["bare"])
            doc["runs"].append(one)
    summary: dict[str, Any] = {}
    for kind in targets:
        good = [r[kind] for r in doc["runs"] if "error" not in r[kind]]
        summary[kind] = {
            "max_sustained_rate": _median([g.get("max_sustained_rate") for g in good]),
            "p99_ms_at_max": _median([(g.get("at_max") or {}).get("p99_ms") for g in good]),
            "cpu_us_per_delivery_at_max": _median(
                [(g.get("at_max") or {}).get("server_cpu_us_per_delivery") for g in good]
            ),
            "runs_ok": len(good),
        }
    for key in ("compare", "compare_base"):
        comps = [r[key] for r in doc["runs"] if key in r]
        if comps:
            summary["ratio" if key == "compare" else "ratio_baseline"] = {
                "max_rate_wsd_over_bare": _median([c.get("max_rate_ratio") for c in comps]),
                "p99_wsd_over_bare_at_common_rate": _median([c.get("p99_ratio") for c in comps]),
                "cpu_per_delivery_wsd_over_bare_at_common_rate": _median(
                    [c.get("cpu_per_delivery_ratio") for c in comps]
                ),
            }
    doc["summary"] = summary
    return doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=None, help="connections, one user each (default 10000)")
    p.add_argument("--quick", action="store_true", help="2000 connections, 1.5 s steps")
    p.add_argument("--target", choices=["wsd", "bare", "both"], default="both")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--procs", type=int, default=2, help="load generator worker processes")
    p.add_argument("--start-rate", type=float, default=2000.0, help="publications/s of the first step")
    p.add_argument("--factor", type=float, default=1.25, help="rate multiplier per step")
    p.add_argument("--max-rate", type=float, default=200_000.0)
    p.add_argument("--step-s", type=float, default=None, help="seconds per step (default 3; 1.5 with --quick)")
    p.add_argument("--max-p99-ms", type=float, default=100.0, help="a step over this p99 is not sustained")
    p.add_argument("--drain-max-s", type=float, default=10.0)
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--history-size", type=int, default=100, help="wsd: notifications history_size")
    p.add_argument("--wsd-cmd", default=None, help='how to start wsd (default "python -m wsd")')
    p.add_argument(
        "--baseline-wsd-cmd",
        default=None,
        help="also run this wsd build (target wsd_base), e.g. the code before a change, in the same run",
    )
    args = p.parse_args(argv)
    args.conns = args.conns or (2000 if args.quick else 10000)
    args.step_s = args.step_s or (1.5 if args.quick else 3.0)
    return args


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
    failed = any("error" in v for r in doc["runs"] for k, v in r.items() if not k.startswith("compare"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
