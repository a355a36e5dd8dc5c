"""The control protocol shared by the daemon and wsctl: the contract and its codec, with no I/O.

Request:  ``{"id": 1, "method": "connections.list", "params": {...}}``
Reply:    ``{"id": 1, "result": ...}`` or ``{"id": 1, "error": {"code": ..., "message": ...}}``
Stream:   ``events.subscribe`` replies once, then sends ``{"event": {...}}`` lines until the client closes.

Everything both sides must agree on lives here: the protocol version, the methods, the error codes, the
connection states, the sort keys of ``connections.list``, the priority names and the event kinds. So does
the codec: ``ClientCodec`` (used by wsctl and the dashboard) and ``ServerCodec`` (used by the daemon's
control server) turn bytes into requests, replies and events and back, in the style of h11: the caller
does the reading and writing, feeds what it read with ``receive_data`` and takes what is complete with
``next_event``. Nothing here touches a socket, a clock or the daemon, so it is tested alone.

This module is all wsctl imports from the daemon's package; it uses the standard library only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20
#: the longest reply line a client accepts: a bound against a runaway peer, far above any real reply
#: (every row of 100,000 connections is about 70 MiB)
MAX_REPLY_BYTES = 1 << 30

# error codes in control replies
E_PARSE = "parse_error"
E_BAD_REQUEST = "bad_request"
E_UNKNOWN_METHOD = "unknown_method"
E_NOT_FOUND = "not_found"
E_AMBIGUOUS = "ambiguous"  # an id prefix that matches more than one connection
E_FAILED = "failed"
E_FORBIDDEN = "forbidden"
# codes a client gives a failure the daemon did not send
E_PROTOCOL = "protocol"  # the daemon's bytes broke the protocol (not JSON, too long, a reply nobody asked for)
E_PROTOCOL_VERSION = "protocol_version"  # the daemon speaks another version of this protocol

# the values of a connection's `state` (connections.list filters on them)
CONNECTION_STATES = ("connecting", "connected", "disconnecting")

# message priorities by their wire names, most urgent first (the daemon's Priority enum, by number)
PRIORITIES = ("critical", "high", "normal", "low")

# connections.list `sort`: the word `wsctl connections --sort` takes -> the row field the daemon sorts on.
# Prefix either with "-" for descending.
SORT_KEYS: dict[str, str] = {
    "age": "age_s",
    "id": "id",
    "pool": "pool",
    "user": "user_id",
    "company": "company_id",
    "state": "state",
    "in": "msgs_in",
    "out": "msgs_out",
    "queue": "queue",
    "latency": "latency_ms",
    "drops": "drops",
    "bytes": "bytes_out",
    "address": "remote_address",
    "breaker": "breaker",
}
SORT_FIELDS = tuple(SORT_KEYS.values())
#: the fields that are numbers: a view sorting on one shows the largest first
NUMERIC_SORT_FIELDS = frozenset({"age_s", "msgs_in", "msgs_out", "queue", "latency_ms", "drops", "bytes_out"})
DEFAULT_SORT = "age_s"

# the kinds of event the daemon emits (events.recent / events.subscribe, `wsctl events --kind`)
EVENT_KINDS = (
    "started", "connect", "disconnect", "kick", "refused", "rate_limited", "slow_consumer",
    "heartbeat_timeout", "idle_timeout", "token_expired", "token_refreshed", "unhealthy", "recovery",
    "reload", "reload_failed", "rule_changed", "draining", "control_refused", "refresh_refused",
    "internal_error", "handshake_limit", "descriptors_exhausted",
    "worker_started", "worker_exited", "worker_scaled",
)

# method -> one-line help (the daemon's table of handlers must match these names exactly)
METHODS: dict[str, str] = {
    "hello": "protocol version, daemon version and manager id",
    "help": "the method list with one line each",
    "status": "manager summary: uptime, connections by pool and state, rates, latency, RSS, CPU",
    "pools.list": "every pool with counts, reservation, ceiling, rates, drops, error rate; the shared capacity",
    "connections.list": "connections, filtered (pool, user, company, state), sorted, paged (offset, limit)",
    "connections.get": "one connection whole: info, claims (no token), subscriptions, queue, breaker, metrics",
    "channels.list": "channel groups and instances with subscriber counts and history depth",
    "subscriptions.list": "subscriptions of one connection or one channel",
    "presence.get": "who is subscribed to a channel instance",
    "history.get": "the history buffer of a channel instance",
    "metrics.get": "daemon metrics: manager, pools, routing, subscriptions, queues",
    "metrics.prometheus": "the Prometheus exposition text",
    "publish": "publish into one channel instance",
    "broadcast": "send to every connection, optionally narrowed by pool, company",
    "send": "send to one connection",
    "kick": "close connections (ids, user, company or pool) with 4000 and a reason",
    "rules.list": "routing rules with hit counts",
    "rules.get": "one routing rule",
    "rules.set_enabled": "enable or disable a routing rule at run time",
    "rules.test": "match a message against the live rules without sending it: the walk, receivers per pool, data",
    "publish.trace": "publish into one channel instance and report what happened at each receiver",
    "token": "mint a JWT with the daemon's signing key",
    "reload": "re-read the config file; an invalid file is refused and the old config stays",
    "config.get": "the running config, secrets redacted",
    "events.recent": "the most recent events",
    "events.subscribe": "stream lifecycle and security events until the client closes",
}
STREAM_METHODS = frozenset({"events.subscribe"})


def default_socket_path() -> str:
    """``$RUNTIME_DIRECTORY/wsd.sock`` under a service manager that made one (systemd ``RuntimeDirectory=wsd``:
    ``/run/wsd/wsd.sock``), else ``$XDG_RUNTIME_DIR/wsd/wsd.sock``, else ``/tmp/wsd-$UID/wsd.sock``."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "wsd.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "wsd", "wsd.sock")
    return f"/tmp/wsd-{os.getuid()}/wsd.sock"


def one_of(names: Any) -> str:
    """``a, b or c``: how help texts and error messages list the allowed values."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# ------------------------------------------------------------------------------------------------ failures


class ControlFailure(Exception):
    """A control call that did not give a result: a ``code`` from the tables above and a one-line
    ``message``, with any further lines of the daemon's message in ``details``."""

    def __init__(self, code: str, message: str, details: list[str] | None = None) -> None:
        first, *rest = str(message).split("\n")
        super().__init__(first)
        self.code = code
        self.message = first
        self.details = [*rest, *(details or [])]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class RequestFailed(ControlFailure):
    """The daemon answered the request with an error reply."""


class ProtocolError(ControlFailure):
    """The daemon's bytes broke the protocol, or it speaks another version: the connection is unusable."""


class RequestTooLarge(RequestFailed):
    """A request the daemon would refuse for its size; nothing was sent."""


# ------------------------------------------------------------------------------------------------- framing


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


class _Closed:
    def __repr__(self) -> str:
        return "CLOSED"


#: ``next_event``: nothing complete yet, feed more bytes
NEED_DATA: Final = _NeedData()
#: ``next_event``: the peer closed the connection and every complete line was taken
CLOSED: Final = _Closed()


class LineBuffer:
    """Newline-delimited framing: bytes in, whole lines out (without the newline), bounded in length."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Append what was read; ``b""`` means the peer closed the connection."""
        if data:
            self._buf += data
        else:
            self.eof = True

    def next_line(self) -> bytes | None:
        """The next whole line, or None when there is none yet.

        Raises ``OverflowError`` when a line grows past ``max_line_bytes`` before its newline.
        """
        i = self._buf.find(b"\n", self._scanned)
        if i < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > self.max_line_bytes:
                raise OverflowError(f"a line longer than {self.max_line_bytes} bytes")
            return None
        if i > self.max_line_bytes:
            raise OverflowError(f"a line longer than {self.max_line_bytes} bytes")
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        self._scanned = 0
        return line

    @property
    def pending(self) -> int:
        """Bytes held that are not a whole line yet."""
        return len(self._buf)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class Reply:
    """The daemon's answer to request ``id`` (``None``: an answer about the connection itself, such as
    ``forbidden`` or an oversize request, which fails whatever the caller waits for)."""

    id: int | None
    result: Any = None
    error: RequestFailed | None = None

    def unwrap(self) -> Any:
        """The result, or raise the daemon's error."""
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(frozen=True)
class Event:
    """One line of an ``events.subscribe`` stream."""

    data: dict[str, Any] = field(default_factory=dict)


class ClientCodec:
    """The client side of one control connection, with no I/O.

    Send ``hello_request()`` first on every connection (it may be pipelined with the first request),
    then ``request(method, params)`` for each call; write the returned bytes. Feed everything read to
    ``receive_data`` (``b""`` when the daemon closed) and take ``next_event()`` until it says
    ``NEED_DATA``: a ``Reply`` (to an id this codec issued), an ``Event`` (stream lines) or ``CLOSED``.

    The codec checks the hello reply's protocol version before handing out anything after it, drops
    the reply to a request its caller gave up on (``forget``), and raises ``ProtocolError`` for a line
    that is not a JSON object, a line over ``max_line_bytes``, a reply to an id it never issued, a
    daemon of another protocol version, or a connection closed in the middle of a line.
    """

    def __init__(self, *, peer: str = "wsd", max_line_bytes: int = MAX_REPLY_BYTES) -> None:
        self.peer = peer  # how messages name the daemon: "wsd at /run/wsd/wsd.sock"
        self._lines = LineBuffer(max_line_bytes)
        self._next_id = 1
        self._pending: dict[int, str] = {}  # id -> method, in the order sent
        self._forgotten: set[int] = set()
        self._hello_id: int | None = None
        self.hello: dict[str, Any] | None = None  # the daemon's hello result once checked

    # -- out
    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """The id and the bytes of one request; ``params`` that are None are left out (take defaults)."""
        rid = self._next_id
        self._next_id += 1
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        data = _dumps({"id": rid, "method": method, "params": clean}) + b"\n"
        if len(data) > MAX_REQUEST_BYTES:
            raise RequestTooLarge("too_large", f"request larger than {MAX_REQUEST_BYTES} bytes (the daemon's limit)")
        self._pending[rid] = method
        return rid, data

    def hello_request(self) -> tuple[int, bytes]:
        """The ``hello`` request every connection starts with; its reply is checked by the codec."""
        self._hello_id, data = self.request("hello")
        return self._hello_id, data

    def forget(self, rid: int) -> None:
        """The caller stopped waiting for ``rid``: its reply, when it comes, is dropped."""
        if self._pending.pop(rid, None) is not None:
            self._forgotten.add(rid)

    @property
    def waiting(self) -> bool:
        """Requests were sent whose replies have not come yet."""
        return bool(self._pending)

    # -- in
    def receive_data(self, data: bytes) -> None:
        """What was read from the socket; ``b""`` when the daemon closed the connection."""
        self._lines.feed(data)

    def next_event(self) -> Reply | Event | _NeedData | _Closed:
        while True:
            try:
                line = self._lines.next_line()
            except OverflowError:
                raise ProtocolError(E_PROTOCOL, f"{self.peer} sent a line longer than "
                                                f"{self._lines.max_line_bytes} bytes") from None
            if line is None:
                if not self._lines.eof:
                    return NEED_DATA
                if self._lines.pending:
                    raise ProtocolError(E_PROTOCOL, f"{self.peer} closed the connection in the middle of a line")
                return CLOSED
            if not line.strip():
                continue
            out = self._message(line)
            if out is not None:
                return out

    def _message(self, line: bytes) -> Reply | Event | None:
        try:
            msg = json.loads(line)
        except ValueError:
            raise ProtocolError(E_PROTOCOL, f"{self.peer} sent a line that is not JSON") from None
        if not isinstance(msg, dict):
            raise ProtocolError(E_PROTOCOL, f"{self.peer} sent a line that is not a JSON object")
        if "event" in msg and "id" not in msg:
            ev = msg["event"]
            if not isinstance(ev, dict):
                raise ProtocolError(E_PROTOCOL, f"{self.peer} sent an event that is not an object")
            return Event(ev)
        rid = msg.get("id")
        error = _error(msg.get("error")) if "error" in msg else None
        if rid is None:
            if error is None:
                raise ProtocolError(E_PROTOCOL, f"{self.peer} sent a reply without an id")
            return Reply(None, error=error)
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ProtocolError(E_PROTOCOL, f"{self.peer} sent a reply to id {rid!r}, which this client never uses")
        if rid in self._forgotten:
            self._forgotten.discard(rid)
            return None  # its caller gave up on it
        if self._pending.pop(rid, None) is None:
            raise ProtocolError(E_PROTOCOL, f"{self.peer} sent a reply to request {rid}, which was never sent "
                                            "or was answered already")
        reply = Reply(rid, msg.get("result"), error)
        if rid == self._hello_id:
            self._check_hello(reply)
        return reply

    def _check_hello(self, reply: Reply) -> None:
        if reply.error is not None:
            return  # the caller raises it (forbidden, or a daemon that has no hello)
        hello = reply.result
        if not isinstance(hello, dict):
            raise ProtocolError(E_PROTOCOL, f"{self.peer} did not answer hello")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(
                E_PROTOCOL_VERSION,
                f"{self.peer} speaks control protocol {hello.get('protocol')}, this wsctl speaks "
                f"{PROTOCOL_VERSION}: use the wsctl that came with this wsd")
        self.hello = hello


def _error(err: Any) -> RequestFailed:
    if isinstance(err, dict):
        return RequestFailed(str(err.get("code") or E_FAILED), str(err.get("message", "")))
    return RequestFailed(E_FAILED, str(err))


# ---------------------------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class Request:
    """One well-formed request."""

    id: Any
    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class BadRequest:
    """A line that is not a request: answer ``reply`` and read on (``fatal``: then close the connection)."""

    reply: bytes
    fatal: bool = False


class ServerCodec:
    """The daemon's side of one control connection, with no I/O: bytes in, ``Request`` or
    ``BadRequest`` out; results, errors and events to reply bytes.

    ``encode`` turns a JSON-able value into bytes; the daemon passes a faster encoder than ``json``.
    """

    def __init__(self, *, max_line_bytes: int = MAX_REQUEST_BYTES,
                 encode: Callable[[Any], bytes] = _dumps) -> None:
        self._lines = LineBuffer(max_line_bytes)
        self._encode = encode

    def receive_data(self, data: bytes) -> None:
        """What was read from the socket; ``b""`` when the client closed the connection."""
        self._lines.feed(data)

    def next_event(self) -> Request | BadRequest | _NeedData | _Closed:
        while True:
            try:
                line = self._lines.next_line()
            except OverflowError:
                return BadRequest(self.error(None, E_BAD_REQUEST, f"request larger than {MAX_REQUEST_BYTES} bytes"),
                                  fatal=True)
            if line is None:
                return CLOSED if self._lines.eof else NEED_DATA
            if line.strip():
                return self.parse(line)

    def parse(self, line: bytes) -> Request | BadRequest:
        try:
            req = json.loads(line)
        except ValueError as exc:
            return BadRequest(self.error(None, E_PARSE, f"invalid JSON: {exc}"))
        if not isinstance(req, dict):
            return BadRequest(self.error(None, E_BAD_REQUEST, "a request is a JSON object"))
        rid = req.get("id")
        method = req.get("method")
        params = req.get("params") or {}
        if not isinstance(method, str):
            return BadRequest(self.error(rid, E_BAD_REQUEST, "'method' must be a string"))
        if not isinstance(params, dict):
            return BadRequest(self.error(rid, E_BAD_REQUEST, "'params' must be an object"))
        if method not in METHODS:
            return BadRequest(self.error(rid, E_UNKNOWN_METHOD, f"unknown method {method!r}; see the 'help' method"))
        return Request(rid, method, params)

    def result(self, rid: Any, result: Any) -> bytes:
        return self._encode({"id": rid, "result": result}) + b"\n"

    def error(self, rid: Any, code: str, message: str) -> bytes:
        return self._encode({"id": rid, "error": {"code": code, "message": message}}) + b"\n"

    def event(self, event: dict[str, Any]) -> bytes:
        return self._encode({"event": event}) + b"\n"
