"""Every use of websockets below its documented API, in one module (with the version check in compat.py).

The runtime needs a few of websockets' internals: its server connection subclassed (received bytes fed
to the parser in slices, pongs and transport pressure reported to the hub, refusals with a JSON body),
raw frames serialized once and written straight to transports, pings tracked in ``pending_pings``, the
extensions offered per pool, and the handshake's request replaced by a shared stub. hub.py and server.py
call the functions here and never touch those internals themselves; a websockets release that moves them
is handled here alone. The versions this works with are checked at import (``compat.require_websockets``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from wsd import errors
from wsd.runtime.compat import require_websockets

if TYPE_CHECKING:
    from wsd.runtime.conn import Conn

require_websockets()

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


def ping(conn: Conn, data: bytes, done: asyncio.Future[float], now: float) -> None:
    """Send a ping with ``data`` on ``conn`` and track it in websockets' ``pending_pings``.

    ``done`` is one shared, already-done future: a pong schedules no callback, since
    ``WsdServerConnection.acknowledge_pings`` reports it to the hub directly. Raises what sending raises.
    """
    ws = conn.ws
    ws.pending_pings[data] = (done, now)
    conn.proto.send_ping(data)
    ws.send_data()


def ping_unanswered(conn: Conn, data: bytes) -> bool:
    """The ping sent with ``data`` has had no pong yet."""
    return data in conn.ws.pending_pings


def offer_extensions(ws: ServerConnection, factories: list[Any]) -> None:
    """The extensions (permessage-deflate) this connection's handshake may accept: set per pool."""
    ws.protocol.available_extensions = factories  # type: ignore[attr-defined]


#: websockets reads "request is None" as "no handshake yet": an admitted connection keeps this shared stub
_ADMITTED = Request("/", Headers())


def forget_handshake(ws: ServerConnection) -> None:
    """Let an admitted connection's handshake request and response go (~4 KiB each, the token in them)."""
    ws.request = _ADMITTED
    ws.response = None


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


class Handshake:
    """A connection's state while its handshake runs: its in-progress slot, when it was accepted, and the
    endpoint's ``Admission`` once the request is admitted (the handler takes it and drops this object)."""

    __slots__ = ("accepted", "admission", "proxy", "relayed", "slot")

    def __init__(self, accepted: float) -> None:
        self.accepted = accepted  # perf_counter at accept: the handshake duration histogram's start
        self.slot: str | None = None  # the address holding a handshake-in-progress slot, until the handshake ends
        self.admission: Any = None
        self.proxy: bytes | None = None  # a PROXY preamble expected: what of it has arrived (server.proxy_protocol)
        self.relayed: str | None = None  # the client's address the PROXY preamble gave ("": it named none)


class WsdServerConnection(ServerConnection):
    """websockets' server connection, telling the hub when its transport fills up and drains."""

    wsd_conn: Conn | None = None  # the admitted connection
    wsd_hs: Handshake | None = None  # what the handshake needs, until the handler takes over
    wsd_hub: Any = None  # class-wide: the one hub (set when the first connection registers)
    wsd_endpoint: Any = None  # class-wide: set by the daemon's Endpoint

    def __init__(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, *args, **kwargs)
        # Two attributes of our own, set here with the object's others. websockets' connection ends up with 27
        # (25 here, ``recv_messages`` and ``transport`` at connection_made); CPython shares one key table between
        # instances' __dict__s only up to 30 keys, and past that every instance gets a dict of its own (measured:
        # 296 -> 1,584 bytes per connection). What is the same for every connection lives on the class, what
        # only the handshake needs on a short-lived ``Handshake``, and the rest on our own Conn (slots).
        self.wsd_conn = None
        self.wsd_hs = Handshake(time.perf_counter())
        # websockets refuses malformed or oversized requests itself (400, 414, 426, 431) in plain text:
        # give those the same JSON body as our own refusals.
        protocol.reject = json_reject

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ep = WsdServerConnection.wsd_endpoint
        if ep is not None:
            ep.on_accept(self, transport)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._release_slot()

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
            hs = self.wsd_hs
            if hs is not None and hs.proxy is not None:  # a PROXY preamble first (server.proxy_protocol)
                data = WsdServerConnection.wsd_endpoint.proxy_preamble(self, hs, data)
                if not data:
                    return
            super().data_received(data)
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
            super().data_received(data)
            return
        super().data_received(data[:READ_SLICE])
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
        super().data_received(data[:READ_SLICE])
        if c.unread:
            self.loop.call_soon(self._feed_unread, c)
        elif not self.recv_messages.paused:  # websockets resumes reading itself when its queue drains
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_slot()
        c = self.wsd_conn
        if c is not None:
            c.unread = b""
        super().connection_lost(exc)

    def _release_slot(self) -> None:
        hs = self.wsd_hs
        ip = hs.slot if hs is not None else None
        if ip is not None:
            hs.slot = None
            ep = WsdServerConnection.wsd_endpoint
            if ep is not None:
                ep.inflight.leave(ip)

    def acknowledge_pings(self, data: bytes) -> None:
        c = self.wsd_conn
        if c is not None and c.ping_data is not None:
            self.wsd_hub.on_pong(c, data)
        super().acknowledge_pings(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        c = self.wsd_conn
        if c is not None:
            self.wsd_hub.on_pause_writing(c)

    def resume_writing(self) -> None:
        super().resume_writing()
        c = self.wsd_conn
        if c is not None:
            self.wsd_hub.on_resume_writing(c)


