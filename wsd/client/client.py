"""The asyncio client: connection, reconnect/resume, per-channel positions, dedupe, gap detection, acks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from wsd.client.decrypt import prepare_keys
from wsd.client.policy import Backoff, close_action
from wsd.client.types import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    Gap,
    History,
    Kicked,
    Message,
    NotAdmitted,
    Position,
    RequestError,
    TakenOver,
    message_from,
    position_from,
)

State = Literal["connecting", "open", "closed"]
TokenSource = str | Callable[[], str | Awaitable[str]]
Item = Message | Gap

MODES = ("realtime", "batch", "historical")
_EPOCHS_KEPT = 8  # epochs remembered per channel for dedupe
_END = object()
log = logging.getLogger("wsd.client")
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
#: The longest ``since`` query parameter the server takes (docs/protocol.md, "Session resume").
SINCE_MAX_CHARS = 6144


def token_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the server verifies); None if absent."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


class Subscription:
    """One channel subscription: ``async for item in sub`` yields Message and Gap items, in order."""

    def __init__(self, client: Client, channel: str, history: dict[str, Any] | None, mode: str | None,
                 types: list[str] | None) -> None:
        self._client = client
        self.requested = channel
        self.channel = ""  # the full instance name, from the server's reply
        self.mode = mode
        self.types = types
        self.history_spec = history
        self.processed: Position | None = None  # the last message the application took
        self.baseline: Position | None = None  # the channel's position when subscribed without history
        self.result: dict[str, Any] = {}
        self.duplicates_dropped = 0
        self.gaps = 0
        # receive side (the client's processing task only)
        self._seen: dict[str, int] = {}  # epoch -> highest offset received
        self._last: Position | None = None  # the last position handed to the queue
        self._reset = False  # a hole was already reported: the next message starts afresh
        self._pending_gap: tuple[str, Position | None] | None = None
        self._filled_on_resume = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._end: BaseException | None = None
        self._ended = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        entry = await self._queue.get()
        if entry is _END:
            self._queue.put_nowait(_END)  # every later call ends too
            if self._end is not None:
                raise self._end
            raise StopAsyncIteration
        item, session = entry
        if isinstance(item, Message):
            self.processed = item.position
            if item.seq is not None:
                await self._client._ack(item.seq, session)
        return item

    def pending(self) -> int:
        """Items received and not yet taken by the application."""
        return self._queue.qsize()

    async def unsubscribe(self) -> None:
        """Stop this subscription; its iterator ends after what was already received."""
        await self._client._unsubscribe(self)

    def _finish(self, exc: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._end = exc
            self._queue.put_nowait(_END)


class _Conn:
    """One open connection: its socket, session and in-flight requests."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self.pending: dict[int, tuple[asyncio.Future[dict[str, Any]], Any]] = {}
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.lost = False


class Client:
    """A wsd client over one or more URLs of the same pool (see docs/client.md)."""

    def __init__(self, urls: str | Sequence[str], token: TokenSource, *, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, random: Callable[[], float] = _random.random,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, refresh_before: float | None = 30.0,
                 open_timeout: float = 10.0, request_timeout: float = 10.0, connect_timeout: float | None = None,
                 fill_gaps: bool = True, max_size: int | None = 16 * 2**20,
                 ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0,
                 on_state: Callable[[State], Any] | None = None,
                 on_other: Callable[[Message], Any] | None = None,
                 keys: Mapping[str, bytes | str] | None = None) -> None:
        self.urls: list[str] = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("Client needs at least one URL")
        self._token_source = token
        # Message encryption: key id -> key (32 bytes, or a key file's base64 text); checked here.
        self._keys = prepare_keys(keys)
        self.backoff = Backoff(backoff_base, backoff_cap, random)
        self._sleep = sleep
        self.refresh_before = refresh_before
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.fill_gaps = fill_gaps
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.on_state = on_state
        self.on_other = on_other
        self.history_fills = 0  # `history since` requests made to fill holes
        self.others_dropped = 0  # messages outside any subscription, with no on_other to take them
        self.state: State = "closed"
        self.session_id: str | None = None
        self.url: str | None = None
        self.error: BaseException | None = None  # why the client stopped, if not closed by the application
        self.welcome: dict[str, Any] = {}
        self.connections = 0  # welcomes received
        self.duplicates_dropped = 0
        self.gaps = 0
        self._token: str | None = token if isinstance(token, str) else None
        self._token_exp: float | None = token_exp(token) if isinstance(token, str) else None
        self._subs: list[Subscription] = []
        self._channels: dict[str, Subscription] = {}
        self._conn: _Conn | None = None
        self._open = asyncio.Event()
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._ids = itertools.count(1)
        self._attempt = 0
        self._sent_since: set[str] = set()  # channels whose position the last resume attempt told the server

    @property
    def positions(self) -> dict[str, Position]:
        """Per subscribed channel, the position of the last message the application took."""
        return {sub.channel: sub.processed for sub in self._subs if sub.processed is not None}

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (trying the URLs in turn, with backoff) and return once the first welcome arrived."""
        if self._task is not None:
            raise ClientError("client already started")
        self._task = asyncio.create_task(self._run(), name="wsd-client")
        opened = asyncio.ensure_future(self._open.wait())
        try:
            await asyncio.wait({opened, self._task}, timeout=self.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
        if self._open.is_set():
            return
        if self._task.done():
            raise self.error or ClientClosed("the client stopped before connecting")
        await self.close()
        raise TimeoutError(f"not connected within {self.connect_timeout}s")

    async def close(self) -> None:
        """Close with 1000 (the session ends); subscriptions' iterators end after what they hold."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._finish(None)

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            if self.on_state is not None:
                try:
                    self.on_state(state)
                except Exception:  # the application's callback must not stop the client
                    log.exception("wsd.client on_state callback failed")

    def _finish(self, exc: BaseException | None) -> None:
        if self.error is None:
            self.error = exc
        self._open.clear()
        self._set_state("closed")
        for sub in self._subs:
            sub._finish(exc)
        self._stopped.set()

    # ----------------------------------------------------------------- tokens

    async def _fetch_token(self) -> str:
        src = self._token_source
        if isinstance(src, str):
            return src
        got = src()
        if inspect.isawaitable(got):
            got = await got
        if not isinstance(got, str) or not got:
            raise ClientError("the token callable did not return a token string")
        return got

    async def _token_for(self, fresh: bool) -> str:
        if isinstance(self._token_source, str):
            if fresh:
                raise ClientClosed("the token expired and no token callable was given", 4001)
            return self._token_source
        stale = self._token_exp is not None and self._token_exp <= time.time() + 1
        if fresh or self._token is None or stale:
            self._token = await self._fetch_token()
            self._token_exp = token_exp(self._token)
        return self._token

    # ----------------------------------------------------------------- the reconnect loop

    def _target(self, url: str) -> str:
        if self.session_id is None:
            return url
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("session", "since")]
        query.append(("session", self.session_id))
        since = self._resume_positions()
        self._sent_since = set(since)
        if since:
            # What this client really has, per channel: the server replays from here, not from what it wrote.
            blob = _encode({ch: [p.offset, p.epoch] for ch, p in since.items()})
            text = base64.urlsafe_b64encode(blob).rstrip(b"=").decode()
            if len(text) <= SINCE_MAX_CHARS:
                query.append(("since", text))
            else:  # too long for a request line: the server replays from what it wrote, the fill does the rest
                self._sent_since = set()
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _resume_positions(self) -> dict[str, Position]:
        """Per live subscription, the last message received (handed to the application's queue, so kept)."""
        return {sub.channel: sub._last for sub in self._subs
                if sub.channel and sub._last is not None and sub._last.epoch and sub.mode != "historical"}

    async def _run(self) -> None:
        idx, penalty, fresh = 0, 0, False
        try:
            while True:
                url = self.urls[idx]
                self._set_state("connecting")
                advance, at_least = False, 0.0
                try:
                    token = await self._token_for(fresh)
                    fresh = False
                    ws = await connect(self._target(url), additional_headers={"Authorization": f"Bearer {token}"},
                                       open_timeout=self.open_timeout, close_timeout=2, max_size=self.max_size,
                                       ping_interval=self.ping_interval, ping_timeout=self.ping_timeout)
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    error = _refusal_code(exc.response.body)
                    if status == 401 and not isinstance(self._token_source, str):
                        fresh = True  # token_expired / invalid_token: ask the callable for a new one
                    elif status in (401, 403, 404):
                        raise NotAdmitted(f"handshake refused by {url}: {status} {error}", None, error) from None
                    else:
                        advance = True
                        at_least = _retry_after(exc.response.headers.get("Retry-After"))
                except (OSError, TimeoutError, InvalidHandshake, InvalidURI):
                    advance = True
                else:
                    code, reason = await self._serve(ws, url)
                    action = close_action(code)
                    if not action.reconnect:
                        stop = {"kicked": Kicked, "not_admitted": NotAdmitted, "taken_over": TakenOver}
                        kind = stop.get(action.error, ClientClosed)
                        raise kind(f"closed by the server with {code} ({action.why}): {reason}", code, reason)
                    self._set_state("connecting")
                    fresh = action.fresh_token
                    advance = action.failover
                    penalty = penalty + 1 if action.penalty else 0
                if advance:
                    idx = (idx + 1) % len(self.urls)
                delay = max(self.backoff.delay(self._attempt + penalty), at_least)
                self._attempt += 1
                await self._sleep(delay)
        except ClientClosed as exc:
            self._finish(exc)
        except asyncio.CancelledError:
            self._finish(None)
            raise
        except Exception as exc:  # noqa: BLE001  # a bug or an unusable token callable: stop and say why
            err = ClientError(f"client stopped: {exc!r}")
            err.__cause__ = exc
            self._finish(err)

    async def _serve(self, ws: ClientConnection, url: str) -> tuple[int | None, str]:
        """Run one connection until it closes: (close code, reason)."""
        conn: _Conn | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            try:
                hello = _decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
            except (ConnectionClosed, TimeoutError):
                return ws.close_code, ws.close_reason or ""
            if not isinstance(hello, dict) or hello.get("type") != "welcome":
                await ws.close(1002, "expected a welcome frame")
                return 1006, "no welcome frame"
            self.welcome = hello
            self.session_id = str(hello["session_id"])
            self.url = url
            self.connections += 1
            self._attempt = 0
            if isinstance(hello.get("exp"), int | float):
                self._token_exp = float(hello["exp"])
            conn = _Conn(ws, self.session_id)
            self._conn = conn
            tasks.append(asyncio.create_task(self._process(conn, hello), name="wsd-client-process"))
            if not isinstance(self._token_source, str) and self.refresh_before is not None:
                tasks.append(asyncio.create_task(self._refresh_loop(conn), name="wsd-client-refresh"))
            self._set_state("open")
            self._open.set()
            try:
                async for raw in ws:
                    self._dispatch(conn, raw)
            except ConnectionClosed:
                pass
            return ws.close_code, ws.close_reason or ""
        finally:
            self._open.clear()
            if conn is not None:
                conn.lost = True
                if self._conn is conn:
                    self._conn = None
                for fut, _ in conn.pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionLost("the connection closed before the reply"))
                conn.pending.clear()
                conn.frames.put_nowait(None)
            await ws.close()
            if self._closing or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                for t in tasks:
                    t.cancel()
            for t in tasks:
                if t.get_name() == "wsd-client-refresh":
                    t.cancel()
            for t in tasks:  # the processing task first finishes the frames already received
                with contextlib.suppress(asyncio.CancelledError, ConnectionLost):
                    await t

    def _dispatch(self, conn: _Conn, raw: str | bytes) -> None:
        try:
            frame = _decode(raw)
        except msgspec.DecodeError:
            return
        if not isinstance(frame, dict):
            return
        if "ok" in frame and "type" not in frame:
            entry = conn.pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if entry is not None:
                fut, event = entry
                if event is not None:  # handled in order with the frames that follow the reply
                    conn.frames.put_nowait(("reply", event, frame))
                if not fut.done():
                    fut.set_result(frame)
            return
        conn.frames.put_nowait(("frame", None, frame))

    # ----------------------------------------------------------------- requests

    async def _request(self, conn: _Conn, frame: dict[str, Any], event: Any = None) -> dict[str, Any]:
        """Send a request on ``conn`` and return its result; RequestError for an error reply."""
        if conn.lost:
            raise ConnectionLost("the connection closed")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        conn.pending[rid] = (fut, event)
        try:
            await conn.ws.send(_encode({**frame, "id": rid}).decode())
        except ConnectionClosed:
            conn.pending.pop(rid, None)
            raise ConnectionLost("the connection closed before the request was sent") from None
        try:
            reply = await asyncio.wait_for(fut, self.request_timeout)
        except TimeoutError:
            conn.pending.pop(rid, None)
            raise ClientError(f"no reply to {frame.get('op')} within {self.request_timeout}s") from None
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RequestError(str(err.get("code", "unknown")), str(err.get("message", "")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def _current(self) -> _Conn:
        """The open connection, waiting for one (up to request_timeout) while reconnecting."""
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        while True:
            if self._stopped.is_set() or self._task is None:
                raise self.error or ClientClosed("the client is closed")
            conn = self._conn
            if conn is not None and not conn.lost and self._open.is_set():
                return conn
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise ClientError(f"not connected within {self.request_timeout}s")
            waiter = asyncio.ensure_future(self._open.wait())
            stopped = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait({waiter, stopped}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopped.cancel()

    async def _idempotent(self, frame: dict[str, Any], event: Any = None) -> dict[str, Any]:
        """A request that is safe to send again on the next connection if this one is lost."""
        while True:
            conn = await self._current()
            try:
                return await self._request(conn, frame, event)
            except ConnectionLost:
                continue

    async def _ack(self, seq: int, session: str) -> None:
        conn = self._conn
        if conn is None or conn.lost or conn.session != session:
            return  # a new session: the server no longer waits for this seq
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(_encode({"op": "ack", "seq": seq}).decode())

    # ----------------------------------------------------------------- the public operations

    async def subscribe(self, channel: str, *, history: int | dict[str, Any] | None = None,
                        since: Position | dict[str, Any] | None = None, mode: str | None = None,
                        types: Iterable[str] | None = None) -> Subscription:
        """Subscribe to a channel group (or a full instance name); see docs/client.md for the options."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (on_demand needs pull, which this client "
                             f"does not offer), not {mode!r}")
        spec: dict[str, Any] | None
        if isinstance(history, int) and not isinstance(history, bool):
            spec = {"limit": history}
        elif isinstance(history, dict):
            spec = dict(history)
        elif history is None:
            spec = None
        else:
            raise TypeError("history must be a number of messages or a dict like {'limit': N} / {'since': ...}")
        if since is not None:
            spec = dict(spec or {})
            spec["since"] = since.wire() if isinstance(since, Position) else dict(since)
        sub = Subscription(self, channel, spec, mode, list(types) if types is not None else None)
        if spec is not None and "since" in spec:
            sub._last = position_from(spec["since"])
        res = await self._idempotent(self._subscribe_frame(sub, spec), ("subscribed", sub, spec))
        self._register(sub, res)  # also done in order by the processing task; whichever runs first
        return sub

    def _register(self, sub: Subscription, res: dict[str, Any]) -> None:
        if sub._ended:
            return
        sub.result = res
        sub.channel = str(res.get("channel") or sub.requested)
        old = self._channels.get(sub.channel)
        if old is not None and old is not sub:
            self._drop(old, None)  # subscribing again replaces the subscription (as on the server)
        self._channels[sub.channel] = sub
        if sub not in self._subs:
            self._subs.append(sub)

    def _subscribe_frame(self, sub: Subscription, history: dict[str, Any] | None) -> dict[str, Any]:
        frame: dict[str, Any] = {"op": "subscribe", "channel": sub.channel or sub.requested}
        if sub.mode is not None:
            frame["mode"] = sub.mode
        if history is not None:
            frame["history"] = history
        if sub.types is not None:
            frame["filter"] = {"types": sub.types}
        return frame

    async def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if self._channels.get(sub.channel) is sub:
            del self._channels[sub.channel]
        sub._finish(None)
        with contextlib.suppress(RequestError):
            await self._idempotent({"op": "unsubscribe", "channel": sub.channel or sub.requested})

    async def publish(self, channel: str, data: Any, *, type: str | None = None, priority: str | int | None = None,
                      ttl: float | None = None) -> dict[str, Any]:
        """Publish; the server's result (id, channel, offset, epoch, delivered). Not retried on a lost
        connection (ConnectionLost): it may or may not have been published."""
        frame: dict[str, Any] = {"op": "publish", "channel": channel, "data": data}
        if type is not None:
            frame["type"] = type
        if priority is not None:
            frame["priority"] = priority
        if ttl is not None:
            frame["ttl"] = ttl
        return await self._request(await self._current(), frame)

    async def history(self, channel: str, *, limit: int | None = None,
                      since: Position | dict[str, Any] | None = None) -> History:
        """One page of a channel's history (oldest first); ``more``/``next`` say if there is another."""
        frame: dict[str, Any] = {"op": "history", "channel": channel}
        if limit is not None:
            frame["limit"] = limit
        if since is not None:
            frame["since"] = since.wire() if isinstance(since, Position) else dict(since)
        return _history(await self._idempotent(frame), self._keys)

    async def ping(self) -> float:
        """An application-level ping: the server's wall clock."""
        return float((await self._idempotent({"op": "ping"})).get("pong", 0.0))

    # ----------------------------------------------------------------- token refresh

    async def _refresh_loop(self, conn: _Conn) -> None:
        assert self.refresh_before is not None
        while not conn.lost:
            exp = self._token_exp
            if exp is None:
                return
            now = time.time()
            lead = min(self.refresh_before, max(0.0, exp - now) / 2)
            await asyncio.sleep(max(0.0, exp - lead - now))
            try:
                token = await self._fetch_token()
            except Exception:  # noqa: BLE001  # at exp the server closes with 4001; the reconnect asks again
                return
            new_exp = token_exp(token)
            if new_exp is None or new_exp <= exp:
                return  # nothing better to offer: at exp the server closes with 4001 and we reconnect fresh
            try:
                result = await self._request(conn, {"op": "refresh", "token": token})
            except RequestError:
                return  # 4003 or 4001 follows; the reconnect loop handles it
            self._token = token
            exp_reply = result.get("exp")
            self._token_exp = float(exp_reply) if isinstance(exp_reply, int | float) else new_exp

    # ----------------------------------------------------------------- processing (one task per connection)

    async def _process(self, conn: _Conn, hello: dict[str, Any]) -> None:
        try:
            await self._after_welcome(conn, hello)
            while True:
                if conn.frames.empty():
                    self._flush_pending_gaps(conn)
                entry = await conn.frames.get()
                if entry is None:
                    return
                kind, event, frame = entry
                if kind == "reply":
                    self._on_subscribed(conn, event, frame)
                    continue
                t = frame.get("type")
                if t == "message":
                    await self._on_message(conn, frame)
                elif t == "batch":
                    for m in frame.get("messages") or ():
                        if isinstance(m, dict) and m.get("type") == "message":
                            await self._on_message(conn, m)
                elif t == "recovery":
                    self._on_recovery(frame)
                elif t == "unsubscribed":
                    self._on_unsubscribed(frame)
        except ConnectionLost:
            return  # what was left is fetched again after the reconnect

    async def _after_welcome(self, conn: _Conn, hello: dict[str, Any]) -> None:
        restored = set(hello.get("subscriptions") or ()) if hello.get("resumed") else set()
        for sub in list(self._subs):
            sub._filled_on_resume = False
            if sub.channel in restored:
                # An older server replays from what it wrote; what it wrote into the dying socket is fetched here.
                # Not needed when the server was told the position: its replay starts there.
                if self.fill_gaps and sub._last is not None and sub.mode != "historical" \
                        and sub.channel not in self._sent_since:
                    await self._fill(conn, sub, sub._last, None)
                    sub._filled_on_resume = True
                continue
            if sub.mode == "historical":
                continue  # nothing live to resume
            # What was received is in the subscription's queue or was taken: ask for what came after it.
            pos = sub._last or sub.processed or sub.baseline
            spec = {"since": pos.wire()} if pos is not None else sub.history_spec
            try:
                await self._request(conn, self._subscribe_frame(sub, spec), ("subscribed", sub, spec))
            except RequestError as exc:  # e.g. the new token no longer allows it
                self._drop(sub, exc)

    def _on_subscribed(self, conn: _Conn, event: Any, frame: dict[str, Any]) -> None:
        _, sub, spec = event
        if not frame.get("ok") or sub._ended:
            return
        res = frame.get("result") or {}
        self._register(sub, res)
        pos = position_from(res.get("position"))
        since = position_from((spec or {}).get("since"))
        if since is not None and res.get("recovered") is False and since.offset > 0:
            reason = f"subscribe since offset {since.offset} of epoch {since.epoch}: recovered:false"
            self._hole(conn, sub, reason, since, pending=bool(res.get("history")))
        elif spec is None and sub._last is None and sub.mode != "historical":
            sub._last = sub.baseline = pos  # live only: continuity is checked from here

    def _on_recovery(self, frame: dict[str, Any]) -> None:
        sub = self._channels.get(str(frame.get("channel")))
        live = "since" in frame  # pushed on a live subscription: the server's bus between nodes missed messages
        if sub is None or (sub._filled_on_resume and not live) or frame.get("recovered") is not False:
            return
        if sub._last is None or sub._last.offset == 0:
            return  # nothing was received yet: nothing can be missing before what is replayed
        sub._pending_gap = ("the server missed messages between its nodes that its history no longer holds "
                            "(recovered:false)" if live else
                            "resume could not replay every missed message (recovered:false)", sub._last)
        sub._reset = True  # the hole is reported: the next message is not checked against the position before it

    def _on_unsubscribed(self, frame: dict[str, Any]) -> None:
        sub = self._channels.get(str(frame.get("channel")))
        if sub is not None:
            self._drop(sub, RequestError(str(frame.get("reason", "forbidden")), str(frame.get("message", ""))))

    def _drop(self, sub: Subscription, exc: BaseException | None) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if self._channels.get(sub.channel) is sub:
            del self._channels[sub.channel]
        sub._finish(exc)

    def _hole(self, conn: _Conn, sub: Subscription, reason: str, last: Position | None, pending: bool,
              resumed: Position | None = None) -> None:
        """Report a hole now, or when the next message shows where delivery resumed."""
        if pending:
            sub._pending_gap = (reason, last)
        else:
            self._emit_gap(conn, sub, Gap(sub.channel, last, resumed, reason))
        sub._reset = True

    def _emit_gap(self, conn: _Conn, sub: Subscription, gap: Gap) -> None:
        sub.gaps += 1
        self.gaps += 1
        sub._queue.put_nowait((gap, conn.session))

    def _flush_pending_gaps(self, conn: _Conn) -> None:
        for sub in self._subs:
            if sub._pending_gap is not None:
                reason, last = sub._pending_gap
                sub._pending_gap = None
                self._emit_gap(conn, sub, Gap(sub.channel, last, None, reason))

    def _is_duplicate(self, sub: Subscription, m: Message) -> bool:
        top = sub._seen.get(m.epoch)
        return top is not None and m.offset <= top

    def _deliver(self, conn: _Conn, sub: Subscription, m: Message) -> None:
        if sub._pending_gap is not None:
            reason, last = sub._pending_gap
            sub._pending_gap = None
            self._emit_gap(conn, sub, Gap(sub.channel, last, m.position, reason))
        seen = sub._seen
        if m.epoch not in seen and len(seen) >= _EPOCHS_KEPT:
            del seen[next(iter(seen))]
        seen[m.epoch] = max(seen.get(m.epoch, 0), m.offset)
        sub._last = m.position
        sub._reset = False
        sub._queue.put_nowait((m, conn.session))

    async def _on_message(self, conn: _Conn, frame: dict[str, Any]) -> None:
        m = message_from(frame, self._keys)
        sub = self._channels.get(m.channel) if m.channel else None
        if sub is None or sub._ended:
            # Not a channel this client subscribed to: `wsctl send`, a pool's default subscription, a rule's target.
            if self.on_other is None:
                self.others_dropped += 1
                return
            try:
                got = self.on_other(m)
                if inspect.isawaitable(got):
                    await got
            except Exception:
                log.exception("wsd.client on_other callback failed; the message is not acked")
                return
            if m.seq is not None:
                await self._ack(m.seq, conn.session)
            return
        if self._is_duplicate(sub, m):
            sub.duplicates_dropped += 1
            self.duplicates_dropped += 1
            done = sub.processed
            if m.seq is not None and done is not None and done.epoch == m.epoch and m.offset <= done.offset:
                await self._ack(m.seq, conn.session)  # already taken: the server resent it
            return
        last = sub._last
        if last is not None and last.offset == 0 and last.epoch != m.epoch:
            # A position taken before the channel's first message names the epoch new instances would start in,
            # which may have moved on: nothing of that epoch was missed; check the offsets of the new one.
            last = Position(0, m.epoch)
        if sub._pending_gap is None and not sub._reset and last is not None:
            if m.epoch != last.epoch:
                self._emit_gap(conn, sub, Gap(sub.channel, last, m.position,
                                              f"epoch changed from {last.epoch} to {m.epoch}: "
                                              f"the channel's history was lost"))
            elif m.offset > last.offset + 1 and sub.mode != "historical":
                if not self.fill_gaps:
                    self._emit_gap(conn, sub, Gap(sub.channel, last, m.position,
                                                  f"offsets {last.offset + 1} to {m.offset - 1} were not received "
                                                  f"(not checked: fill_gaps is off)"))
                else:
                    # Everything after `last` up to the channel's current position, this message included: under a
                    # burst (priorities overtaking, skipped offsets) one request covers what is still on its way.
                    await self._fill(conn, sub, last, None)
                    if self._is_duplicate(sub, m):
                        return  # delivered from history (or inside the Gap history reported)
        self._deliver(conn, sub, m)

    async def _fill(self, conn: _Conn, sub: Subscription, last: Position, upto: int | None) -> None:
        """Fetch what came after ``last`` (before offset ``upto`` of its epoch, or everything) with
        `history since`, deliver it, and report a Gap for whatever could not be recovered."""
        since, unrecovered, reason = last, False, ""
        while True:
            self.history_fills += 1
            try:
                res = await self._request(conn, {"op": "history", "channel": sub.channel, "since": since.wire()})
            except RequestError as exc:
                self._hole(conn, sub, f"history since offset {since.offset} failed: {exc}", sub._last, pending=True)
                return
            page = _history(res, self._keys)
            if not page.recovered and not unrecovered and last.offset > 0:  # from offset 0 nothing was had
                unrecovered = True
                reason = (f"history since offset {since.offset} of epoch {since.epoch}: recovered:false "
                          f"(no longer held)")
                self._hole(conn, sub, reason, sub._last, pending=True)
            stop = False
            for m in page.messages:
                if upto is not None and m.epoch == last.epoch and m.offset >= upto:
                    stop = True
                    break
                if sub.types is not None and m.type not in sub.types:
                    continue
                if self._is_duplicate(sub, m):
                    continue
                self._deliver(conn, sub, m)
            if stop or not page.more or page.next is None:
                return
            if page.next.epoch == since.epoch and page.next.offset <= since.offset:  # a server that never moves on
                self._hole(conn, sub, f"history since offset {since.offset}: the next page does not move on",
                           sub._last, pending=True)
                return
            since = page.next


def _history(res: dict[str, Any], keys: Mapping[str, Any]) -> History:
    msgs = [message_from(f, keys) for f in res.get("messages") or () if isinstance(f, dict)]
    return History(channel=str(res.get("channel", "")), messages=msgs, recovered=bool(res.get("recovered", True)),
                   position=position_from(res.get("position")) or Position(0, ""), more=bool(res.get("more", False)),
                   next=position_from(res.get("next")))


def _refusal_code(body: bytes | None) -> str:
    try:
        d = _decode(body or b"")
    except msgspec.DecodeError:
        return ""
    return str(d.get("error", "")) if isinstance(d, dict) else ""


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
