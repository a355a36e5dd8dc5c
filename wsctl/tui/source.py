"""Where the dashboard gets its data: a live control-socket client, or a committed recording.

Both sources have the same small interface (``DataSource``): ``call(method, **params)`` for one
request, ``events(backlog)`` for the live event stream, ``close()``, plus ``address`` and
``available`` for the unreachable banner. The app never knows which one it holds, so tests and
demos run from a recording with no daemon at all.

``LiveSource`` drives ``wsd.control.protocol.ClientCodec`` (the codec wsctl's client uses too) over
one persistent connection for requests and a second one for ``events.subscribe``; it does only the
asyncio I/O. When the daemon goes
away it does not raise into the UI loop forever: requests fail fast with ``Unavailable`` while a
backoff runs, and the next attempt after the backoff reconnects by itself. Only
``wsd.control.protocol`` is imported from the daemon's package.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

from wsd.control import protocol as P


class Unavailable(Exception):
    """The daemon cannot be reached right now (not running, socket gone, or it stopped answering)."""


# The daemon answered with an error reply (the same class wsctl's client raises).
RequestFailed = P.RequestFailed


class DataSource(Protocol):
    address: str

    @property
    def available(self) -> bool: ...

    async def call(self, method: str, **params: Any) -> Any: ...

    def events(self, backlog: int = 50) -> AsyncIterator[dict[str, Any]]: ...

    async def close(self) -> None: ...


class Backoff:
    """Exponential reconnect delays: ``first``, doubling, capped at ``cap`` seconds; reset on success."""

    def __init__(self, first: float = 0.25, cap: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first = first
        self.cap = cap
        self.clock = clock
        self.delay = 0.0
        self.not_before = 0.0
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        self.delay = self.first if self.delay == 0 else min(self.cap, self.delay * 2)
        self.not_before = self.clock() + self.delay

    def succeeded(self) -> None:
        self.failures = 0
        self.delay = 0.0
        self.not_before = 0.0

    def wait_left(self) -> float:
        return max(0.0, self.not_before - self.clock())


class LiveSource:
    """The control socket of a running wsd, reconnecting by itself with backoff."""

    def __init__(self, socket_path: str, *, timeout: float = 5.0, backoff_first: float = 0.25,
                 backoff_cap: float = 2.0, scope: dict[str, Any] | None = None) -> None:
        self.address = socket_path
        #: the nodes of a cluster every request covers (``{"node": [...]}``, ``{"local": True}``; none: all)
        self.scope = dict(scope or {})
        self.timeout = timeout
        self.backoff = Backoff(backoff_first, backoff_cap)
        self.hello: dict[str, Any] = {}
        self.last_error = ""
        self._reader: asyncio.StreamReader | None = None
        self._conn_codec: P.ClientCodec | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._up = False
        self._closed = False

    @property
    def available(self) -> bool:
        return self._up

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_unix_connection(self.address), self.timeout)

    def _codec(self) -> P.ClientCodec:
        return P.ClientCodec(peer=f"wsd at {self.address}")

    async def _connect(self) -> None:
        if self._writer is not None:
            return
        if self.backoff.wait_left() > 0:  # still backing off: fail fast with the last reason
            raise Unavailable(f"cannot reach wsd at {self.address}: {self.last_error}")
        try:
            self._reader, self._writer = await self._open()
            self._conn_codec = self._codec()
            rid, data = self._conn_codec.hello_request()
            self._writer.write(data)
            await self._writer.drain()
            await self._wait(self._reader, self._conn_codec, rid)
            self.hello = self._conn_codec.hello or {}
        except (TimeoutError, OSError, Unavailable, P.ControlFailure) as exc:
            self._failed(exc)
        except BaseException:
            self._drop()  # cancelled half-way through the greeting: start clean next time
            raise
        self.backoff.succeeded()
        self._up = True

    def _failed(self, exc: BaseException) -> NoReturn:
        self._drop()
        self.backoff.failed()
        self.last_error = _reason(exc)
        raise Unavailable(f"cannot reach wsd at {self.address}: {self.last_error}") from None

    def _drop(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._reader = self._writer = None
        self._conn_codec = None
        self._up = False

    async def _wait(self, reader: asyncio.StreamReader, codec: P.ClientCodec, rid: int) -> Any:
        """The result of request ``rid``, read within the timeout; the daemon's error raised."""
        async with asyncio.timeout(self.timeout):
            while True:
                ev = codec.next_event()
                if ev is P.NEED_DATA:
                    codec.receive_data(await reader.read(1 << 16))
                elif ev is P.CLOSED:
                    raise Unavailable("the daemon closed the control connection")
                elif isinstance(ev, P.Reply) and (ev.id == rid or ev.id is None):
                    return ev.unwrap()  # (an error with no id is about the connection: refused, bad request)

    async def _request(self, method: str, params: dict[str, Any]) -> Any:
        assert self._reader is not None and self._writer is not None and self._conn_codec is not None
        codec = self._conn_codec
        rid, data = codec.request(method, params)
        try:
            self._writer.write(data)
            await self._writer.drain()
            return await self._wait(self._reader, codec, rid)
        except asyncio.CancelledError:
            # A reply to a request whose caller was cancelled (an exclusive worker replaced it) may
            # still come: the codec drops it rather than hand it to the next caller.
            codec.forget(rid)
            raise

    async def call(self, method: str, **params: Any) -> Any:
        """One request on the persistent connection; ``Unavailable`` if the daemon cannot be reached."""
        if self._closed:
            raise Unavailable("closed")
        async with self._lock:
            await self._connect()
            try:
                return await self._request(method, {**params, **self.scope})
            except RequestFailed:
                raise
            except (TimeoutError, OSError, Unavailable, P.ControlFailure) as exc:
                self._failed(exc)
            except asyncio.CancelledError:
                # A request cut off half-written would leave the stream unusable: start a fresh connection.
                if self._writer is not None and self._writer.transport.get_write_buffer_size():
                    self._drop()
                raise

    async def events(self, backlog: int = 50) -> AsyncIterator[dict[str, Any]]:
        """Events forever, across daemon restarts (reconnecting with backoff); each is yielded once."""
        stream_backoff = Backoff(self.backoff.first, self.backoff.cap)
        last: dict[str, tuple[float, int]] = {}  # per node: a cluster's nodes each number their own events
        while not self._closed:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await self._open()
                codec = self._codec()
                data = codec.hello_request()[1]
                rid, sub = codec.request("events.subscribe", {"backlog": backlog, **self.scope})
                writer.write(data + sub)
                await writer.drain()
                await self._wait(reader, codec, rid)
                stream_backoff.succeeded()
                while True:
                    ev = codec.next_event()
                    if ev is P.NEED_DATA:
                        codec.receive_data(await reader.read(1 << 16))
                        continue
                    if ev is P.CLOSED:
                        break
                    if not isinstance(ev, P.Event):
                        continue
                    key = (float(ev.data.get("ts", 0.0)), int(ev.data.get("seq", 0)))
                    node = str(ev.data.get("node", ""))
                    if key <= last.get(node, (0.0, 0)):
                        continue  # already shown before a reconnect replayed the backlog
                    last[node] = key
                    yield ev.data
            except (TimeoutError, OSError, Unavailable, ValueError, P.ControlFailure):
                pass
            finally:
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()
            stream_backoff.failed()
            await asyncio.sleep(stream_backoff.delay)

    async def close(self) -> None:
        self._closed = True
        self._drop()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, P.ControlFailure):
        return exc.message
    return str(exc) or type(exc).__name__


class RecordedSource:
    """Answers from a committed JSON recording (see ``record``), so the dashboard runs with no daemon.

    ``connections.list`` filters, sorts and pages the recorded rows the way the daemon does, so the
    table behaves; actions (kick, publish, ...) are answered with canned results and kept in ``calls``.
    """

    ACTIONS = ("kick", "publish", "broadcast", "send", "rules.set_enabled")

    def __init__(self, path: str | Path, address: str = "recording") -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = json.loads(self.path.read_text())
        self.address = address
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.up = True

    @property
    def available(self) -> bool:
        return self.up

    async def call(self, method: str, **params: Any) -> Any:
        self.calls.append((method, params))
        if not self.up:
            raise Unavailable(f"cannot reach wsd at {self.address}: recording switched off")
        results: dict[str, Any] = self.data["results"]
        if method == "connections.list":
            recorded = results["connections.list"]
            # a cluster's recording says which nodes answered (and which did not): the node column shows
            return dict(_page(recorded["items"], params),
                        **{k: recorded[k] for k in ("node", "nodes", "missing") if k in recorded})
        if method == "connections.get":
            cid = str(params.get("id", ""))
            conns: dict[str, Any] = self.data.get("connections", {})
            hit = conns.get(cid) or next((v for k, v in conns.items() if cid and k.startswith(cid)), None)
            if hit is None:
                raise RequestFailed(P.E_NOT_FOUND, f"no connection {cid!r}")
            return copy.deepcopy(hit)
        if method == "rules.set_enabled":
            for r in results.get("rules.list", {}).get("rules", []):
                if r["id"] == params.get("id"):
                    r["enabled"] = bool(params.get("enabled"))
                    return copy.deepcopy(r)
            raise RequestFailed(P.E_NOT_FOUND, f"no rule {params.get('id')!r}")
        if method == "kick":
            ids = list(params.get("ids") or [])
            return {"closed": len(ids), "ids": ids}
        if method in ("publish", "broadcast"):
            return {"delivered": 0, "queued": 0}
        if method not in results:
            raise RequestFailed(P.E_UNKNOWN_METHOD, f"{method!r} is not in the recording")
        return copy.deepcopy(results[method])

    async def events(self, backlog: int = 50) -> AsyncIterator[dict[str, Any]]:
        for ev in self.data.get("events", [])[-backlog:] if backlog else []:
            yield ev
        await asyncio.Event().wait()  # a recording has no live events: stay subscribed, quietly

    async def close(self) -> None:
        self.up = False


def _page(items: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """What the daemon's connections.list does to its rows: filter, sort, then offset/limit."""
    q = str(params.get("filter") or "").lower()
    fields = ("id", "pool", "user_id", "company_id", "state", "remote_address")
    rows = [r for r in items if not q or q in " ".join(str(r.get(k, "")) for k in fields).lower()]
    for k in ("pool", "state"):
        if params.get(k):
            rows = [r for r in rows if r.get(k) == params[k]]
    sort = str(params.get("sort") or P.DEFAULT_SORT)
    key = sort.lstrip("-")
    rows.sort(key=lambda r: (r.get(key) is None, _scalar(r.get(key))), reverse=sort.startswith("-"))
    offset, limit = int(params.get("offset") or 0), int(params.get("limit") or 100)
    page = copy.deepcopy(rows[offset:offset + limit])
    return {"total": len(rows), "offset": offset, "limit": limit, "items": page}


def _scalar(v: Any) -> Any:
    """What a row is sorted on: the queue's depth, the breaker's state."""
    if isinstance(v, dict):
        return v.get("depth", v.get("state"))
    return v


RECORD_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("hello", {}), ("status", {"samples": 120}), ("pools.list", {}),
    ("connections.list", {"limit": 1000, "sort": "id"}), ("channels.list", {}), ("rules.list", {}),
)


async def record(source: DataSource, path: str | Path, *, connections: int = 5, events: int = 50
                 ) -> dict[str, Any]:
    """Capture a recording from a live source: the polled methods, a few connections whole, recent events."""
    results = {m: await source.call(m, **p) for m, p in RECORD_METHODS}
    conns = {}
    for row in results["connections.list"]["items"][:connections]:
        conns[row["id"]] = await source.call("connections.get", id=row["id"])
    evs = (await source.call("events.recent", limit=events))["events"]
    data = {"results": results, "connections": conns, "events": evs}
    await asyncio.to_thread(Path(path).write_text, json.dumps(data, indent=1) + "\n")
    return data
