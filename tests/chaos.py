"""Chaos harness: two wsd nodes on one real redis-server (AOF, fsync always), a steady publisher, applications on
``wsd.client`` with both node URLs, and faults injected in turn. Used by tests/test_chaos.py (short form, in CI)
and benchmarks/chaos.py (long form).

- **Nodes**: ``A`` and ``B`` (real ``wsd serve`` processes, tests/harness.py) on the Redis engine, one prefix.
- **Publisher**: publishes ``{"i": n}`` at a steady rate, round robin over every subscribed channel (company and
  user channels), through the control socket of the two nodes in turn. Every publication the node acknowledged is
  recorded with its channel, offset and epoch; a refusal (``engine_unavailable``, a node that is down) is counted
  and not retried.
- **Applications**: ``wsd.client.Client`` with both URLs, each subscribed to ``trading-signals`` (company) and
  ``notifications`` (user), recording every item (``Message`` or ``Gap``). One of them reaches the nodes through
  a small TCP proxy per node (:class:`Proxy`) that can black-hole its connections.
- **Faults**: ``kill`` (``kill -9`` of the node most applications are on, then start it again on the same port),
  ``redis_restart`` (``kill -9`` of redis-server, started again on the same port and AOF directory),
  ``redis_pause`` (SIGSTOP for a few seconds, then SIGCONT), ``blackhole`` (the proxied application's
  connection stops forwarding both ways without closing; the client's keepalive notices and it reconnects).
- **Check** (:meth:`Chaos.report`): each publication acknowledged to the publisher reached each application
  subscribed to its channel exactly once, in order, or lies inside a ``Gap`` that application was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.harness import BASE_CONFIG, ControlError, Wsd, free_port, make_token

FAULTS = ("kill", "redis_restart", "redis_pause", "blackhole")
PROXIED = "alice"  # the application that reaches the nodes through the proxies


# --------------------------------------------------------------------------------------------------------- Redis


class RedisServer:
    """A private redis-server with AOF (``appendfsync always``) that can be killed, restarted on the same port and
    directory, paused and resumed."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise FileNotFoundError("redis-server is not on PATH")
        self.exe = exe
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def client(self) -> Any:
        """A redis-py client of this server (for tests that reach into what the nodes store)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


# --------------------------------------------------------------------------------------------------------- proxy


class _Pipe:
    """One proxied connection: ``stalled`` stops forwarding in both directions (bytes are read and dropped, as a
    network that loses every packet would), without closing either side."""

    def __init__(self, owner: list[_Pipe]) -> None:
        self.owner = owner
        self.stalled = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.owner.remove(self)
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.transport.abort()


class Proxy:
    """A TCP proxy on a free port of 127.0.0.1 to ``127.0.0.1:target``. :meth:`blackhole` silently stalls every
    connection it holds and every new one; :meth:`restore` lets new connections through again (the stalled ones
    stay stalled and open on the server's side, as after a real network drop, until the proxy stops)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.black = False
        self.pipes: list[_Pipe] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def blackhole(self) -> int:
        """Stall every open connection (and the new ones until :meth:`restore`); how many were open."""
        self.black = True
        live = [p for p in self.pipes if not p.stalled]
        for p in live:
            p.stalled = True
        return len(live)

    def restore(self) -> None:
        self.black = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pipe = _Pipe(self.pipes)
        pipe.stalled = self.black
        pipe.writers.append(writer)
        self.pipes.append(pipe)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            pipe.close()  # the node is down: the client sees the connection fail
            return
        pipe.writers.append(up_w)
        pipe.tasks = [asyncio.create_task(self._pump(pipe, reader, up_w)),
                      asyncio.create_task(self._pump(pipe, up_r, writer))]

    @staticmethod
    async def _pump(pipe: _Pipe, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                chunk = await src.read(65536)
                if not chunk:
                    break
                if pipe.stalled:
                    continue
                dst.write(chunk)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        if not pipe.stalled:  # a live connection closed by one side: close the other (a stalled one stays open)
            pipe.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self.pipes):
            p.close()


# ---------------------------------------------------------------------------------------------------- the world


@dataclass
class Pub:
    channel: str
    i: int
    offset: int
    epoch: str
    phase: str


@dataclass
class App:
    name: str
    client: Any
    nodes: list[str]  # the node behind each of the client's URLs, in order
    channels: list[str] = field(default_factory=list)
    items: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)  # channel -> [(phase, item)]
    counters_at: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (duplicates, welcomes) at start
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    welcomes: list[tuple[str, bool]] = field(default_factory=list)  # (phase, resumed) of each welcome

    def node(self) -> str | None:
        url = self.client.url
        if url is None or self.client.state != "open":
            return None
        return self.nodes[self.client.urls.index(url)]


def node_config(redis_url: str, prefix: str) -> str:
    return BASE_CONFIG + f'\n[engine]\ntype = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n'


class Chaos:
    """The whole setup; ``async with Chaos(...) as c:`` starts it, :meth:`inject` runs one fault and the steady
    period after it, :meth:`report` checks and counts."""

    def __init__(self, *, rate: float = 40.0, settle: float = 2.0, pause_s: float = 3.0, down_s: float = 1.0,
                 blackhole_s: float = 2.5, ping_interval: float = 0.5, ping_timeout: float = 1.0,
                 workdir: Path | None = None, backend: Any = None) -> None:
        self.rate = rate
        self.settle = settle
        self.pause_s = pause_s
        self.down_s = down_s
        self.blackhole_s = blackhole_s
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="wsd-chaos-"))
        self.redis: RedisServer | None = None
        # Another Redis shape (tests/redis_shapes.py: start(), engine_toml(prefix), stop(), fault_<name>(chaos))
        # instead of the one redis-server.
        self.backend = backend
        self.nodes: dict[str, Wsd] = {}
        self.proxies: dict[str, Proxy] = {}
        self.apps: list[App] = []
        self.pubs: list[Pub] = []
        self.refused: Counter[str] = Counter()  # by code
        self.refused_in: Counter[str] = Counter()  # by phase
        self.phase = "steady"
        self.phases: list[str] = ["steady"]
        self.events: list[str] = []  # what each fault did, for the report
        self._stop_pub = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------------ start/stop

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        prefix = "chaos" + secrets.token_hex(3)
        if self.backend is None:
            rdir = self.dir / "redis"
            rdir.mkdir(parents=True, exist_ok=True)
            self.redis = RedisServer(rdir)
            await asyncio.to_thread(self.redis.start)
            config = node_config(self.redis.url, prefix)
        else:
            await asyncio.to_thread(self.backend.start)
            config = BASE_CONFIG + self.backend.engine_toml(prefix)
        for name in ("A", "B"):
            d = self.dir / f"node{name}"
            d.mkdir(exist_ok=True)
            self.nodes[name] = Wsd(d, config)
        await asyncio.gather(*(asyncio.to_thread(w.start) for w in self.nodes.values()))
        for name, w in self.nodes.items():
            self.proxies[name] = await Proxy(w.port).start()
        a, b = self.nodes["A"], self.nodes["B"]
        pa, pb = self.proxies["A"], self.proxies["B"]
        plan = [  # name, user, company, [(url, node)]
            (PROXIED, "alice", "acme", [(f"ws://127.0.0.1:{pa.port}/ws/frontend", "A"),
                                        (f"ws://127.0.0.1:{pb.port}/ws/frontend", "B")]),
            ("bob", "bob", "acme", [(a.url(), "A"), (b.url(), "B")]),
            ("carol", "carol", "globex", [(a.url(), "A"), (b.url(), "B")]),
            ("dave", "dave", "acme", [(b.url(), "B"), (a.url(), "A")]),
        ]
        from wsd.client import Client

        for name, user, company, targets in plan:
            client = Client([u for u, _ in targets], token=make_token(user, company), backoff_base=0.2,
                            backoff_cap=2.0, open_timeout=3.0, request_timeout=5.0, connect_timeout=15.0,
                            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout)
            app = App(name, client, [n for _, n in targets])
            client.on_state = self._on_state(app)
            await client.start()
            for group in ("trading-signals", "notifications"):
                sub = await client.subscribe(group)
                app.channels.append(sub.channel)
                app.items[sub.channel] = []
                app.tasks.append(asyncio.create_task(self._read(app, sub)))
            app.counters_at["steady"] = (client.duplicates_dropped, client.connections)
            self.apps.append(app)
        self._publisher = asyncio.create_task(self._publish())

    async def stop(self) -> None:
        self._stop_pub.set()
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher
        for app in self.apps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(app.client.close(), 5)
            for t in app.tasks:
                t.cancel()
        for p in self.proxies.values():
            await p.stop()
        for w in self.nodes.values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(w.stop)
        if self.redis is not None:
            self.redis.stop()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.stop)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- the two workers

    def _on_state(self, app: App) -> Any:
        def seen(state: str) -> None:
            if state == "open":
                app.welcomes.append((self.phase, bool(app.client.welcome.get("resumed"))))
        return seen

    async def _read(self, app: App, sub: Any) -> None:
        out = app.items[sub.channel]
        with contextlib.suppress(Exception):
            async for item in sub:
                out.append((self.phase, item))

    def channels(self) -> list[str]:
        return sorted({ch for app in self.apps for ch in app.channels})

    async def _publish(self) -> None:
        chans = self.channels()
        names = sorted(self.nodes)
        n = 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stop_pub.is_set():
            ch = chans[n % len(chans)]
            node = self.nodes[names[n % len(names)]]
            phase = self.phase
            try:
                res = await asyncio.wait_for(node.ctl("publish", channel=ch, type="chaos", data={"i": n}), 10)
            except ControlError as exc:
                self.refused[exc.code] += 1
                self.refused_in[phase] += 1
            except (OSError, TimeoutError, ValueError):
                self.refused["node_unreachable"] += 1
                self.refused_in[phase] += 1
            else:
                self.pubs.append(Pub(ch, n, int(res["offset"]), str(res["epoch"]), phase))
            n += 1
            next_at = max(next_at + 1 / self.rate, loop.time())
            await asyncio.sleep(next_at - loop.time())

    # ----------------------------------------------------------------------------------------------------- faults

    def _begin(self, phase: str) -> None:
        k = sum(1 for p in self.phases if p == phase or p.startswith(phase + "#"))
        name = phase if k == 0 else f"{phase}#{k + 1}"
        self.phase = name
        self.phases.append(name)
        for app in self.apps:
            app.counters_at[name] = (app.client.duplicates_dropped, app.client.connections)

    async def steady(self, seconds: float | None = None) -> None:
        """Let the publisher run; first wait (bounded) until every application is connected again."""
        deadline = asyncio.get_running_loop().time() + 20
        while any(app.client.state != "open" for app in self.apps):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.settle if seconds is None else seconds)

    async def inject(self, fault: str) -> None:
        """Run one fault, then the steady period after it (publications in both belong to the fault)."""
        self._begin(fault)
        own = getattr(self, f"_fault_{fault}", None)
        await (own() if own is not None else getattr(self.backend, f"fault_{fault}")(self))
        await self.steady()

    def clients_node(self) -> str:
        on = Counter(n for app in self.apps if (n := app.node()) is not None)
        return on.most_common(1)[0][0] if on else "A"

    async def _fault_kill(self) -> None:
        name = self.clients_node()
        w = self.nodes[name]
        assert w.proc is not None
        w.proc.kill()
        await asyncio.to_thread(w.proc.wait, 10)
        w._log.close()
        self.events.append(f"kill -9 node {name}")
        await asyncio.sleep(self.down_s)
        await asyncio.to_thread(w.start, 30.0)

    async def _fault_redis_restart(self) -> None:
        assert self.redis is not None
        await asyncio.to_thread(self.redis.kill)
        self.events.append("kill -9 redis-server, restarted on its AOF")
        await asyncio.sleep(self.down_s)
        await asyncio.to_thread(self.redis.start)

    async def _fault_redis_pause(self) -> None:
        assert self.redis is not None
        self.redis.pause()
        try:
            await asyncio.sleep(self.pause_s)
        finally:
            self.redis.resume()
        self.events.append(f"SIGSTOP redis-server for {self.pause_s}s")

    async def _fault_blackhole(self) -> None:
        stalled = sum(p.blackhole() for p in self.proxies.values())
        self.events.append(f"black-holed {stalled} proxied connection(s) for {self.blackhole_s}s")
        try:
            await asyncio.sleep(self.blackhole_s)
        finally:
            for p in self.proxies.values():
                p.restore()

    # -------------------------------------------------------------------------------------------------- checking

    async def finish(self, timeout: float = 20.0) -> None:
        """Stop publishing, then wait (bounded) until each application holds the last acknowledged publication of
        each of its channels, or a Gap after its predecessor."""
        self._stop_pub.set()
        if self._publisher is not None:
            await self._publisher
        last: dict[str, Pub] = {}
        for p in self.pubs:
            last[p.channel] = p
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if all(self._has(app, ch, last[ch]) for app in self.apps for ch in app.channels if ch in last):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # late duplicates, if any, have a moment to show

    @staticmethod
    def _has(app: App, ch: str, p: Pub) -> bool:
        from wsd.client import Gap

        for _, item in reversed(app.items[ch]):
            if isinstance(item, Gap):
                return True
            if item.epoch == p.epoch and item.offset >= p.offset:
                return True
        return False

    def report(self) -> dict[str, Any]:
        """Counts per phase (``steady`` then each fault): ``acknowledged`` (publications the publisher was told were
        accepted), ``expected`` (acknowledged × applications subscribed to the channel), ``delivered`` (of those,
        received once), ``duplicates_dropped`` (the clients' counter), ``gaps`` (Gap items received),
        ``in_gap`` (not received, inside a reported Gap), ``lost`` (not received and in no Gap), ``delivered_twice``
        and ``out_of_order`` (both must be 0), ``reconnects`` (welcomes after the first; ``proxied_reconnects``:
        of the proxied application), ``resumed`` (of them, ``resumed: true``), ``refused`` (publications refused),
        ``unacknowledged_received`` (messages received that were not acknowledged: refused or timed out, yet
        stored, as the protocol allows) and ``unacknowledged_published`` (how many publications those were)."""
        from wsd.client import Gap

        rows: dict[str, dict[str, Any]] = {
            ph: {"acknowledged": 0, "expected": 0, "delivered": 0, "duplicates_dropped": 0, "gaps": 0, "in_gap": 0,
                 "lost": 0, "delivered_twice": 0, "out_of_order": 0, "reconnects": 0, "proxied_reconnects": 0,
                 "resumed": 0, "refused": 0, "unacknowledged_received": 0, "unacknowledged_published": 0}
            for ph in self.phases}
        unacked: dict[tuple[str, str, int], str] = {}  # received yet never acknowledged -> phase first seen
        lost_detail: list[str] = []
        for p in self.pubs:
            rows[p.phase]["acknowledged"] += 1
        for ph, n in self.refused_in.items():
            rows[ph]["refused"] += n
        acked = {(p.channel, p.epoch, p.offset) for p in self.pubs}
        for app in self.apps:
            for ph, resumed in app.welcomes:
                rows[ph]["resumed"] += resumed
            for ch in app.channels:
                items = app.items[ch]
                seen: Counter[tuple[str, int]] = Counter()
                data: dict[tuple[str, int], Any] = {}
                gaps: list[Any] = []
                prev: Any = None
                for phase, item in items:
                    if isinstance(item, Gap):
                        gaps.append(item)
                        rows[phase]["gaps"] += 1
                        continue
                    key = (item.epoch, item.offset)
                    seen[key] += 1
                    data[key] = item.data
                    # in order = offsets increasing within an epoch (the publisher's numbering may differ: a
                    # publication refused while Redis was stopped can still be stored after a later one)
                    if prev is not None and item.epoch == prev.epoch and item.offset <= prev.offset:
                        rows[phase]["out_of_order"] += 1
                    if (ch, *key) not in acked:
                        rows[phase]["unacknowledged_received"] += 1
                        unacked.setdefault((ch, *key), phase)
                    prev = item
                for p in self.pubs:
                    if p.channel != ch:
                        continue
                    row = rows[p.phase]
                    row["expected"] += 1
                    k = seen[(p.epoch, p.offset)]
                    if k and data[(p.epoch, p.offset)] == {"i": p.i}:
                        row["delivered"] += 1
                        if k > 1:
                            row["delivered_twice"] += 1
                    elif any(_inside(p, g) for g in gaps):
                        row["in_gap"] += 1
                    else:
                        row["lost"] += 1
                        if len(lost_detail) < 20:
                            lost_detail.append(f"{app.name} {ch} offset {p.offset} i={p.i} ({p.phase})")
            ordered = self.phases + [None]
            for ph, nxt in itertools.pairwise(ordered):
                end = app.counters_at[nxt] if nxt is not None else (app.client.duplicates_dropped,
                                                                    app.client.connections)
                rows[ph]["duplicates_dropped"] += end[0] - app.counters_at[ph][0]
                rows[ph]["reconnects"] += end[1] - app.counters_at[ph][1]
                if app.name == PROXIED:
                    rows[ph]["proxied_reconnects"] += end[1] - app.counters_at[ph][1]
        for ph in unacked.values():
            rows[ph]["unacknowledged_published"] += 1
        totals = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
        return {"phases": rows, "total": totals, "refused": dict(self.refused), "events": self.events,
                "connections": {app.name: app.client.connections for app in self.apps},
                "lost_detail": lost_detail}


def _inside(p: Pub, gap: Any) -> bool:
    """Whether publication ``p`` lies in the hole a Gap reports: after ``last`` and before ``resumed``."""
    after = gap.last is None or p.epoch != gap.last.epoch or p.offset > gap.last.offset
    before = gap.resumed is None or p.epoch != gap.resumed.epoch or p.offset < gap.resumed.offset
    return after and before


def by_fault(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-phase rows summed by fault kind (``kill#2`` counts as ``kill``)."""
    out: dict[str, dict[str, Any]] = {}
    for ph, row in report["phases"].items():
        kind = ph.split("#")[0]
        acc = out.setdefault(kind, dict.fromkeys(row, 0))
        for k, v in row.items():
            acc[k] += v
    return out
