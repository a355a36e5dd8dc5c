"""Load generator for the fan-out benchmark (library + CLI).

N client connections are spread over P worker processes, each running its own uvloop. The parent
process publishes and coordinates; workers only talk to the parent at phase boundaries (one pipe per
worker, a handful of messages per phase), never per received frame.

Each connection connects, waits for the ``welcome`` frame when the target sends one (wsd), optionally
subscribes (``{"op":"subscribe","id":1,"channel":..}`` and waits for ``{"id":1,"ok":true}``), then
counts received messages and the publish-to-receive latency from the ``ts`` (``time.time()`` at
publish; all processes share one clock) embedded in each published payload. A received frame may be
``{"type":"message","data":{..}}``, ``{"type":"batch","messages":[..]}`` (each inner message counts)
or a bare payload carrying ``ts``. Every payload also carries ``ph`` (the phase number), so a late
frame from one phase is never counted in the next.

Two client implementations:

* ``raw`` (default): a minimal RFC 6455 client on ``asyncio.Protocol`` (handshake, masked client
  frames, ping -> pong, close). No task per connection; a received frame costs a header parse, one
  msgspec decode and a clock read. The generator shares the machine with the server, so the cheaper it
  is, the more the figures say about the server.
* ``websockets``: ``websockets.asyncio.client.connect`` plus one reader task per connection, to
  cross-check the raw client.

Phases (see docs/benchmarks.md): connect, idle, steady, burst.

CLI, against a server that is already running::

    python benchmarks/loadgen.py --target bare --port 8800 --server-pid 1234 --conns 1000
    python benchmarks/loadgen.py --target wsd --port 8765 --secret S --control-socket /run/wsd.sock \
        --server-pid 1234 --conns 1000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import resource
import sys
import threading
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import msgspec

NOISY_CORES = 0.25
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# --------------------------------------------------------------------------------------------------
# shared helpers


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def run_loop(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def log(*parts: Any) -> None:
    """Progress goes to stderr; stdout is reserved for the JSON result."""
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def mint_token(secret: str, sub: str, company: str = "c1", ttl_s: int = 3600) -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": sub, "company_id": company, "roles": [], "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


_PAD_CACHE: dict[int, str] = {}


def make_payload(phase: int, seq: int, size: int = 200) -> dict[str, Any]:
    """The published data: about ``size`` bytes of JSON including the publish timestamp ``ts``."""
    pad = _PAD_CACHE.get(size)
    if pad is None:
        probe = {"ts": time.time(), "ph": 1, "seq": 100000, "sym": "EURUSD", "bid": 1.08412, "ask": 1.08425}
        base = len(msgspec.json.encode({**probe, "pad": ""}))
        pad = _PAD_CACHE[size] = "x" * max(0, size - base)
    return {
        "ts": time.time(),
        "ph": phase,
        "seq": seq,
        "sym": "EURUSD",
        "bid": 1.08412,
        "ask": 1.08425,
        "pad": pad,
    }


@dataclass
class Target:
    """Where and how to connect; picklable so it can be handed to the worker processes."""

    kind: str  # "wsd" | "bare"
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/"  # subscriber path: "/" (bare) or "/ws/frontend" (wsd)
    secret: str | None = None  # wsd: the HS256 secret the generator mints tokens with
    channel: str | None = None  # wsd: the channel every connection subscribes to after the welcome
    expect_welcome: bool = False
    publish: str = "ws"  # bare: "ws"; wsd: "control" | "api"
    publish_path: str = "/publish"  # bare
    control_socket: str | None = None  # wsd, publish path A
    api_path: str = "/ws/api"  # wsd, publish path B
    bare_frame: str = "envelope"  # bare: "envelope" (same shape as wsd's message push) | "raw"
    server_pid: int | None = None
    per_user: bool = False  # bare: each subscriber says who it is (``?user=ID``), for per-user traffic
    user_publish_path: str = "/publish-user"  # bare: frames "ID PAYLOAD" go to that user's connection

    @classmethod
    def bare(cls, port: int, **kw: Any) -> Target:
        return cls(kind="bare", port=port, path="/", publish="ws", **kw)

    @classmethod
    def wsd(
        cls, port: int, secret: str, control_socket: str | None, publish: str = "control", **kw: Any
    ) -> Target:
        kw.setdefault("channel", "bench")
        return cls(
            kind="wsd",
            port=port,
            path="/ws/frontend",
            secret=secret,
            expect_welcome=True,
            publish=publish,
            control_socket=control_socket,
            **kw,
        )

    def request_target(self, user: str) -> str:
        """The subscriber path; for wsd with a fresh token for ``user`` in the query."""
        if self.kind == "wsd":
            assert self.secret is not None
            return f"{self.path}?token={mint_token(self.secret, user)}"
        if self.per_user:
            return f"{self.path}?user={user}"
        return self.path

    def check(self) -> None:
        if self.host not in LOOPBACK:
            raise ValueError(f"benchmarks only run on loopback, not {self.host!r}")


# --------------------------------------------------------------------------------------------------
# worker side: counting what arrives


_decode = msgspec.json.Decoder().decode


class Sink:
    """The counters of one worker for the current phase."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.rand = random.Random(12345)
        self.closed = 0
        self.close_codes: Counter[str] = Counter()
        self.reset(0)

    def reset(self, phase: int) -> None:
        self.phase = phase
        self.received = 0
        self.frames = 0
        self.stray = 0
        self.other = 0
        self.samples = array("d")
        self.max_lat = 0.0
        self.last_recv = 0.0
        self.closed_at_reset = self.closed

    def on_text(self, payload: Any) -> None:
        try:
            obj = _decode(payload)
        except msgspec.DecodeError:
            self.other += 1
            return
        now = time.time()
        self.frames += 1
        if type(obj) is not dict:
            self.other += 1
            return
        kind = obj.get("type")
        if kind == "message":
            self._one(obj.get("data"), now)
        elif kind == "batch":
            for m in obj.get("messages") or ():
                self._one(m.get("data", m) if type(m) is dict else m, now)
        elif kind is None and "ts" in obj:
            self._one(obj, now)
        else:
            self.other += 1

    def _one(self, data: Any, now: float) -> None:
        if type(data) is not dict or data.get("ph") != self.phase:
            self.stray += 1
            return
        lat = now - data["ts"]
        self.received += 1
        self.last_recv = now
        if lat > self.max_lat:
            self.max_lat = lat
        if self.received <= self.cap:
            self.samples.append(lat)
        else:  # reservoir: keeps a uniform sample of all latencies
            j = self.rand.randrange(self.received)
            if j < self.cap:
                self.samples[j] = lat

    def on_closed(self, code: int | None) -> None:
        self.closed += 1
        self.close_codes[str(code)] += 1

    def counts(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "last_recv": self.last_recv,
            "closed": self.closed - self.closed_at_reset,
        }

    def report(self) -> dict[str, Any]:
        return {
            **self.counts(),
            "frames": self.frames,
            "stray": self.stray,
            "other": self.other,
            "max_lat": self.max_lat,
            "samples": self.samples.tobytes(),
            "close_codes": dict(self.close_codes),
        }


class HandshakeError(Exception):
    pass


class RawClient(asyncio.Protocol):
    """A minimal WebSocket client: enough of RFC 6455 to subscribe and count, nothing more."""

    def __init__(
        self,
        sink: Sink,
        host: str,
        port: int,
        target: str,
        expect_welcome: bool,
        channel: str | None,
    ) -> None:
        self.sink = sink
        self.request_target = target
        self.host_header = f"{host}:{port}"
        self.expect_welcome = expect_welcome
        self.channel = channel
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.state = "handshake"  # -> welcome -> subscribe -> open -> closed
        self.rest = b""
        self.fragments: list[bytes] | None = None
        self.close_sent = False
        self.close_code: int | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances, but they have the same methods
        self.transport = tr = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        tr.write(  # type: ignore[attr-defined]
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nUser-Agent: wsd-bench\r\n\r\n"
            % (self.request_target.encode(), self.host_header.encode(), key)
        )

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
            self.rest = b""
        if self.state == "handshake":
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 65536:
                    self._fail("handshake: response head too large")
                else:
                    self.rest = data
                return
            head = data[:end].decode("latin-1")
            data = data[end + 4 :]
            status_line, _, headers = head.partition("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or parts[1] != "101":
                self._fail(f"http {parts[1] if len(parts) > 1 else '?'}")
                return
            accept = None
            for line in headers.split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "sec-websocket-accept":
                    accept = value.strip().encode()
            if accept != self.accept:
                self._fail("handshake: bad Sec-WebSocket-Accept")
                return
            if self.expect_welcome:
                self.state = "welcome"
            else:
                self._open()
            if not data:
                return
        self._parse(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self._reject(f"closed during {self.state}")
        elif self.state == "open":
            self.sink.on_closed(self.close_code)
        self.state = "closed"
        if not self.lost.done():
            self.lost.set_result(None)

    # frames -----------------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        mv = memoryview(data)
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                self._fail("protocol: masked frame from server")
                return
            end = pos + head + length
            if end > n:
                break
            payload = mv[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1 and b0 & 0x80:
                self._on_text(payload)
            elif opcode == 9:
                self._send(0xA, bytes(payload))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.close_sent:
                    self._send(0x8, bytes(payload[:2]))
                    self.close_sent = True
                if self.transport is not None:
                    self.transport.close()
                return
            elif opcode in (0, 1, 2):  # fragmented message
                if opcode != 0:
                    self.fragments = [bytes(payload)] if opcode == 1 else None
                elif self.fragments is not None:
                    self.fragments.append(bytes(payload))
                if b0 & 0x80 and opcode == 0 and self.fragments is not None:
                    whole = b"".join(self.fragments)
                    self.fragments = None
                    self._on_text(whole)
            # pong (0xA) and binary frames are ignored
        if pos < n:
            self.rest = bytes(mv[pos:])

    def _on_text(self, payload: Any) -> None:
        state = self.state
        if state == "open":
            self.sink.on_text(payload)
            return
        try:
            obj = _decode(payload)
        except msgspec.DecodeError:
            self._fail(f"{state}: undecodable frame")
            return
        if state == "welcome":
            if type(obj) is not dict or obj.get("type") != "welcome":
                self._fail(f"welcome: got {str(obj)[:80]}")
                return
            if self.channel:
                self.state = "subscribe"
                self.send_text(msgspec.json.encode({"op": "subscribe", "id": 1, "channel": self.channel}))
            else:
                self._open()
        elif state == "subscribe":
            if type(obj) is dict and obj.get("id") == 1:
                if obj.get("ok") is True:
                    self._open()
                else:
                    self._fail(f"subscribe refused: {str(obj.get('error'))[:80]}")
            # anything else before the reply (e.g. a message) is ignored

    def _open(self) -> None:
        self.state = "open"
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self._reject(reason)
        if self.transport is not None:
            self.transport.abort()

    def _reject(self, reason: str) -> None:
        self.ready.set_exception(HandshakeError(reason))
        self.ready.exception()  # mark retrieved: the opener may have timed out and gone away

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(
            n, "big"
        )
        self.transport.write(head + mask + masked)

    def send_text(self, payload: bytes) -> None:
        self._send(0x1, payload)

    async def close(self) -> None:
        """Close handshake, bounded: the caller waits on ``lost`` with a deadline."""
        if self.state == "closed" or self.transport is None:
            return
        if not self.close_sent:
            self.close_sent = True
            self._send(0x8, (1000).to_bytes(2, "big"))
        self.state = "closing"

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class WsClient:
    """The same job done with ``websockets.asyncio.client`` (one reader task per connection)."""

    def __init__(self, sink: Sink, ws: Any) -> None:
        self.sink = sink
        self.ws = ws
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, sink: Sink, target: Target, request_target: str) -> WsClient:
        from websockets.asyncio.client import connect

        ws = await connect(
            f"ws://{target.host}:{target.port}{request_target}",
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=10,
            max_queue=64,
            user_agent_header="wsd-bench",
        )
        try:
            if target.expect_welcome:
                obj = _decode(await asyncio.wait_for(ws.recv(decode=False), 10))
                if type(obj) is not dict or obj.get("type") != "welcome":
                    raise HandshakeError(f"welcome: got {str(obj)[:80]}")
            if target.channel:
                await ws.send(
                    msgspec.json.encode({"op": "subscribe", "id": 1, "channel": target.channel}), text=True
                )
                for _ in range(100):
                    obj = _decode(await asyncio.wait_for(ws.recv(decode=False), 10))
                    if type(obj) is dict and obj.get("id") == 1:
                        if obj.get("ok") is not True:
                            raise HandshakeError(f"subscribe refused: {str(obj.get('error'))[:80]}")
                        break
                else:
                    raise HandshakeError("subscribe: no reply")
        except BaseException:
            await ws.close()
            raise
        client = cls(sink, ws)
        client.task = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in self.ws:
                self.sink.on_text(frame)
        except ConnectionClosed:
            pass
        finally:
            if not getattr(self, "closing", False):
                self.sink.on_closed(self.ws.close_code)

    async def close(self) -> None:
        self.closing = True
        await self.ws.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()


class Worker:
    """One worker process: owns its share of the connections and answers the parent's commands."""

    def __init__(
        self, wid: int, pipe: Any, target: Target, first: int, count: int, opts: dict[str, Any]
    ) -> None:
        self.wid = wid
        self.pipe = pipe
        self.target = target
        self.first = first
        self.count = count
        self.opts = opts
        self.sink = Sink(int(opts.get("sample_cap", 200_000)))
        self.clients: list[Any] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def serve(self) -> None:
        # The pipe is read by a thread: an event loop reader would make its fd non-blocking (uvloop
        # does), and multiprocessing's Connection needs a blocking fd for large messages.
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.pipe.send(("hello", {"pid": os.getpid(), "fd_limit": raise_fd_limit()}))
        reader = threading.Thread(target=self._read_commands, args=(loop,), name="commands", daemon=True)
        reader.start()
        try:
            await self.done
        finally:
            await self._close_all(float(self.opts.get("close_timeout_s", 5.0)))

    def _read_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.pipe.recv()
            except (EOFError, OSError):  # the parent is gone: stop
                message = ("close", 2.0)
            try:
                loop.call_soon_threadsafe(self._on_command, message)
            except RuntimeError:  # the loop is closed
                return
            if message[0] == "close":
                return

    def _on_command(self, message: tuple[str, Any]) -> None:
        cmd, arg = message
        if cmd == "phase":
            self.sink.reset(int(arg))
            self._reply("ok", None)
        elif cmd == "count":
            self._reply("ok", self.sink.counts())
        elif cmd == "report":
            self._reply("ok", self.sink.report())
        elif cmd in ("connect", "close"):
            task = asyncio.get_running_loop().create_task(self._run(cmd, arg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self._reply("error", f"unknown command {cmd!r}")

    async def _run(self, cmd: str, arg: Any) -> None:
        try:
            if cmd == "connect":
                reply: tuple[str, Any] = ("ok", await self._connect_all())
            else:
                await self._close_all(float(arg or 5.0))
                reply = ("ok", None)
        except Exception as exc:  # reported to the parent, which decides
            reply = ("error", f"{type(exc).__name__}: {exc}")
        self._reply(*reply)
        if cmd == "close" and not self.done.done():
            self.done.set_result(None)

    def _reply(self, status: str, value: Any) -> None:
        with contextlib.suppress(OSError):  # the parent may be gone
            self.pipe.send((status, value))

    async def _open_one(self, i: int) -> Any:
        t = self.target
        target = t.request_target(f"u{i}")
        if self.opts.get("client", "raw") == "websockets":
            return await WsClient.open(self.sink, t, target)
        loop = asyncio.get_running_loop()
        proto = RawClient(self.sink, t.host, t.port, target, t.expect_welcome, t.channel)
        try:
            await loop.create_connection(lambda: proto, t.host, t.port)
            await proto.ready
        except BaseException:
            proto.abort()
            raise
        return proto

    async def _connect_all(self) -> dict[str, Any]:
        timeout = float(self.opts.get("connect_timeout_s", 10.0))
        concurrency = max(1, int(self.opts.get("connect_concurrency", 50)))
        indices = iter(range(self.first, self.first + self.count))
        failures: Counter[str] = Counter()
        started = time.monotonic()

        async def runner() -> None:
            for i in indices:  # shared iterator: bounded by count
                try:
                    client = await asyncio.wait_for(self._open_one(i), timeout)
                    self.clients.append(client)
                except Exception as exc:
                    failures[_reason(exc)] += 1

        await asyncio.gather(*(runner() for _ in range(min(concurrency, self.count) or 1)))
        return {
            "connected": len(self.clients),
            "failed": sum(failures.values()),
            "reasons": dict(failures.most_common(5)),
            "elapsed": time.monotonic() - started,
        }

    async def _close_all(self, timeout_s: float) -> None:
        clients, self.clients = self.clients, []
        if not clients:
            return
        if isinstance(clients[0], RawClient):
            for c in clients:
                await c.close()
            waits = [c.lost for c in clients if not c.lost.done()]
            if waits:
                await asyncio.wait(waits, timeout=timeout_s)
            for c in clients:
                c.abort()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.close() for c in clients), return_exceptions=True), timeout_s
                )
            for c in clients:
                c.abort()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    text = str(exc) or type(exc).__name__
    return text[:80]


def worker_main(wid: int, pipe: Any, target: Target, first: int, count: int, opts: dict[str, Any]) -> None:
    """Entry point of a worker process."""
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(Worker(wid, pipe, target, first, count, opts).serve())


# --------------------------------------------------------------------------------------------------
# parent side: workers, publishers, phases


class WorkerHandle:
    def __init__(self, wid: int, proc: Any, pipe: Any) -> None:
        self.wid = wid
        self.proc = proc
        self.pipe = pipe
        self.lock = asyncio.Lock()
        self.pid: int | None = None

    async def _recv(self, wait_s: float) -> Any:
        def recv() -> Any:  # in a thread: bounded by ``wait_s``, and by EOF if the worker dies
            if not self.pipe.poll(wait_s):
                raise TimeoutError(f"worker {self.wid}: no answer in {wait_s:.0f}s")
            return self.pipe.recv()

        try:
            return await asyncio.to_thread(recv)
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"worker {self.wid} died: {exc!r}") from exc

    async def call(self, cmd: str, arg: Any = None, wait_s: float = 30.0) -> Any:
        async with self.lock:
            self.pipe.send((cmd, arg))
            status, value = await self._recv(wait_s)
            if status != "ok":
                raise RuntimeError(f"worker {self.wid}: {cmd}: {value}")
            return value


class LoadGen:
    """N connections over P worker processes. Use as ``async with LoadGen(...) as lg``."""

    def __init__(self, target: Target, conns: int, procs: int = 2, **opts: Any) -> None:
        target.check()
        self.target = target
        self.conns = conns
        self.procs = max(1, min(procs, conns))
        self.opts = opts
        self.workers: list[WorkerHandle] = []
        self.connected = 0

    async def __aenter__(self) -> LoadGen:
        ctx = mp.get_context("spawn")
        share, extra = divmod(self.conns, self.procs)
        first = 0
        try:
            for wid in range(self.procs):
                count = share + (1 if wid < extra else 0)
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=worker_main,
                    args=(wid, child_end, self.target, first, count, self.opts),
                    name=f"loadgen-{wid}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self.workers.append(WorkerHandle(wid, proc, parent_end))
                first += count
            for w in self.workers:
                status, hello = await w._recv(30.0)
                if status != "hello":
                    raise RuntimeError(f"worker {w.wid}: unexpected first message {status!r}")
                w.pid = hello["pid"]
        except BaseException:
            await self._stop(0.0)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._stop(float(self.opts.get("close_timeout_s", 5.0)))

    async def _stop(self, close_timeout: float) -> None:
        if close_timeout > 0:
            with contextlib.suppress(Exception):
                await asyncio.gather(
                    *(
                        w.call("close", close_timeout, wait_s=close_timeout + 5)
                        for w in self.workers
                        if w.proc.is_alive()
                    ),
                    return_exceptions=True,
                )
        for w in self.workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=2)
            w.pipe.close()
        self.workers = []

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid]

    async def all(self, cmd: str, arg: Any = None, wait_s: float = 30.0) -> list[Any]:
        return list(await asyncio.gather(*(w.call(cmd, arg, wait_s) for w in self.workers)))

    async def connect(self) -> dict[str, Any]:
        timeout = 30.0 + self.conns / 20.0
        started = time.monotonic()
        parts = await self.all("connect", wait_s=timeout)
        elapsed = time.monotonic() - started
        self.connected = sum(p["connected"] for p in parts)
        reasons: Counter[str] = Counter()
        for p in parts:
            reasons.update(p["reasons"])
        return {
            "connected": self.connected,
            "failures": sum(p["failed"] for p in parts),
            "failure_reasons": dict(reasons.most_common(5)),
            "elapsed_s": elapsed,
            "rate_cps": self.connected / elapsed if elapsed > 0 else None,
        }

    async def set_phase(self, phase: int) -> None:
        await self.all("phase", phase)

    async def counts(self) -> dict[str, Any]:
        parts = await self.all("count", wait_s=30)  # a worker busy with 10,000 connections in a burst answers late
        return {
            "received": sum(p["received"] for p in parts),
            "last_recv": max(p["last_recv"] for p in parts),
            "closed": sum(p["closed"] for p in parts),
        }

    async def report(self) -> dict[str, Any]:
        parts = await self.all("report", wait_s=60)
        samples: list[float] = []
        codes: Counter[str] = Counter()
        for p in parts:
            a = array("d")
            a.frombytes(p["samples"])
            samples.extend(a)
            codes.update(p["close_codes"])
        samples.sort()
        out = {k: sum(p[k] for p in parts) for k in ("received", "frames", "stray", "other", "closed")}
        out["last_recv"] = max(p["last_recv"] for p in parts)
        out["max_lat"] = max(p["max_lat"] for p in parts)
        out["close_codes"] = dict(codes)
        out["samples"] = samples
        return out

    async def drain(self, expected: int, quiet_s: float, max_s: float) -> dict[str, Any]:
        """Wait until ``expected`` messages arrived, nothing arrived for ``quiet_s``, or ``max_s``."""
        deadline = time.monotonic() + max_s
        last_total = -1
        last_change = time.monotonic()
        counts = await self.counts()
        while time.monotonic() < deadline:
            counts = await self.counts()
            if counts["received"] >= expected:
                break
            now = time.monotonic()
            if counts["received"] != last_total:
                last_total = counts["received"]
                last_change = now
            elif now - last_change >= quiet_s:
                break
            await asyncio.sleep(0.05)
        return counts


class Publisher:
    """Publishes payloads to the target; ``send`` returns without waiting for the reply."""

    path = "?"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.seq = 0
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.first_error: str | None = None
        self.first_result: Any = None
        self.closed_reason: str | None = None
        self.pending: dict[int, asyncio.Future[Any]] = {}

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def _settle(self, reply: dict[str, Any]) -> None:
        fut = self.pending.pop(reply.get("id"), None)  # type: ignore[arg-type]
        if fut is None:
            return
        if "error" in reply or reply.get("ok") is False:
            self.errors += 1
            if self.first_error is None:
                self.first_error = json.dumps(reply.get("error"))[:200]
        else:
            self.ok += 1
            if self.first_result is None:
                self.first_result = reply.get("result")
        if not fut.done():
            fut.set_result(reply)

    def _lost(self, why: str) -> None:
        """The publish connection is gone: every outstanding request fails now, not at the timeout."""
        self.closed_reason = why
        for rid, fut in list(self.pending.items()):
            self.pending.pop(rid, None)
            self.errors += 1
            if self.first_error is None:
                self.first_error = why
            if not fut.done():
                fut.set_result({"id": rid, "error": why})

    async def send(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    async def flush(self, wait_s: float = 30.0) -> None:
        """Wait for every reply still outstanding (bounded)."""
        futs = [f for f in self.pending.values() if not f.done()]
        if futs:
            await asyncio.wait(futs, timeout=wait_s)
        for i, f in list(self.pending.items()):  # unanswered: counted as errors
            if not f.done():
                f.cancel()
            self.pending.pop(i, None)
            self.errors += 1
            self.first_error = self.first_error or "no reply"

    async def steady(self, phase: int, rate: float, duration: float) -> int:
        """Publish ``rate`` messages per second for ``duration`` seconds, on a fixed schedule."""
        total = max(1, round(rate * duration))
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.send(make_payload(phase, i, self.payload_bytes))
        return total

    async def burst(self, phase: int, count: int, window: int = 64) -> int:
        """Publish ``count`` messages as fast as the publish path accepts them (``window`` unacked)."""
        for i in range(count):
            if len(self.pending) >= window:
                await asyncio.wait(
                    list(self.pending.values()), return_when=asyncio.FIRST_COMPLETED, timeout=30
                )
            await self.send(make_payload(phase, i, self.payload_bytes))
        return count

    @property
    def acked(self) -> int:
        return self.ok

    payload_bytes = 200


class BarePublisher(Publisher):
    """A WebSocket to the bare server's publish path; fire and forget (there is no reply)."""

    path = "bare-ws"

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        t = self.target
        self.ws = await connect(
            f"ws://{t.host}:{t.port}{t.publish_path}",
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=10,
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)

    async def send(self, payload: dict[str, Any]) -> None:
        self.seq += 1
        if self.target.bare_frame == "raw":
            frame = payload
        else:  # the shape of wsd's message push, so both servers write the same bytes
            frame = {
                "type": "message",
                "channel": "bench",
                "offset": self.seq,
                "epoch": "bare",
                "msg_type": "tick",
                "priority": "normal",
                "ts": payload["ts"],
                "data": payload,
            }
        await self.ws.send(msgspec.json.encode(frame), text=True)
        self.sent += 1
        self.ok += 1


class ControlPublisher(Publisher):
    """wsd publish path A: newline-delimited JSON on the control socket, pipelined."""

    path = "wsd-control-socket"

    async def open(self) -> None:
        assert self.target.control_socket
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.target.control_socket, limit=1 << 22), 10
        )
        self.read_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                with contextlib.suppress(msgspec.DecodeError):
                    reply = _decode(line)
                    if type(reply) is dict:
                        self._settle(reply)
        finally:
            self._lost("control socket closed by wsd")

    async def close(self) -> None:
        self.read_task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)

    async def send(self, payload: dict[str, Any]) -> None:
        if self.closed_reason:
            raise RuntimeError(f"cannot publish: {self.closed_reason}")
        self.seq += 1
        rid = self.seq
        self.pending[rid] = asyncio.get_running_loop().create_future()
        params = {"channel": "bench", "type": "tick", "data": payload, "priority": "normal"}
        self.writer.write(msgspec.json.encode({"id": rid, "method": "publish", "params": params}) + b"\n")
        self.sent += 1
        await self.writer.drain()


class ApiPublisher(Publisher):
    """wsd publish path B: a client of the api pool sending ``publish`` requests."""

    path = "wsd-api-pool"

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        t = self.target
        assert t.secret
        token = mint_token(t.secret, "bench-publisher")
        self.ws = await connect(
            f"ws://{t.host}:{t.port}{t.api_path}?token={token}",
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=10,
            max_queue=None,
        )
        try:
            welcome = _decode(await asyncio.wait_for(self.ws.recv(decode=False), 10))
            if type(welcome) is not dict or welcome.get("type") != "welcome":
                raise HandshakeError(f"api publisher: expected welcome, got {str(welcome)[:80]}")
        except BaseException:
            await self.ws.close()
            raise
        self.read_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            with contextlib.suppress(ConnectionClosed):
                async for frame in self.ws:
                    with contextlib.suppress(msgspec.DecodeError):
                        reply = _decode(frame)
                        if type(reply) is dict and "id" in reply:
                            self._settle(reply)
        finally:
            self._lost(
                f"api publisher closed by wsd: {self.ws.close_code} {self.ws.close_reason or ''}".strip()
            )

    async def close(self) -> None:
        self.read_task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)

    async def send(self, payload: dict[str, Any]) -> None:
        if self.closed_reason:
            raise RuntimeError(f"cannot publish: {self.closed_reason}")
        self.seq += 1
        rid = self.seq
        self.pending[rid] = asyncio.get_running_loop().create_future()
        req = {
            "op": "publish",
            "id": rid,
            "channel": "bench",
            "type": "tick",
            "data": payload,
            "priority": "normal",
        }
        self.sent += 1
        await self.ws.send(msgspec.json.encode(req), text=True)


def make_publisher(target: Target) -> Publisher:
    if target.kind == "bare":
        return BarePublisher(target)
    if target.publish == "api":
        return ApiPublisher(target)
    return ControlPublisher(target)


@dataclass
class PhaseOptions:
    """Phase lengths and loads. ``steady_rate`` and ``burst_messages`` left at None are derived from
    the connection count, so every size gets the same delivery load (see ``resolve``)."""

    conns: int = 1000
    procs: int = 2
    client: str = "raw"
    connect_concurrency: int = 50
    settle_s: float = 2.0
    idle_s: float = 5.0
    steady_rate: float | None = None  # published msg/s; None: steady_deliveries_per_s / conns
    steady_deliveries_per_s: float = 20_000.0
    steady_s: float = 10.0
    burst_messages: int | None = None  # None: burst_deliveries / conns, clamped to 20..500
    burst_deliveries: int = 500_000
    burst_window: int = 64
    payload_bytes: int = 200
    drain_quiet_s: float = 2.0
    drain_max_s: float = 60.0
    sample_cap: int = 200_000
    warmup_conns: int = 10

    @classmethod
    def quick(cls, **kw: Any) -> PhaseOptions:
        base: dict[str, Any] = dict(
            settle_s=1.0, idle_s=2.0, steady_s=3.0, burst_deliveries=200_000, drain_max_s=15.0
        )
        base.update(kw)
        return cls(**base)

    def resolve(self) -> PhaseOptions:
        """Fill in the derived loads; the result is what actually runs (and is reported)."""
        rate = self.steady_rate
        if rate is None:
            rate = round(min(100.0, max(1.0, self.steady_deliveries_per_s / self.conns)), 3)
        burst = self.burst_messages
        if burst is None:
            burst = int(min(500, max(20, self.burst_deliveries // self.conns)))
        return replace(self, steady_rate=rate, burst_messages=burst)


class ServerProbe:
    """CPU and RSS of the server process and its children, via psutil."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self.proc = psutil.Process(pid) if pid else None

    def _procs(self) -> list[Any]:
        if self.proc is None:
            return []
        import psutil

        procs = [self.proc]
        with contextlib.suppress(psutil.Error):
            procs += self.proc.children(recursive=True)
        return procs

    def rss(self) -> int | None:
        if self.proc is None:
            return None
        return sum(p.memory_info().rss for p in self._procs())

    def cpu(self) -> float | None:
        if self.proc is None:
            return None
        total = 0.0
        for p in self._procs():
            t = p.cpu_times()
            total += t.user + t.system
        return total


def _cpu_of(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def _machine_cpu() -> tuple[float, float, float]:
    """Machine-wide CPU seconds so far (all CPUs, /proc/stat via psutil): time in processes, in
    interrupts (softirq + irq: on loopback, much of the TCP stack's work), stolen by the hypervisor."""
    import psutil

    t = psutil.cpu_times()
    procs = t.user + t.nice + t.system - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    irq = getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return procs, irq, getattr(t, "steal", 0.0)


class Accounting:
    """CPU seconds over a phase: the server, the generator (workers + this process), the kernel's
    interrupt work, and everyone else on the machine (``other_cpu_s`` + ``steal_cpu_s``: the noise)."""

    def __init__(self, probe: ServerProbe, worker_pids: list[int]) -> None:
        self.probe = probe
        self.pids = [*worker_pids, os.getpid()]

    def __enter__(self) -> Accounting:
        self.t0 = time.monotonic()
        self.server0 = self.probe.cpu()
        self.gen0 = _cpu_of(self.pids)
        self.machine0 = _machine_cpu()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.monotonic() - self.t0
        server1 = self.probe.cpu()
        self.server = None if server1 is None or self.server0 is None else server1 - self.server0
        self.gen = _cpu_of(self.pids) - self.gen0
        procs, irq, steal = (b - a for a, b in zip(self.machine0, _machine_cpu(), strict=True))
        self.irq = irq
        self.steal = steal
        self.other = max(0.0, procs - self.gen - (self.server or 0.0))

    def figures(self) -> dict[str, Any]:
        noise = (self.other + self.steal) / self.wall if self.wall > 0 else 0.0
        return {
            "server_cpu_s": None if self.server is None else round(self.server, 3),
            "server_cpu_percent": None if self.server is None else round(100 * self.server / self.wall, 2),
            "loadgen_cpu_s": round(self.gen, 3),
            "irq_cpu_s": round(self.irq, 3),
            "other_cpu_s": round(self.other, 3),
            "steal_cpu_s": round(self.steal, 3),
            # other processes (or the hypervisor) took more than a quarter of a core on average:
            # on a 2-core machine the figures of this phase are suspect
            "noisy": noise > NOISY_CORES,
        }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)


def latency_figures(samples: list[float], max_lat: float) -> dict[str, float | None]:
    return {
        "p50_ms": _ms(percentile(samples, 50)),
        "p90_ms": _ms(percentile(samples, 90)),
        "p99_ms": _ms(percentile(samples, 99)),
        "max_ms": _ms(max_lat) if samples else None,
    }


async def warm_up(target: Target, publisher: Publisher | None, conns: int) -> None:
    """Open and close a few connections and publish once, so lazy imports and caches exist
    before the baseline RSS is read."""
    if conns <= 0:
        return
    sink = Sink(10)
    loop = asyncio.get_running_loop()
    clients: list[RawClient] = []
    for i in range(conns):
        req = target.request_target(f"warm{i}")
        proto = RawClient(sink, target.host, target.port, req, target.expect_welcome, target.channel)
        try:
            await asyncio.wait_for(loop.create_connection(lambda p=proto: p, target.host, target.port), 10)  # type: ignore[misc]
            await asyncio.wait_for(proto.ready, 10)
            clients.append(proto)
        except Exception as exc:
            proto.abort()
            raise RuntimeError(f"warm-up connection failed: {_reason(exc)}") from exc
    if publisher is not None:
        await publisher.send(make_payload(-1, 0, publisher.payload_bytes))
        await publisher.flush(10)
    await asyncio.sleep(0.2)
    for c in clients:
        await c.close()
    await asyncio.wait([c.lost for c in clients], timeout=5)
    for c in clients:
        c.abort()


async def run_phases(target: Target, opts: PhaseOptions) -> dict[str, Any]:
    """Run connect, idle, steady and burst against one running server; return the figures."""
    target.check()
    opts = opts.resolve()
    assert opts.steady_rate is not None and opts.burst_messages is not None
    probe = ServerProbe(target.server_pid)
    publisher = make_publisher(target)
    publisher.payload_bytes = opts.payload_bytes
    result: dict[str, Any] = {
        "target": target.kind,
        "publish_path": publisher.path,
        "client": opts.client,
        "conns": opts.conns,
        "steady_rate": opts.steady_rate,
        "burst_messages": opts.burst_messages,
    }
    worker_opts = {
        "client": opts.client,
        "connect_concurrency": opts.connect_concurrency,
        "sample_cap": opts.sample_cap,
    }
    await publisher.open()
    try:
        await warm_up(target, publisher, opts.warmup_conns)
        async with LoadGen(target, opts.conns, opts.procs, **worker_opts) as lg:
            await asyncio.sleep(0.5)
            rss0 = probe.rss()

            # connect ------------------------------------------------------------------------
            log(f"[{target.kind}] connect {opts.conns} over {lg.procs} workers")
            c = await lg.connect()
            result["connect"] = c
            n = c["connected"]
            if n == 0:
                raise RuntimeError(f"no connection succeeded: {c['failure_reasons']}")

            # idle ---------------------------------------------------------------------------
            await asyncio.sleep(opts.settle_s)
            rss1 = probe.rss()
            with Accounting(probe, lg.pids) as idle:
                await asyncio.sleep(opts.idle_s)
            result["idle"] = {
                "rss_before_mib": None if rss0 is None else round(rss0 / 2**20, 2),
                "rss_after_mib": None if rss1 is None else round(rss1 / 2**20, 2),
                "rss_per_conn_kib": None
                if rss0 is None or rss1 is None
                else round((rss1 - rss0) / n / 1024, 2),
                "cpu_percent": idle.figures()["server_cpu_percent"],
                "window_s": round(idle.wall, 2),
                "other_cpu_s": idle.figures()["other_cpu_s"],
                "steal_cpu_s": idle.figures()["steal_cpu_s"],
                "noisy": idle.figures()["noisy"],
            }

            # steady -------------------------------------------------------------------------
            log(f"[{target.kind}] steady {opts.steady_rate} msg/s x {opts.steady_s}s to {n}")
            await lg.set_phase(1)
            with Accounting(probe, lg.pids) as acct:
                w0 = time.time()
                published = await publisher.steady(1, opts.steady_rate, opts.steady_s)
                await publisher.flush()
                ok = published - publisher.errors
                expected = ok * n
                await lg.drain(expected, opts.drain_quiet_s, opts.drain_max_s)
            rep = await lg.report()
            span = (rep["last_recv"] - w0) if rep["received"] else None
            result["steady"] = {
                "rate": opts.steady_rate,
                "published": published,
                "publish_errors": publisher.errors,
                "expected": expected,
                "received": rep["received"],
                "frames": rep["frames"],
                "drops": expected - rep["received"],
                "deliveries_per_s": round(rep["received"] / span, 1) if span else None,
                **latency_figures(rep["samples"], rep["max_lat"]),
                **acct.figures(),
                "closed_during": rep["closed"],
                "stray": rep["stray"],
                "other_frames": rep["other"],
            }
            del rep

            # burst --------------------------------------------------------------------------
            log(f"[{target.kind}] burst {opts.burst_messages} msgs to {n}")
            errors_before = publisher.errors
            await lg.set_phase(2)
            with Accounting(probe, lg.pids) as acct:
                w0 = time.time()
                published = await publisher.burst(2, opts.burst_messages, opts.burst_window)
                w_pub = time.time()
                await publisher.flush()
                ok = published - (publisher.errors - errors_before)
                expected = ok * n
                await lg.drain(expected, opts.drain_quiet_s, opts.drain_max_s)
            rep = await lg.report()
            span = (rep["last_recv"] - w0) if rep["received"] else None
            cpu = acct.figures()
            result["burst"] = {
                "published": published,
                "publish_errors": publisher.errors - errors_before,
                "publish_s": round(w_pub - w0, 3),
                "expected": expected,
                "received": rep["received"],
                "frames": rep["frames"],
                "drops": expected - rep["received"],
                "span_s": round(span, 3) if span else None,
                "deliveries_per_s": round(rep["received"] / span, 1) if span else None,
                "server_cpu_us_per_delivery": (
                    None
                    if acct.server is None or not rep["received"]
                    else round(1e6 * acct.server / rep["received"], 3)
                ),
                **cpu,
                **latency_figures(rep["samples"], rep["max_lat"]),
                "closed_during": rep["closed"],
                "stray": rep["stray"],
                "close_codes": rep["close_codes"],
            }
            del rep
    finally:
        await publisher.close()
    result["publisher"] = {
        "path": publisher.path,
        "sent": publisher.sent,
        "errors": publisher.errors,
        "first_error": publisher.first_error,
        "first_result": publisher.first_result,
    }
    return result


async def measure_idle(
    target: Target,
    conns: int,
    procs: int = 2,
    client: str = "raw",
    settle_s: float = 3.0,
    warmup_conns: int = 10,
) -> dict[str, Any]:
    """Server RSS per idle connection: (RSS with ``conns`` open - RSS before) / connected."""
    target.check()
    probe = ServerProbe(target.server_pid)
    if probe.proc is None:
        raise ValueError("measure_idle needs the server's pid")
    await warm_up(target, None, warmup_conns)
    async with LoadGen(target, conns, procs, client=client) as lg:
        await asyncio.sleep(1.0)
        rss0 = probe.rss()
        c = await lg.connect()
        await asyncio.sleep(settle_s)
        rss1 = probe.rss()
        await asyncio.sleep(1.0)
        rss2 = probe.rss()  # a second reading shows whether RSS had settled
        n = c["connected"]
        if not n or rss0 is None or rss1 is None or rss2 is None:
            raise RuntimeError(f"no connection succeeded: {c['failure_reasons']}")
        return {
            "target": target.kind,
            "connected": n,
            "failures": c["failures"],
            "failure_reasons": c["failure_reasons"],
            "subscribed": bool(target.channel),
            "rss_before_mib": round(rss0 / 2**20, 2),
            "rss_after_mib": round(rss2 / 2**20, 2),
            "rss_per_conn_kib": round((rss2 - rss0) / n / 1024, 2),
            "rss_per_conn_kib_1s_earlier": round((rss1 - rss0) / n / 1024, 2),
        }


# The flat figures compared across targets, with where they come from in run_phases' result.
FIGURES: dict[str, tuple[str, str]] = {
    "connect_rate_cps": ("connect", "rate_cps"),
    "connect_failures": ("connect", "failures"),
    "idle_rss_per_conn_kib": ("idle", "rss_per_conn_kib"),
    "idle_cpu_percent": ("idle", "cpu_percent"),
    "steady_p50_ms": ("steady", "p50_ms"),
    "steady_p90_ms": ("steady", "p90_ms"),
    "steady_p99_ms": ("steady", "p99_ms"),
    "steady_max_ms": ("steady", "max_ms"),
    "steady_deliveries_per_s": ("steady", "deliveries_per_s"),
    "steady_drops": ("steady", "drops"),
    "steady_server_cpu_percent": ("steady", "server_cpu_percent"),
    "burst_deliveries_per_s": ("burst", "deliveries_per_s"),
    "burst_server_cpu_us_per_delivery": ("burst", "server_cpu_us_per_delivery"),
    "burst_drops": ("burst", "drops"),
    "burst_p50_ms": ("burst", "p50_ms"),
    "burst_p99_ms": ("burst", "p99_ms"),
}


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    return {name: result.get(phase, {}).get(key) for name, (phase, key) in FIGURES.items()}


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["wsd", "bare"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-pid", type=int, help="for RSS and CPU figures (psutil)")
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--procs", type=int, default=2, help="worker processes")
    p.add_argument("--client", choices=["raw", "websockets"], default="raw")
    p.add_argument("--publish-path", default="/publish", help="bare: the publish WebSocket path")
    p.add_argument("--bare-frame", choices=["envelope", "raw"], default="envelope")
    p.add_argument("--secret", help="wsd: the HS256 secret of the daemon's config")
    p.add_argument("--control-socket", help="wsd: the control socket (publish path A)")
    p.add_argument("--publish", choices=["control", "api"], default="control", help="wsd publish path")
    p.add_argument("--channel", default="bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--idle-s", type=float)
    p.add_argument("--steady-rate", type=float)
    p.add_argument("--steady-s", type=float)
    p.add_argument("--burst-messages", type=int)
    args = p.parse_args(argv)
    raise_fd_limit()
    if args.target == "bare":
        target = Target.bare(
            args.port, host=args.host, publish_path=args.publish_path, bare_frame=args.bare_frame
        )
    else:
        if not args.secret:
            p.error("--secret is required for --target wsd")
        if args.publish == "control" and not args.control_socket:
            p.error("--control-socket is required for --publish control")
        target = Target.wsd(
            args.port, args.secret, args.control_socket, args.publish, host=args.host, channel=args.channel
        )
    target.server_pid = args.server_pid
    kw: dict[str, Any] = {"conns": args.conns, "procs": args.procs, "client": args.client}
    for name in ("idle_s", "steady_rate", "steady_s", "burst_messages"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    opts = PhaseOptions.quick(**kw) if args.quick else PhaseOptions(**kw)
    result = run_loop(run_phases(target, opts))
    json.dump(
        {"options": asdict(opts.resolve()), "result": result, "figures": flatten(result)},
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
