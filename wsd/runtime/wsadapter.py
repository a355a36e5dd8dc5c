"""Every use of websockets below its documented API, in one module (with the version check in compat.py).

A connection is websockets' sans-I/O ``ServerProtocol`` driven by our own ``asyncio.Protocol``
(``WsdServerConnection``): websockets parses and frames, enforces the size limits and UTF-8, and runs
the close handshake; this module feeds it bytes, writes what it has to send, assembles fragmented
messages, and hands complete messages to the endpoint. Below websockets' documented API it uses: the
protocol's ``parser`` generator (replaced once open, so the handshake request is let go), ``reject``
and ``select_subprotocol`` overridden on a subclass, ``available_extensions`` per pool, frames serialized
once and written raw to transports, and ``State.OPEN``. hub.py and server.py call the functions here and
never touch those internals themselves; a websockets release that moves them is handled here alone. The
versions this works with are checked at import (``compat.require_websockets``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import uuid
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

from wsd import errors
from wsd.runtime.compat import require_websockets

if TYPE_CHECKING:
    from wsd.runtime.conn import Conn

require_websockets()

try:  # the most frames of one fragmented message websockets' own connection takes (newer releases)
    from websockets.asyncio.messages import MAX_FRAGMENTS
except ImportError:  # pragma: no cover
    MAX_FRAGMENTS = 4096

#: The open state, compared by identity on the hot path (``conn.proto.state is OPEN``).
OPEN = State.OPEN
_encode = msgspec.json.Encoder().encode


def hard_abort(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP reset: the kernel drops what it still holds for a peer that stopped reading.

    A plain ``abort()`` only closes the fd; the kernel keeps the orphaned socket and its unsent data
    (up to net.ipv4.tcp_wmem max, 4 MiB by default) while it keeps probing a zero window.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def text_frame(payload: bytes) -> bytes:
    """One unmasked server text frame, serialized by websockets once for every receiver."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


def ping(conn: Conn, data: bytes) -> None:
    """Send a ping with ``data`` on ``conn`` (the hub matches the pong with ``conn.ping_data``).
    Raises what sending raises."""
    conn.proto.send_ping(data)
    conn.ws.send_data()


def offer_extensions(ws: WsdServerConnection, factories: list[Any]) -> None:
    """The extensions (permessage-deflate) this connection's handshake may accept: set per pool."""
    ws.protocol.available_extensions = factories


def start_close(conn: Conn, code: int, reason: str, timeout: float) -> None:
    """Send a close frame with ``code`` and a reason cut to the 123 bytes of UTF-8 a close frame holds; abort
    the transport (with a reset) if the close handshake is not over within ``timeout`` seconds."""
    conn.ws.close_soon(code, reason.encode()[:123].decode("utf-8", "ignore"), timeout)


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    h = Headers()
    h["Content-Type"] = "application/json"
    h["Cache-Control"] = "no-store"
    for k, v in (headers or {}).items():
        h[k] = v
    payload = _encode(body) + b"\n"
    h["Content-Length"] = str(len(payload))
    return Response(status, HTTPStatus(status).phrase, h, payload)


_LIBRARY_REFUSALS = {414: "request_too_large", 431: "request_too_large", 426: "upgrade_required"}


def json_reject(status: Any, text: str) -> Response:
    """websockets' ``ServerProtocol.reject`` with our JSON body ``{"error", "message"}``."""
    code = int(status)
    error = _LIBRARY_REFUSALS.get(code, "bad_request" if code < 500 else "internal")
    resp = json_response(code, {"error": error, "message": text.strip()})
    resp.headers["Connection"] = "close"
    return resp


#: the most received bytes handed to websockets' parser in one event loop callback
READ_SLICE = 16 * 1024
#: complete messages waiting for their connection's handler before reading pauses (websockets' max_queue),
#: and how few let it resume
INBOX_HIGH = 16
INBOX_LOW = 4

_CONNECTING = State.CONNECTING
_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_PONG = Opcode.PONG
_WS_LOG = logging.getLogger("websockets.server")
_log = logging.getLogger("wsd.server")
#: every connection's ``protocol.id`` (websockets sets a fresh uuid4 per connection, read only in its own logs)
_NO_ID = uuid.UUID(int=0)
# websockets.protocol.Protocol.parse: the frame parser without ServerProtocol.parse's frame, which keeps the
# parsed handshake request (~2.8 KiB, the token in its target included) for the connection's life.
_frame_parser = Protocol.parse


class WsdServerProtocol(ServerProtocol):
    """websockets' sans-I/O server protocol, with our refusal bodies and subprotocol choice on the class
    (no per-connection bound methods) and no per-connection uuid."""

    def __init__(self, max_size: int | None) -> None:
        super().__init__(max_size=max_size, logger=_WS_LOG)
        self.id = _NO_ID

    def select_subprotocol(self, subprotocols: Any) -> Any:
        ep = WsdServerConnection.wsd_endpoint
        return ep.select_subprotocol(None, subprotocols) if ep is not None else None

    def reject(self, status: Any, text: str) -> Response:
        # websockets refuses malformed or oversized requests itself (400, 414, 426, 431) in plain text:
        # give those the same JSON body as our own refusals.
        return json_reject(status, text)


def forget_request(proto: ServerProtocol) -> bool:
    """Let the parser of an open connection drop the handshake request it parsed.

    ``ServerProtocol.parse`` parses the request into a local variable, then runs ``Protocol.parse`` (the
    frame parser) inside the same generator for the connection's life, so the request stays referenced.
    When that frame parser is waiting for the first byte of a frame (``reader.at_eof``) with nothing
    buffered, a fresh ``Protocol.parse`` is in exactly the same state: it replaces the old generator. A
    client that sent frames before our 101 (not allowed by RFC 6455 4.1) keeps its parser as it is.
    """
    gen = proto.parser
    inner = getattr(gen, "gi_yieldfrom", None)
    waiting = getattr(inner, "gi_yieldfrom", None)
    if (getattr(inner, "gi_code", None) is not _frame_parser.__code__ or waiting is None
            or waiting.gi_code.co_name != "at_eof" or proto.reader.buffer or proto.reader.eof):
        return False
    fresh = _frame_parser(proto)
    next(fresh)
    proto.parser = fresh
    gen.close()
    return True


class WsdServerConnection(asyncio.Protocol):
    """One WebSocket connection: websockets' sans-I/O ``ServerProtocol`` driven from an ``asyncio.Protocol``.

    No task lives as long as the connection: a task runs the handshake (admission is async) and the
    handler's start, then while received messages wait for the handler, and ends when they are served;
    timers (handshake timeout, close timeout) are loop timers. Everything is ``__slots__``; the handshake's
    request and response, and the parser frame that holds the request, are let go once the connection is
    open. websockets does the protocol: parsing, framing, masking, limits, the close handshake.

    The endpoint (``wsd_endpoint``, class-wide) provides ``on_accept(ws, transport)``,
    ``process_request(ws, request)``, ``select_subprotocol(ws, offered)``, ``opened(ws)``,
    ``on_frame(conn, message)`` and ``closed(ws)``.
    """

    # 16 slots: 160 bytes, the block 15 took already (pymalloc rounds to 16 bytes); a 17th costs 16 more.
    __slots__ = ("accepted", "admission", "frags", "inbox", "inbox_paused", "lost", "phase", "protocol", "proxy",
                 "request", "response", "slot", "task", "timer", "transport", "wsd_conn")

    wsd_hub: Any = None  # class-wide: the one hub (set when the first connection registers)
    wsd_endpoint: Any = None  # class-wide: set by the daemon's Endpoint
    loop: asyncio.AbstractEventLoop
    # class-wide settings, set by ``listen``
    open_timeout = 10.0
    close_timeout = 10.0
    write_limit = 64 * 1024
    max_size: int | None = 1 << 20

    def __init__(self) -> None:
        self.protocol = WsdServerProtocol(WsdServerConnection.max_size)
        self.transport: Any = None
        self.wsd_conn: Conn | None = None  # the admitted, registered connection
        self.accepted = time.perf_counter()  # the handshake duration histogram's start
        self.slot: str | None = None  # the address holding a handshake-in-progress slot, until the handshake ends
        self.admission: Any = None  # the endpoint's Admission, until the handler takes it
        # server.proxy_protocol: bytes while a PROXY preamble is expected (what of it has arrived), then the
        # client's address it gave ("" when it named none); None for a connection without one
        self.proxy: bytes | str | None = None
        self.request: Request | None = None
        self.response: Response | None = None
        self.phase = 0  # 0 waiting for the request, 1 handshake, 2 starting, 3 open and started, 4 torn down
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.inbox: deque[str | bytes] | None = None  # complete messages waiting for the handler (lazy)
        self.inbox_paused = False
        self.frags: list[Any] | None = None  # the frames of a fragmented message being received
        self.lost = False

    # -- what the rest of the runtime reads --------------------------------------------------------------
    @property
    def remote_address(self) -> Any:
        tr = self.transport
        return tr.get_extra_info("peername") if tr is not None else None

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self.protocol.close_reason

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WsdServerConnection.write_limit)
        self.timer = self.loop.call_later(WsdServerConnection.open_timeout, self._open_timed_out)
        ep = WsdServerConnection.wsd_endpoint
        if ep is not None:
            ep.on_accept(self, transport)

    def data_received(self, data: bytes) -> None:
        """Hand received bytes to websockets' parser at most ``READ_SLICE`` at a time.

        One read can bring 256 KiB; parsing that many tiny frames takes websockets ~170 ms in one
        callback, during which no other connection is served. A larger read of an admitted connection is
        parsed a slice per loop iteration with reading paused (what waits is kept on its ``Conn``), so the
        connection's handler (and its rate limit) runs between slices and everyone else's callbacks run too.
        Once the connection is closing for its message rate, what it still sends is dropped unparsed. Before
        admission a read is parsed whole: websockets bounds the handshake request itself.
        """
        c = self.wsd_conn
        if c is None:
            if type(self.proxy) is bytes:  # a PROXY preamble first (server.proxy_protocol)
                data = WsdServerConnection.wsd_endpoint.proxy_preamble(self, data)
                if not data:
                    return
            self._feed(data)
            return
        if c.unread:
            c.unread += data  # order: behind what is still waiting (reading is paused again)
            self.transport.pause_reading()
            return
        if c.closing and c.close_code == errors.RATE_LIMITED.code:
            self.transport.pause_reading()  # the close is decided; the transport is aborted after its timeout
            self.wsd_hub.stats.input_discarded_bytes += len(data)
            return
        if len(data) <= READ_SLICE:
            self._feed(data)
            return
        self._feed(data[:READ_SLICE])
        c.unread = data[READ_SLICE:]
        self.transport.pause_reading()
        self.loop.call_soon(self._feed_unread, c)

    def _feed_unread(self, c: Conn) -> None:
        data = c.unread
        if not data or self.transport.is_closing():
            c.unread = b""
            return
        if c.closing and c.close_code == errors.RATE_LIMITED.code:
            c.unread = b""
            self.wsd_hub.stats.input_discarded_bytes += len(data)
            return
        c.unread = data[READ_SLICE:]
        self._feed(data[:READ_SLICE])
        if c.unread:
            self.loop.call_soon(self._feed_unread, c)
        elif not self.inbox_paused:  # reading resumes when the handler has caught up
            self.transport.resume_reading()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self.protocol.events_received()
        self.send_data()
        # the WebSocket close handshake ends the TCP connection: nothing is written after the peer's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the protocol is CLOSED from here on
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._release_slot()
        self.frags = None
        c = self.wsd_conn
        if c is not None:
            c.unread = b""
            if self.phase == 3:
                self._kick()  # the handler's end: once the messages already received are served

    def pause_writing(self) -> None:
        c = self.wsd_conn
        if c is not None:
            self.wsd_hub.on_pause_writing(c)

    def resume_writing(self) -> None:
        c = self.wsd_conn
        if c is not None:
            self.wsd_hub.on_resume_writing(c)

    # -- the protocol -----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        proto = self.protocol
        proto.receive_data(data)
        events = proto.events_received()
        self.send_data()  # pongs, close replies, the end of the stream
        if proto.close_expected():
            self._expect_close()
        for ev in events:
            if isinstance(ev, Frame):
                op = ev.opcode
                if op is _PONG:
                    c = self.wsd_conn
                    if c is not None and c.ping_data is not None:
                        self.wsd_hub.on_pong(c, ev.data)
                elif op is _TEXT or op is _BINARY:
                    if ev.fin:
                        self._message(ev.opcode, ev.data)
                    else:
                        self.frags = [ev]
                elif op is _CONT:
                    frags = self.frags
                    if frags is None:
                        continue  # websockets refused it already (protocol error)
                    frags.append(ev)
                    if ev.fin:
                        self.frags = None
                        self._message(frags[0].opcode, b"".join(f.data for f in frags))
                    elif len(frags) >= MAX_FRAGMENTS:
                        self.frags = None
                        self._fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                        return
            elif self.phase == 0:  # the handshake request: the client's part of the handshake is done
                self.request = ev
                self.phase = 1
                if self.timer is not None:
                    self.timer.cancel()  # admission gets its own bound when it starts (_handshake)
                    self.timer = None
                self._kick()

    def _message(self, opcode: Opcode, data: Any) -> None:
        if opcode is _TEXT:
            try:
                msg: str | bytes = data.decode()
            except UnicodeDecodeError as exc:
                self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        else:
            msg = data if type(data) is bytes else bytes(data)
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        inbox.append(msg)
        if len(inbox) >= INBOX_HIGH and not self.inbox_paused:
            self.inbox_paused = True
            self.transport.pause_reading()
        if self.phase == 3:
            self._kick()

    def _fail(self, code: int, reason: str) -> None:
        self.protocol.fail(code, reason)
        self.send_data()
        self._expect_close()

    def send_data(self) -> None:
        """Write what the protocol has to send; its empty bytes mean the end of our side of the stream.

        Before the handshake response nothing is written: websockets parses the frames of a client that sent
        them with its request and queues the pongs of its pings, which must follow the 101 (``_handshake``).
        """
        tr = self.transport
        proto = self.protocol
        if proto.state is _CONNECTING and not proto.eof_sent:
            return
        for data in proto.data_to_send():
            try:
                if data:
                    tr.write(data)
                elif tr.can_write_eof():
                    tr.write_eof()
                else:
                    tr.close()
            except Exception:  # noqa: BLE001  # a transport that is going: connection_lost follows
                pass

    def _expect_close(self) -> None:
        """The TCP connection should end soon: abort it if it has not after the close timeout."""
        self._close_within(WsdServerConnection.close_timeout)

    def _close_within(self, timeout: float) -> None:
        if self.lost or self.timer is not None:
            return  # a close timer runs already (or the handshake's, which aborts a connection still connecting)
        self.timer = self.loop.call_later(timeout, self._close_timed_out)

    def close_soon(self, code: int, reason: str, timeout: float) -> None:
        """Start the close handshake with ``code``; abort the transport if it is not over within ``timeout``."""
        if self.lost:
            return
        proto = self.protocol
        if proto.state is OPEN:
            proto.send_close(code, reason)
            self.send_data()
        elif proto.state is _CONNECTING:
            self.transport.abort()
            return
        self._close_within(timeout)

    def _close_timed_out(self) -> None:
        self.timer = None
        if not self.lost:
            hard_abort(self.transport)

    def _open_timed_out(self) -> None:
        """The client did not send its request in time, or admission did not finish in time: abort."""
        self.timer = None
        if self.protocol.state is _CONNECTING and not self.lost:
            self.transport.abort()
            if self.phase == 1 and self.task is not None:
                self.task.cancel()  # an admission stuck on the engine ends with the connection

    # -- the one task at a time -------------------------------------------------------------------------
    def _kick(self) -> None:
        if self.task is None:
            self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        ep = WsdServerConnection.wsd_endpoint
        try:
            if self.phase == 1:
                await self._handshake(ep)
                if self.protocol.state is not OPEN:
                    return
                self.phase = 2
                await ep.opened(self)
                self.phase = 3
            c = self.wsd_conn
            inbox = self.inbox
            if c is not None and inbox:
                while inbox:
                    msg = inbox.popleft()
                    if self.inbox_paused and len(inbox) <= INBOX_LOW:
                        self.inbox_paused = False
                        if not c.unread and not self.lost:
                            self.transport.resume_reading()
                    await ep.on_frame(c, msg)
                self.inbox = None  # an idle connection keeps no deque (~760 bytes): the next message makes one
            if self.lost and c is not None and self.phase == 3:
                self.phase = 4
                self.inbox = None
                await ep.closed(self)
        except Exception:
            _log.exception("connection handler failed")
            if not self.lost:
                self.transport.abort()
        finally:
            self.task = None

    async def _handshake(self, ep: Any) -> None:
        proto = self.protocol
        request = self.request
        assert request is not None
        # The handshake timeout runs from the accept until the request is in (the client's part), and again from
        # here (admission's part): time the request waited for this task in a loaded loop is the server's own
        # queue, and a client is not dropped for it.
        if self.timer is None and not self.lost:
            self.timer = self.loop.call_later(WsdServerConnection.open_timeout, self._open_timed_out)
        try:
            try:
                response = await ep.process_request(self, request)
            except Exception as exc:
                proto.handshake_exc = exc
                _WS_LOG.error("process_request failed", exc_info=True)
                response = proto.reject(HTTPStatus.INTERNAL_SERVER_ERROR, "Failed to open a WebSocket connection.\n"
                                        "See server log for more information.\n")
            if response is None:
                response = proto.accept(request)
        finally:
            self._release_slot()
        self.request = None
        if proto.state is not _CONNECTING or self.lost or proto.eof_sent:
            return  # the peer left meanwhile, or sent what websockets refused (its answer is sent)
        early = proto.writes  # pongs to pings sent with the request: after the response, or not at all
        proto.writes = []
        proto.send_response(response)
        if proto.state is OPEN:
            proto.writes.extend(early)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.response = response
            forget_request(proto)
            self.send_data()
        else:
            self.send_data()
            self._expect_close()

    def _release_slot(self) -> None:
        ip = self.slot
        if ip is not None:
            self.slot = None
            ep = WsdServerConnection.wsd_endpoint
            if ep is not None:
                ep.inflight.leave(ip)


async def listen(host: Any, port: int, *, ssl: Any, backlog: int, open_timeout: float, close_timeout: float,
                 max_size: int | None, write_limit: int, reuse_port: bool = False) -> asyncio.Server:
    """The WebSocket listener: one ``WsdServerConnection`` per accepted TCP connection."""
    loop = asyncio.get_running_loop()
    cls = WsdServerConnection
    cls.loop = loop
    cls.open_timeout = open_timeout
    cls.close_timeout = close_timeout
    cls.max_size = max_size
    cls.write_limit = write_limit
    kw: dict[str, Any] = {}
    if ssl is not None:
        kw = {"ssl": ssl, "ssl_handshake_timeout": open_timeout, "ssl_shutdown_timeout": close_timeout}
    if reuse_port:
        kw["reuse_port"] = True  # `wsd serve --workers N`: the workers share the port (SO_REUSEPORT)
    return await loop.create_server(cls, host, port, backlog=backlog, **kw)
