"""Where the dashboard gets its data: a live control-socket client, or a committed recording.

Both sources have the same small interface (``DataSource``): ``call(method, **params)`` for one
request, ``events(backlog)`` for the live event stream, ``close()``, plus ``address`` and
``available`` for the unreachable banner. The app never knows which one it holds, so tests and
demos run from a recording with no daemon at all.

``LiveSource`` speaks the control protocol (newline-delimited JSON over the Unix socket) on one
persistent connection for requests and a second one for ``events.subscribe``. When the daemon goes
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


class RequestFailed(Exception):
    """The daemon answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
                 backoff_cap: float = 2.0) -> None:
        self.address = socket_path
        self.timeout = timeout
        self.backoff = Backoff(backoff_first, backoff_cap)
        self.hello: dict[str, Any] = {}
        self.last_error = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self._up = False
        self._closed = False

    @property
    def available(self) -> bool:
        return self._up

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_unix_connection(self.address, limit=64 * P.MAX_REQUEST_BYTES), self.timeout)

    async def _connect(self) -> None:
        if self._writer is not None:
            return
        if self.backoff.wait_left() > 0:  # still backing off: fail fast with the last reason
            raise Unavailable(f"cannot reach wsd at {self.address}: {self.last_error}")
        try:
            self._reader, self._writer = await self._open()
            self.hello = await self._request("hello", {})
        except (TimeoutError, OSError, Unavailable, ValueError, RequestFailed) as exc:
            self._failed(exc)
        except BaseException:
            self._drop()  # cancelled half-way through the greeting: start clean next time
            raise
        if self.hello.get("protocol") != P.PROTOCOL_VERSION:
            self._failed(ValueError(f"it speaks control protocol {self.hello.get('protocol')}, "
                                    f"this wsctl speaks {P.PROTOCOL_VERSION}"))
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
        self._up = False

    async def _request(self, method: str, params: dict[str, Any]) -> Any:
        assert self._reader is not None and self._writer is not None
        self._next_id += 1
        rid = self._next_id
        self._writer.write(json.dumps({"id": rid, "method": method, "params": params}).encode() + b"\n")
        await self._writer.drain()
        async with asyncio.timeout(self.timeout):
            while True:
                line = await self._reader.readline()
                if not line:
                    raise Unavailable("the daemon closed the control connection")
                reply = json.loads(line)
                # A reply to an earlier request whose caller was cancelled (an exclusive worker
                # replaced it) is still in the stream: skip it rather than hand it to this caller.
                if reply.get("id") != rid and not (reply.get("id") is None and "error" in reply):
                    continue  # (an error with no id is about the connection itself: refused, bad request)
                if "error" in reply:
                    err = reply["error"] or {}
                    raise RequestFailed(str(err.get("code", "failed")), str(err.get("message", "")))
                return reply.get("result")

    async def call(self, method: str, **params: Any) -> Any:
        """One request on the persistent connection; ``Unavailable`` if the daemon cannot be reached."""
        if self._closed:
            raise Unavailable("closed")
        async with self._lock:
            await self._connect()
            try:
                return await self._request(method, params)
            except RequestFailed:
                raise
            except (TimeoutError, OSError, Unavailable, ValueError) as exc:
                self._failed(exc)
            except asyncio.CancelledError:
                # The reply may still arrive; ids keep it from reaching the next caller. A request cut
                # off half-written would leave the stream unusable, so start a fresh connection.
                if self._writer is not None and self._writer.transport.get_write_buffer_size():
                    self._drop()
                raise

    async def events(self, backlog: int = 50) -> AsyncIterator[dict[str, Any]]:
        """Events forever, across daemon restarts (reconnecting with backoff); each is yielded once."""
        stream_backoff = Backoff(self.backoff.first, self.backoff.cap)
        last: tuple[float, int] = (0.0, 0)
        while not self._closed:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await self._open()
                req = {"id": 1, "method": "events.subscribe", "params": {"backlog": backlog}}
                writer.write(json.dumps(req).encode() + b"\n")
                await writer.drain()
                first = json.loads(await asyncio.wait_for(reader.readline(), self.timeout) or b"null")
                if not isinstance(first, dict) or "error" in first:
                    raise Unavailable(f"events.subscribe refused: {first!r}")
                stream_backoff.succeeded()
                while True:
                    line = await reader.readline()
                    if not line:
                        break
                    ev = json.loads(line).get("event")
                    if not isinstance(ev, dict):
                        continue
                    key = (float(ev.get("ts", 0.0)), int(ev.get("seq", 0)))
                    if key <= last:
                        continue  # already shown before a reconnect replayed the backlog
                    last = key
                    yield ev
            except (TimeoutError, OSError, Unavailable, ValueError):
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
            return _page(results["connections.list"]["items"], params)
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
    sort = str(params.get("sort") or "age_s")
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
