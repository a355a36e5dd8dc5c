"""The WebSocket endpoint: handshake admission, the per-connection read loop, client ops.

Every refusal is a plain HTTP response with a JSON body before any WebSocket frame, and is
also logged and emitted as an event (browsers only ever see 1006 for a refused handshake).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from wsd import errors
from wsd.core import capacity, frames, proxyproto
from wsd.core.auth import SUBPROTOCOL, AuthError, extract_token
from wsd.core.channels import ChannelError, Principal, instance_parts, may_publish, resolve
from wsd.core.history import StreamPosition
from wsd.core.net import ip_in
from wsd.core.outbox import Priority
from wsd.core.ratelimit import TokenBucket
from wsd.runtime import session as saved
from wsd.runtime.conn import BATCH, HISTORICAL, ON_DEMAND, Conn, ReliableState, Unacked
from wsd.runtime.gate import InProgress, Repeats
from wsd.runtime.hub import HISTORY_TAIL, Outgoing
from wsd.runtime.logs import redact
from wsd.runtime.wsadapter import WsdServerConnection, hard_abort, json_response, offer_extensions

if TYPE_CHECKING:
    from wsd.runtime.daemon import Daemon

log = logging.getLogger("wsd.server")
_encode = msgspec.json.Encoder().encode


class Admission:
    """What the handshake established, handed to the connection handler."""

    __slots__ = ("claims", "pool", "principal", "remote", "session", "session_id", "since", "subprotocol",
                 "takeover", "token_source", "user_agent")

    def __init__(self, **kw: Any) -> None:
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def text_response(status: int, text: str, content_type: str) -> Response:
    h = Headers()
    h["Content-Type"] = content_type
    body = text.encode()
    h["Content-Length"] = str(len(body))
    return Response(status, HTTPStatus(status).phrase, h, body)


def request_target(path: str) -> tuple[str, str]:
    """(path, query) of a request target, also in absolute form (``ws://host:port/ws/mt5?x``)."""
    if "://" in path.split("?", 1)[0]:
        parts = urlsplit(path)
        return parts.path or "/", parts.query
    p, _, q = path.partition("?")
    return p, q


def _capped(pubs: list[Any], max_messages: int, max_bytes: int, push: Callable[[Any], bytes | None]
            ) -> tuple[list[bytes], Any]:
    """The history pushes (``push(pub)``; None leaves a publication out) of the leading publications that fit
    one reply of ``max_messages`` / ``max_bytes`` (at least one message), and the last publication looked at
    when the reply was cut (None when it was not)."""
    out: list[bytes] = []
    size = 0
    last = None
    for pub in pubs:
        if len(out) >= max_messages:
            return out, last
        p = push(pub)
        if p is not None:
            if out and size + len(p) > max_bytes:
                return out, last
            size += len(p) + 1
            out.append(p)
        last = pub
    return out, None


def _newest_within(chosen: list[tuple[Any, bytes]], max_messages: int, max_bytes: int
                   ) -> tuple[list[tuple[Any, bytes]], bool]:
    """The newest of ``(publication, push)`` pairs that fit ``max_messages`` / ``max_bytes`` (at least one),
    oldest first, and whether older ones were left out."""
    n = len(chosen)
    size = 0
    k = 0
    while k < n:
        p = chosen[n - 1 - k][1]
        if k >= max_messages or (k and size + len(p) > max_bytes):
            return chosen[n - k:], True
        size += len(p) + 1
        k += 1
    return chosen, False


#: The longest ``since`` query parameter taken (characters of base64url): a request line stays well under 8 KiB.
SINCE_MAX_CHARS = 6144
# Offsets are bounded as in a frame's `history.since` (a larger one no engine can address).
_since_decode = msgspec.json.Decoder(dict[str, tuple[frames.Offset, str]]).decode


def parse_since(text: str, max_entries: int) -> dict[str, StreamPosition]:
    """The positions a resuming client has processed: ``since`` is base64url (padding optional) of a JSON
    object ``{"<channel>": [offset, "epoch"], ...}``. Raises ValueError with a message for the client."""
    if len(text) > SINCE_MAX_CHARS:
        raise ValueError(f"since is {len(text)} characters; at most {SINCE_MAX_CHARS}")
    try:
        if "+" in text or "/" in text:
            raise ValueError
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("since is not base64url") from None
    try:
        got = _since_decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError('since must be a JSON object {"<channel>": [offset, "epoch"], ...}: '
                         + frames.explain(str(exc))) from None
    if len(got) > max_entries:
        raise ValueError(f"since names {len(got)} channels; at most {max_entries} "
                         "(limits.max_subscriptions_per_connection)")
    return {ch: StreamPosition(off, ep) for ch, (off, ep) in got.items()}


# Headers a handshake carries at most once; a duplicate is refused with 400 rather than guessed at.
SINGLE_HEADERS = ("Host", "Origin", "Authorization", "Cookie", "User-Agent", "Sec-WebSocket-Key",
                  "Sec-WebSocket-Version")


def duplicated_header(headers: Headers) -> str | None:
    """The first of ``SINGLE_HEADERS`` sent more than once, or None."""
    for name in SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return name
    return None


def shown_path(path: str) -> str:
    """A request path as it may be recorded: tokens redacted, at most 200 characters."""
    p = redact(path)
    return p if len(p) <= 200 else p[:200] + "..."


class Endpoint:
    """Handshake admission and the connection handler for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        lim = daemon.config.limits
        self.inflight = InProgress(lim.handshakes_in_progress_per_ip, lim.handshakes_in_progress)
        self.repeats = Repeats()
        self._flush_handle: Any = None
        WsdServerConnection.wsd_endpoint = self

    # -- the edge: accepted sockets, repeated records -------------------------------------------------------
    def on_accept(self, conn: WsdServerConnection, transport: Any) -> None:
        """A TCP connection was accepted: hold a handshake slot for it, or close it at once."""
        d = self.daemon
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        # Descriptors are handed out lowest first: a new one this high means nearly all are in use.
        # Close it while a reserve is left for the control socket, the log and the audit file.
        if fd >= d.fd_alarm:
            self.descriptors_exhausted(f"descriptor {fd} of {d.fd_limit} in use at accept", remote=ip)
            transport.abort()
            return
        lim = d.config.limits
        inflight = self.inflight
        inflight.per_ip = lim.handshakes_in_progress_per_ip
        inflight.total = lim.handshakes_in_progress
        trusted = d.proxies.trusts(ip)  # a proxy's connections carry many clients: only the total bounds them
        full = inflight.try_enter(ip, per_ip=not trusted)
        if full:
            d.hub.stats.refuse("handshakes_in_progress")
            limit = inflight.per_ip if full == "per_ip" else inflight.total
            self.record((ip, "handshakes_in_progress"), "handshake_limit", {
                "remote": ip, "bound": "handshakes_in_progress_per_ip" if full == "per_ip"
                else "handshakes_in_progress", "limit": limit}, None, overflow=("*", "handshakes_in_progress"))
            transport.abort()
            return
        conn.slot = ip
        if trusted and d.config.server.proxy_protocol:
            conn.proxy = b""  # it must start with a PROXY preamble (proxy_preamble reads it)

    def proxy_preamble(self, conn: WsdServerConnection, data: bytes) -> bytes:
        """Bytes from a trusted proxy before its PROXY preamble is read (``conn.proxy``: what of it has arrived):
        what follows the preamble (b"" while it is incomplete); once read, ``conn.proxy`` is the client's address
        it gave ("" when it named none). A malformed one closes the connection, counted and recorded."""
        buf = conn.proxy + data
        try:
            pre = proxyproto.parse(buf)
        except proxyproto.ProxyHeaderError as exc:
            conn.proxy = None
            peer = conn.remote_address[0] if conn.remote_address else ""
            self.daemon.hub.stats.refuse("proxy_header")
            self.record((peer, "proxy_header"), "refused", {
                "status": 0, "code": "proxy_header", "reason": f"{exc}: connection closed", "remote": peer,
                "pool": "", "user_id": ""}, "handshake_refused", overflow=("*", "proxy_header"))
            hard_abort(conn.transport)
            return b""
        if pre is None:
            conn.proxy = buf
            return b""
        conn.proxy = pre.source if pre.source is not None else ""  # "": no client named, the walk ends here
        return buf[pre.length:]

    def descriptors_exhausted(self, detail: str, remote: str = "") -> None:
        """Count descriptor exhaustion and log it (the first in full, then one summary per interval)."""
        d = self.daemon
        d.hub.stats.refuse("descriptors_exhausted")
        self.record(("descriptors",), "descriptors_exhausted", {"detail": detail, "remote": remote,
                                                                "limit": d.fd_limit}, "descriptors_exhausted")

    def record(self, key: Any, kind: str, fields: dict[str, Any], audit_kind: str | None,
               overflow: Any = None) -> None:
        """An event (and audit record): written in full the first time per key and interval, else counted."""
        d = self.daemon
        rep = self.repeats
        if overflow is not None and key not in rep.entries and len(rep) >= rep.max_keys:
            key, fields = overflow, {**fields, "remote": "*"}  # too many addresses at once: one record for all
        if not rep.hit(key, d.loop.time(), (kind, fields, audit_kind)):
            self._schedule_flush()
            return
        d.emit(kind, **fields)
        if audit_kind is not None:
            d.audit(audit_kind, **fields)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            d = self.daemon
            self._flush_handle = d.loop.call_later(d.config.log.repeat_summary_interval_s, self.flush_repeats)

    def flush_repeats(self) -> None:
        """One summary per key that repeated: the first record's fields, with ``repeated`` and ``interval_s``."""
        d = self.daemon
        self._flush_handle = None
        for _key, n, span, (kind, fields, audit_kind) in self.repeats.flush(d.loop.time()):
            summary = {**fields, "repeated": n, "interval_s": round(span, 1)}
            d.emit(kind, **summary)
            if audit_kind is not None:
                d.audit(audit_kind, **summary)
        if len(self.repeats):
            self._schedule_flush()

    # -- handshake ----------------------------------------------------------------------------------------
    def capacity_refusal(self, pool_id: str, leaving: str = "") -> str:
        """Which connection limit refuses one more connection in ``pool_id`` ('' = none; see
        wsd.core.capacity). ``leaving``: the pool of a connection this one replaces."""
        d = self.daemon
        used: dict[str, int] = d.hub.pool_counts
        if leaving:
            used = dict(used)
            used[leaving] = max(0, used.get(leaving, 0) - 1)
        return capacity.decide(d.config.manager.max_connections, d.shares, used, pool_id)

    def pool_full_text(self, pool: Any, refusal: str) -> str:
        if refusal == capacity.POOL_CEILING:
            return (f"pool {pool.id} is full: at its ceiling of {pool.max_connections} connections "
                    "(max_connections)")
        return (f"pool {pool.id} is full: the shared capacity is exhausted (the pool is past its "
                f"reservation of {pool.min_connections}; the rest of manager.max_connections = "
                f"{self.daemon.config.manager.max_connections} is in use or reserved by other pools)")

    def refuse(self, conn: WsdServerConnection, spec: tuple[int, str], message: str, remote: str, pool: str = "",
               retry_after: float | None = None, user_id: str = "", detail: dict[str, Any] | None = None
               ) -> Response:
        status, code = spec
        self.daemon.hub.stats.refuse(code)
        # A flood of one refusal from one address is one record, then one summary with the count per interval.
        self.record((remote, code), "refused", {"status": status, "code": code, "reason": message, "remote": remote,
                                                "pool": pool, "user_id": user_id},
                    "handshake_refused" if status in (401, 403, 429) else None, overflow=("*", code))
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, int(min(retry_after, 3600.0) + 0.999)))
        return json_response(status, {"error": code, "message": message, **(detail or {})}, headers)

    async def process_request(self, conn: WsdServerConnection, request: Request) -> Response | None:
        try:
            return await self._admit(conn, request)
        except MultipleValuesError as exc:
            # A header read as single that came more than once: a client error, never a 500.
            remote = conn.remote_address[0] if conn.remote_address else ""
            return self.refuse(conn, errors.H_BAD_REQUEST, f"duplicated header {exc}: send it once", remote)

    async def _admit(self, conn: WsdServerConnection, request: Request) -> Response | None:
        d = self.daemon
        path, query_s = request_target(request.path)
        if path == "/healthz":
            return json_response(200, {"status": "alive"})
        if path == "/readyz":
            if d.ready and not d.draining:
                return json_response(200, {"status": "ready"})
            return json_response(503, {"status": "draining" if d.draining else "starting"})
        peer = conn.remote_address[0] if conn.remote_address else ""
        relayed = conn.proxy  # the client's address a PROXY preamble gave (None: no preamble)
        try:  # the client behind trusted proxies (server.trusted_proxies); any other peer is the client
            remote = d.proxies.client(peer, relayed if type(relayed) is str else None,
                                      request.headers.get_all(d.proxies.header) if d.proxies.header else ())
        except ValueError as exc:
            return self.refuse(conn, errors.H_BAD_REQUEST, str(exc), peer)
        if path == "/metrics":
            if not d.metrics_allowed(remote):
                return json_response(403, {"error": "forbidden", "message": "metrics not allowed from here"})
            return text_response(200, d.prometheus_text(), "text/plain; version=0.0.4; charset=utf-8")
        pool = d.pools_by_path.get(path)
        pool_id = pool.id if pool is not None else ""
        # Every attempt counts against its address, whatever comes of it: a flood of bad requests from
        # one address meets 429 after the budget, not an endless stream of 403/404 (and their records).
        now = d.loop.time()
        ok, retry = d.ip_limiter.try_take(remote, now)
        if not ok:
            return self.refuse(conn, errors.H_RATE_LIMITED, "too many connection attempts from this address",
                               remote, pool_id, retry_after=retry)
        headers = request.headers
        dup = duplicated_header(headers)
        if dup is not None:
            return self.refuse(conn, errors.H_BAD_REQUEST, f"duplicated header {dup}: send it once", remote, pool_id)
        if pool is None:
            return self.refuse(conn, errors.H_NO_POOL, f"no pool at {shown_path(path)}", remote)
        if d.draining or not d.ready:
            return self.refuse(conn, errors.H_DRAINING, "server is draining", remote, pool.id)
        if pool.networks and not ip_in(remote, pool.networks):
            return self.refuse(conn, errors.H_IP_FORBIDDEN, f"address {remote} not allowed in pool {pool.id}",
                               remote, pool.id)
        origin = headers.get("Origin")
        if pool.origins and origin is not None and origin not in pool.origins:
            return self.refuse(conn, errors.H_ORIGIN_FORBIDDEN,
                               f"origin {shown_path(origin)} not allowed in pool {pool.id}", remote, pool.id)
        query = parse_qs(query_s)
        offered = [p.strip() for h in headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",")]
        token, source = extract_token(headers, query, offered)
        if token is None:
            return self.refuse(conn, errors.H_MISSING_TOKEN, "no token: send Authorization: Bearer, ?token= or "
                               "the bearer.<jwt> subprotocol", remote, pool.id)
        try:
            claims = d.verifier.verify(token)
        except AuthError as exc:
            spec = errors.H_EXPIRED_TOKEN if exc.code == "token_expired" else errors.H_INVALID_TOKEN
            return self.refuse(conn, spec, exc.message, remote, pool.id)
        user = claims.user_id
        if claims.pool and claims.pool != pool.id:
            return self.refuse(conn, errors.H_POOL_FORBIDDEN, f"token is for pool {claims.pool}", remote, pool.id,
                               user_id=user)
        if pool.roles and not pool.roles.intersection(claims.roles):
            return self.refuse(conn, errors.H_ROLE_FORBIDDEN, f"pool {pool.id} needs one of the roles "
                               f"{sorted(pool.roles)}", remote, pool.id, user_id=user)
        ok, retry = d.user_limiter.try_take(f"{claims.company_id}/{user}", now)  # user ids are per tenant
        if not ok:
            return self.refuse(conn, errors.H_RATE_LIMITED, "too many connections per minute for this user",
                               remote, pool.id, retry_after=retry, user_id=user)
        hub = d.hub
        want = query.get("session", [""])[0]
        # A connection of this user and tenant here still holding the session: the client reconnected before the
        # server saw the old connection drop. It is taken over once the handshake is accepted, so this one
        # replaces it rather than adds one: the connection limits do not refuse it.
        holder = hub.session_holder(want, user) if want and hub.session_ttl > 0 else None  # TTL 0: no resume
        if holder is not None and holder.company_id != claims.company_id:
            holder = None
        if holder is None:
            if hub.user_connections(user, claims.company_id) >= d.config.limits.max_connections_per_user:
                return self.refuse(conn, errors.H_USER_FULL, "too many open connections for this user", remote,
                                   pool.id, retry_after=60, user_id=user)
        # A takeover within the pool replaces a connection: no limit refuses it. From another pool it
        # moves one.
        moving = holder is not None and holder.pool.id != pool.id
        if holder is None or moving:
            refusal = self.capacity_refusal(pool.id, leaving=holder.pool.id if moving and holder else "")
            if refusal == capacity.MANAGER_FULL:
                return self.refuse(conn, errors.H_MANAGER_FULL, "manager is full", remote, pool.id, user_id=user)
            if refusal:
                return self.refuse(conn, errors.H_POOL_FULL, self.pool_full_text(pool, refusal), remote,
                                   pool.id, user_id=user, detail={"limit": refusal})
        session = None
        session_id = None
        takeover = False
        since_s = query.get("since", [""])[0]
        since: dict[str, StreamPosition] = {}
        if since_s:
            if not want:
                return self.refuse(conn, errors.H_BAD_REQUEST, "since is only taken with session", remote, pool.id,
                                   user_id=user)
            try:
                since = parse_since(since_s, d.config.limits.max_subscriptions_per_connection)
            except ValueError as exc:
                return self.refuse(conn, errors.H_BAD_REQUEST, str(exc), remote, pool.id, user_id=user)
        if want:
            if holder is not None:
                takeover, session_id = True, want  # from the old connection's own state
            elif hub.session_ending(want, user, claims.company_id):
                pass  # closing with 1000 or kicked: the session is over (a new one is started)
            else:
                # Only read here: the session is taken by the handler once the handshake is accepted, so a
                # refusal after this point (by websockets, or a full manager) leaves it to a later resume.
                blob = await d.engine.load_session(want)
                state = saved.decode(blob) if blob is not None else None
                # A session is only ever resumed by the same user and tenant that left it.
                if state is not None and state.user_id == user and state.company_id == claims.company_id:
                    session, session_id = state, want
        is_admin = d.config.auth.admin_role in claims.roles
        principal = Principal(user, claims.company_id, frozenset(claims.roles), pool.id, pool.type, is_admin)
        adm = Admission(claims=claims, pool=pool, principal=principal, remote=remote, session=session,
                        session_id=session_id or secrets.token_urlsafe(18), since=since, takeover=takeover,
                        subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else "",
                        token_source=source, user_agent=headers.get("User-Agent", ""))
        conn.admission = adm
        sndbuf = d.config.manager.socket_send_buffer_bytes
        if sndbuf:
            sock = conn.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        # Compression is chosen per pool: only offer permessage-deflate where the pool allows it.
        offer_extensions(conn, d.deflate if pool.compression else [])
        return None

    def select_subprotocol(self, conn: WsdServerConnection, subprotocols: Any) -> str | None:
        # Echo wsd.v1, never the bearer.<jwt> entry.
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    # -- the connection -----------------------------------------------------------------------------------
    async def opened(self, ws: WsdServerConnection) -> None:
        """The handshake was accepted (101 sent): register the connection, welcome it, restore its session.

        Messages the client sends meanwhile wait for this to end (``WsdServerConnection`` serves them after).
        """
        d = self.daemon
        hub = d.hub
        adm: Admission | None = ws.admission
        ws.admission = None
        ws.proxy = None  # the address a PROXY preamble gave is adm.remote's now
        if adm is None:
            ws.close_soon(errors.INTERNAL.code, "no admission", hub.close_timeout())
            return
        hub.stats.observe_handshake(time.perf_counter() - ws.accepted)
        now = d.loop.time()
        conn = Conn(hub.new_id(), ws, adm.pool, adm.claims, adm.principal, adm.session_id, now, time.time())
        conn.remote_address = adm.remote
        conn.user_agent = adm.user_agent[:256]
        conn.subprotocol = adm.subprotocol
        conn.token_source = adm.token_source
        # The handshake's request and response (headers, the token in them) are not needed once open: the
        # connection let the request go when it sent the response (and its parser the request it parsed).
        response = ws.response
        ws.response = None
        if response is not None:
            ext = response.headers.get("Sec-WebSocket-Extensions")
            conn.extensions = tuple(e.strip() for e in ext.split(",")) if ext else ()
        # Handshakes run concurrently: the limits are checked again now that this one is about to count, with
        # nothing awaited between the last check and the register (another handshake could take the seat).
        session = adm.session
        holder = hub.session_holder(conn.session_id, conn.user_id)
        # (also a session resumed from the engine that another connection here resumed meanwhile)
        if adm.takeover or (session is not None and holder is not None):
            if holder is not None and holder.company_id == conn.company_id:
                # Replaced at once (no await): a takeover within the pool is never refused; from another
                # pool it moves the seat.
                if holder.pool.id != adm.pool.id and self.capacity_refusal(adm.pool.id, leaving=holder.pool.id):
                    ws.close_soon(errors.TRY_AGAIN.code, errors.TRY_AGAIN.reason, hub.close_timeout())
                    return
                session = await self._take_over(conn)
            else:
                # The holder went meanwhile: this connection adds one. Its session is only read from the
                # engine, so a refusal leaves it for the next resume.
                session = await self._take_over(conn)
                if self.capacity_refusal(adm.pool.id):
                    ws.close_soon(errors.TRY_AGAIN.code, errors.TRY_AGAIN.reason, hub.close_timeout())
                    return
        elif self.capacity_refusal(adm.pool.id):
            ws.close_soon(errors.TRY_AGAIN.code, errors.TRY_AGAIN.reason, hub.close_timeout())
            return
        hub.register(conn)
        ws.wsd_conn = conn
        WsdServerConnection.wsd_hub = hub  # one hub for every connection: a class attribute, no per-connection slot
        if session is not None:
            conn.resumed = True
            conn.reconnections = session.reconnections + 1
            conn.restoring = session  # until _start has it all back (a takeover meanwhile takes the rest from it)
        d.emit("connect", connection_id=conn.id, pool=conn.pool.id, user_id=conn.user_id,
               company_id=conn.company_id, remote=conn.remote_address, resumed=conn.resumed)
        try:
            if session is not None and not d.engine.durable_sessions:
                # Taken only now that the handshake is accepted: a refused resume leaves it for the next try.
                # (A durable engine keeps it: it is written again as this connection's live session.)
                await d.engine.drop_session(conn.session_id)
            if session is not None and adm.session is not None and d.engine.shared:
                # Resumed from the engine: a connection of another node may still hold the session (its client
                # reconnected elsewhere before that node saw the drop). It ends there with 4011.
                try:
                    await d.engine.announce_takeover(conn.session_id, session.owner)
                except Exception as exc:  # noqa: BLE001  # that connection then ends by itself (missed pongs)
                    log.warning("announcing the takeover of a session failed: %s", exc)
            await self._start(conn, session, adm.since or {})
            conn.restoring = None
            # The live session reaches a durable engine at once (subscriptions), then as positions move.
            await hub.persist_session(conn)
            if adm.session is not None:
                conn.session_mark = None  # and again at the next sweep: after any late write of the old holder
        except Exception:
            # 1011 (not 1000) tells the client to reconnect, and keeps its session for resume.
            log.exception("connection %s: handler failed", conn.id)
            conn.state = "error"
            hub.stats.errors += 1
            if not conn.closing:
                hub.close(conn, errors.INTERNAL.code, errors.INTERNAL.reason)

    async def closed(self, ws: WsdServerConnection) -> None:
        """The TCP connection of a registered connection ended: keep or end its session, unregister it."""
        d = self.daemon
        hub = d.hub
        conn = ws.wsd_conn
        if conn is None:
            return
        code = ws.close_code if ws.close_code is not None else errors.ABNORMAL.code
        if code == errors.ABNORMAL.code and conn.close_code:
            # We started the close and the peer never answered it (a stalled reader is aborted):
            # report the code we closed with, not websockets' "no close frame received".
            code = conn.close_code
        reason = ws.close_reason or conn.close_reason
        hub.stats.closed(code)
        if conn.taken_over:
            pass  # the connection that took the session over owns it now: neither kept nor dropped here
        elif code not in (errors.NORMAL.code, errors.KICKED.code):
            try:
                state = saved.capture(conn)
                if conn.restoring is not None:  # it went while restoring: what it had not yet is kept too
                    state = saved.merge(state, conn.restoring)
                await hub.settle_sessions()  # a live-session write in flight must not land after this one
                await d.engine.save_session(conn.session_id, state.owner, saved.encode(state), hub.session_ttl)
            except Exception:
                log.exception("saving session failed")
        elif d.engine.durable_sessions and (conn.session_saved_at or conn.resumed):
            try:  # its live session was written: the session ends, as it always has on 1000 or a kick
                await hub.settle_sessions()
                await d.engine.drop_session(conn.session_id)
            except Exception:
                log.exception("dropping session failed")
        hub.unregister(conn)
        d.emit("disconnect", connection_id=conn.id, pool=conn.pool.id, user_id=conn.user_id, code=code,
               reason=reason)

    async def _take_over(self, conn: Conn) -> saved.Session | None:
        """Resume the session that another connection of this user still holds on this node: that connection
        is closed with 4011 and its state (subscriptions, positions, unacked messages) moves to ``conn``.
        Messages it had queued but not written are behind its positions, so the replay sends them again."""
        d = self.daemon
        hub = d.hub
        old = hub.session_holder(conn.session_id, conn.user_id)
        if old is not None and old.company_id == conn.company_id:
            state = saved.capture(old)
            if old.restoring is not None:  # it is still restoring the session: what it has not yet is taken too
                state = saved.merge(state, old.restoring)
            hub.take_over(old)
            return state
        # It closed while this handshake went on: its session was kept (or ended) as any other.
        await hub.settle_sessions()
        blob = await d.engine.load_session(conn.session_id)
        state = saved.decode(blob) if blob is not None else None
        if state is not None and state.user_id == conn.user_id and state.company_id == conn.company_id:
            return state
        conn.session_id = secrets.token_urlsafe(18)
        return None

    async def _start(self, conn: Conn, session: saved.Session | None,
                     since: dict[str, StreamPosition] | None = None) -> None:
        d = self.daemon
        hub = d.hub
        since_of = since
        restored: list[saved.SavedSub] = []
        for s in session.subs if session else []:
            # Permission is checked again on resume: the new token may carry fewer roles than the old one.
            try:
                group, inst = resolve(s.channel, conn.principal, d.config.channels)
            except ChannelError:
                continue
            if inst == s.channel:
                restored.append(msgspec.structs.replace(s, group=group))
        if session is None:
            wanted = [{"channel": ch, "mode": "realtime"} for ch in conn.pool.default_subscriptions]
        else:
            wanted = []
        subs_out = [s.channel for s in restored]
        for w in wanted:
            try:
                _, inst = resolve(w["channel"], conn.principal, d.config.channels)
                subs_out.append(inst)
            except ChannelError:
                pass
        welcome = {"type": "welcome", "connection_id": conn.id, "session_id": conn.session_id,
                   "pool": conn.pool.id, "user_id": conn.user_id, "company_id": conn.company_id,
                   "heartbeat_ms": d.config.manager.heartbeat_interval_ms, "subscriptions": subs_out,
                   "resumed": session is not None, "protocol": SUBPROTOCOL}
        hub.send_direct(conn, _encode(welcome), Priority.CRITICAL)
        if session:
            # Unacked reliable messages first: they are older than anything replayed from history.
            if session.unacked or session.next_seq > 1:  # seqs continue: never reuse one
                rs = conn.reliable = ReliableState()
                rs.next_seq = session.next_seq
                now = d.loop.time()
                for u in session.unacked:
                    data = u.payload.encode()
                    rs.unacked[u.seq] = Unacked(data, u.priority, now + u.ack_timeout_s, u.retries, u.ack_timeout_s)
                    hub.send_direct(conn, data, Priority.CRITICAL)  # ahead of the (critical) replay
        # The pool's default subscriptions (new sessions only: a resumed session restores its own).
        for w in wanted:
            try:
                group, inst = resolve(w["channel"], conn.principal, d.config.channels)
            except ChannelError:
                continue
            sub = hub.add_subscription(conn, inst, group, "realtime", None)
            # Start at the channel's live position, no history: a later resume then replays only
            # what this session missed, like an explicit subscription.
            sub.pending = []
            await self._replay(conn, sub, None, 0)
        # A resumed session: its subscriptions back, each from its saved position, then what was missed.
        for s in restored:
            group = s.group or instance_parts(s.channel)[0]
            if group not in d.config.channels:
                continue
            types = frozenset(s.types) if s.types else None
            sub = hub.add_subscription(conn, s.channel, group, s.mode, types)
            sub.pending = []
            since = StreamPosition(s.offset, s.epoch)
            told = since_of.get(s.channel) if since_of else None
            if told is not None and told.epoch:
                # The client says what it has processed: replay from there, not from what was written to the
                # old connection (which may have died in the network with messages in flight).
                since = told
            if sub.mode == HISTORICAL:
                # History only, no live feed: nothing was missed while away.
                sub.pending = None
                sub.restart(since.offset, since.epoch)
                continue
            await self._replay(conn, sub, since if since.epoch else None, None, notify=True)

    async def _replay(self, conn: Conn, sub: Any, since: StreamPosition | None, limit: int | None,
                      notify: bool = False, reply: tuple[Any, dict[str, Any]] | None = None) -> None:
        """Send history (after ``since`` or the last ``limit``), then the live messages held meanwhile."""
        hub = self.daemon.hub
        res = await hub.history(sub.channel, limit, since)
        # On resume, what an on_demand subscription missed is held for `pull`, not pushed; its offset
        # stays at the last pulled message until the client pulls.
        hold = notify and sub.mode == ON_DEMAND and sub.held is not None
        last = 0
        chosen: list[tuple[Any, bytes]] = []
        for pub in res.publications:
            if sub.types is not None and pub.type not in sub.types:
                continue
            last = pub.offset
            push = hub.push_for(conn, pub)  # shaped by the routing rules as live delivery would
            if push is not None:  # None: no rule sends it to this connection
                chosen.append((pub, push))
        recovered = res.recovered
        if not hold:
            # At most one history reply's worth, the newest: a replay `since` a position that had to be cut
            # is not a recovery (the client pages the rest with `history`).
            lim = self.daemon.config.limits
            chosen, cut = _newest_within(chosen, lim.history_max_messages, lim.history_max_bytes)
            if cut and since is not None:
                recovered = False
        if reply is not None:
            rid, result = reply
            result["position"] = {"offset": res.position.offset, "epoch": res.position.epoch}
            result["recovered"] = recovered
            result["history"] = len(chosen)
            self.reply(conn, rid, result)
        elif notify and not recovered:
            hub.send_direct(conn, _encode({"type": "recovery", "channel": sub.channel, "recovered": False,
                                           "position": {"offset": res.position.offset,
                                                        "epoch": res.position.epoch}}), Priority.CRITICAL)
        for pub, push in chosen:
            if hold:
                if len(sub.held) == sub.held.maxlen:
                    conn.drops_overflow += 1
                    hub.stats.dropped_overflow += 1
                out = Outgoing(push, pub.priority, pub.expires_at, pub.channel, pub.offset, pub.type,
                               time.perf_counter())
                out.epoch = pub.epoch
                sub.held.append(out)
            else:
                hub.send_direct(conn, push[:-1] + HISTORY_TAIL, Priority.CRITICAL)
        if not hold:
            top = res.position.offset if res.recovered or since is None else last
            sub.advance(max(last, top), res.position.epoch)
        elif not res.recovered:
            # The old position means nothing in this stream: restart it just before what is now held.
            sub.restart(res.publications[0].offset - 1 if res.publications else res.position.offset,
                        res.position.epoch)
        else:
            sub.restart(sub.offset, res.position.epoch)
        # Live messages of the channel still held in its coalescing window are taken into ``pending`` first: written
        # after the reply, they would skip the check below (a message at the position sent twice).
        hub.flush_channel(sub.channel)
        pending = sub.pending or []
        sub.pending = None
        # Live messages held meanwhile that the position read covers (published before it, in its epoch) were
        # sent from history or precede the position the client was given: a shared engine's bus can bring them
        # after the read.
        top = 0 if hold else res.position.offset
        for out in pending:
            if out.offset and (out.offset <= last or (out.offset <= top and out.epoch == res.position.epoch)):
                continue  # already sent from history: no duplicates
            if sub.mode == BATCH or sub.mode == ON_DEMAND:
                hub.deliver_sub(sub, out)
            else:
                hub.deliver(conn, out)

    # -- client frames ------------------------------------------------------------------------------------
    def reply(self, conn: Conn, rid: Any, result: Any) -> None:
        self.daemon.hub.send_reply(conn, _encode({"id": rid, "ok": True, "result": result}))

    def error(self, conn: Conn, rid: Any, code: str, message: str) -> None:
        self.daemon.hub.send_reply(conn, _encode({"id": rid, "ok": False, "error": {"code": code,
                                                                                     "message": message}}))

    def _owed_ack(self, conn: Conn, message: str | bytes) -> bool:
        """Past the message rate, an ``ack`` that settles an unacked reliable message is still taken: it is owed for
        what the server chose to send, so a burst of reliable messages cannot get its careful client closed with
        4008. Bounded by what was sent (each settles one message); any other frame is charged as usual."""
        if isinstance(message, bytes) or len(message) > 256:
            return False
        try:
            frame = frames.decoder.decode(message)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return False
        return isinstance(frame, frames.Ack) and self.daemon.hub.ack(conn, frame.seq)

    async def on_frame(self, conn: Conn, message: str | bytes) -> None:
        if conn.closing:
            # A close is decided (rate limit, kick, expiry, ...): what the peer still sends is not
            # processed, answered, counted, audited or logged. One decision, one record.
            return
        d = self.daemon
        hub = d.hub
        now = d.loop.time()
        conn.last_activity = now
        conn.msgs_in += 1
        conn.bytes_in += len(message)
        hub.stats.received += 1
        bucket = conn.rate
        if bucket is None:
            lim = d.config.limits
            bucket = conn.rate = TokenBucket(lim.messages_per_connection_per_second, lim.message_burst, now)
        if not bucket.try_take(now):
            if conn.reliable is not None and conn.reliable.unacked and self._owed_ack(conn, message):
                return
            d.emit("rate_limited", connection_id=conn.id, user_id=conn.user_id, pool=conn.pool.id)
            d.audit("message_rate_limited", connection_id=conn.id, user_id=conn.user_id)
            hub.close(conn, errors.RATE_LIMITED.code, errors.RATE_LIMITED.reason)
            return
        if isinstance(message, bytes):
            conn.errors += 1
            self.error(conn, None, errors.BAD_REQUEST, "binary frames are not accepted: send JSON text frames")
            return
        try:
            frame = frames.decoder.decode(message)
        except RecursionError:
            # Nested far beyond limits.max_json_depth: the decoder gave up before any limit check.
            conn.errors += 1
            rid, _ = frames.salvage_id(message)
            self.error(conn, rid, errors.BAD_REQUEST,
                       f"JSON nested deeper than {d.config.limits.max_json_depth} levels (limits.max_json_depth)")
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            conn.errors += 1
            rid, op = frames.salvage_id(message)
            text = str(exc)
            code = errors.BAD_REQUEST
            if "`$.op`" in text or (op is not None and op not in frames.OPS):
                code = errors.UNKNOWN_OP
                what = repr(op) if op is not None else f"({text})"  # op unreadable: the decoder's words
                text = f"unknown op {what}; expected one of {', '.join(frames.OPS)}"
            elif op is None and "Object missing required field `op`" in text:
                text = "missing 'op'"
            else:
                text = frames.explain(text)
            self.error(conn, rid, code, text)
            return
        try:
            await self.dispatch(conn, frame)
        except ChannelError as exc:
            self.error(conn, getattr(frame, "id", None), exc.code, exc.message)
            if getattr(exc, "costly", False):
                # Data that took the whole validation budget is a bad frame, judged at once: a burst of them
                # would keep the loop busy before the next sweep (warned at 5, closed with 1011 at 10).
                conn.errors += 1
                hub.check_health(conn)
        except Exception:
            self.internal_error(conn, frame)

    def internal_error(self, conn: Conn, frame: Any) -> None:
        """A bug or a failed backend while serving a frame: logged once, answered ``internal``, closed 1011.

        1011 (not 1000) tells the client to reconnect, and keeps its session for resume; frames that
        follow are ignored (the close is decided), so this is logged once per connection.
        """
        hub = self.daemon.hub
        op = frame.__class__.__name__.lower()
        log.exception("connection %s: internal error serving %s", conn.id, op)
        hub.stats.errors += 1
        conn.errors += 1
        self.daemon.emit("internal_error", connection_id=conn.id, user_id=conn.user_id, op=op)
        self.error(conn, getattr(frame, "id", None), errors.INTERNAL_ERROR,
                   "internal error: the connection is closed with 1011; resume and retry")
        hub.close(conn, errors.INTERNAL.code, errors.INTERNAL.reason)

    def dispatch(self, conn: Conn, f: frames.ClientFrame) -> Coroutine[Any, Any, None]:
        """Serve one decoded client frame: the handler of its op (``op_<op>``, by ``OP_HANDLERS``).

        Frames arrive decoded and validated (types, modes, priorities): a handler checks what only the
        connection and the config can tell (rights, limits, subscriptions). Every frame type has exactly
        one handler, checked when this module is imported.
        """
        return OP_HANDLERS[type(f)](self, conn, f)

    async def op_subscribe(self, conn: Conn, f: frames.Subscribe) -> None:
        d = self.daemon
        hub = d.hub
        group, inst = resolve(f.channel, conn.principal, d.config.channels)
        if inst not in conn.subs and len(conn.subs) >= d.config.limits.max_subscriptions_per_connection:
            return self.error(conn, f.id, errors.TOO_MANY_SUBSCRIPTIONS,
                              f"at most {d.config.limits.max_subscriptions_per_connection} subscriptions")
        if f.history is not None and f.history.limit is not None and f.history.limit < 0:
            return self.error(conn, f.id, errors.BAD_REQUEST, "history.limit must be >= 0")
        if f.filter is not None and f.filter.types:
            lim = d.config.limits
            if len(f.filter.types) > lim.max_filter_types:
                return self.error(conn, f.id, errors.FILTER_TOO_LARGE,
                                  f"filter.types has {len(f.filter.types)} types; at most {lim.max_filter_types}")
            if max(map(len, f.filter.types)) > lim.max_filter_type_length:
                return self.error(conn, f.id, errors.FILTER_TOO_LARGE,
                                  f"a filter.types entry is longer than {lim.max_filter_type_length} characters")
        types = frozenset(f.filter.types) if f.filter is not None and f.filter.types else None
        sub = hub.add_subscription(conn, inst, group, f.mode, types)
        result: dict[str, Any] = {"channel": inst, "group": group, "mode": f.mode, "subscription_id": sub.id}
        want_history = f.history is not None or f.mode == HISTORICAL
        sub.pending = []
        if not want_history:
            # No history wanted: still read the channel's position (shared engines keep it outside
            # this process), holding live messages meanwhile so the reply comes first.
            await self._replay(conn, sub, None, 0, reply=(f.id, result))
        else:
            since = f.history.since if f.history is not None else None
            limit = f.history.limit if f.history is not None else None
            sp = StreamPosition(since.offset, since.epoch) if since is not None else None
            await self._replay(conn, sub, sp, limit, reply=(f.id, result))
        await hub.persist_session(conn)  # a durable engine has the new subscription at once
        return None

    async def op_unsubscribe(self, conn: Conn, f: frames.Unsubscribe) -> None:
        d = self.daemon
        _, inst = resolve(f.channel, conn.principal, d.config.channels)
        if not d.hub.remove_subscription(conn, inst):
            return self.error(conn, f.id, errors.NOT_SUBSCRIBED, f"not subscribed to {inst}")
        self.reply(conn, f.id, {"channel": inst})
        await d.hub.persist_session(conn)
        return None

    async def op_history(self, conn: Conn, f: frames.History) -> None:
        d = self.daemon
        hub = d.hub
        _, inst = resolve(f.channel, conn.principal, d.config.channels)
        sp = StreamPosition(f.since.offset, f.since.epoch) if f.since is not None else None
        if f.limit is not None and f.limit <= 0:
            return self.error(conn, f.id, errors.BAD_REQUEST, "limit must be >= 1")
        lim = d.config.limits
        want = f.limit
        if sp is not None:  # read one page (and one more to know whether there is more), not everything
            page = lim.history_max_messages + 1
            want = page if f.limit is None else min(f.limit, page)
        res = await hub.history(inst, want, sp)
        # Each message is the bytes stored at publish, spliced in: no decode/encode per message.
        msgs, last = _capped(res.publications, lim.history_max_messages, lim.history_max_bytes,
                             lambda pub: hub.history_push_for(conn, pub))
        if last is None and want != f.limit and res.publications and len(res.publications) == want:
            last = res.publications[-1]  # the page was read in full, some left out: there may be more
        result: dict[str, Any] = {"channel": inst, "recovered": res.recovered,
                                  "position": {"offset": res.position.offset, "epoch": res.position.epoch},
                                  "more": last is not None}
        if last is not None:
            result["next"] = {"offset": last.offset, "epoch": last.epoch}
        head = _encode({"id": f.id, "ok": True, "result": result})
        payload = head[:-2] + b',"messages":[' + b",".join(msgs) + b"]}}"
        hub.send_direct(conn, payload, Priority.CRITICAL)
        return None

    async def op_pull(self, conn: Conn, f: frames.Pull) -> None:
        d = self.daemon
        hub = d.hub
        _, inst = resolve(f.channel, conn.principal, d.config.channels)
        hub.flush_channel(inst)  # a pull sees everything published before it, coalesced or not
        sub = conn.subs.get(inst)
        if sub is None or sub.mode != ON_DEMAND:
            return self.error(conn, f.id, errors.NOT_SUBSCRIBED, f"no on_demand subscription to {inst}")
        if f.limit is not None and f.limit <= 0:
            return self.error(conn, f.id, errors.BAD_REQUEST, "limit must be >= 1")
        held = sub.held
        lim = d.config.limits
        n = min(len(held) if held else 0, lim.history_max_messages)
        if f.limit is not None:
            n = min(n, f.limit)
        now = d.loop.time()
        items = []
        size = 0
        while held and len(items) < n:
            o = held[0]
            if items and size + len(o.payload) > lim.history_max_bytes:
                break  # the byte cap: what is left stays held for the next pull
            held.popleft()
            if o.expires_at is None or o.expires_at > now:
                items.append(o)
                size += len(o.payload) + 1
            else:
                conn.drops_expired += 1  # held past its ttl: dropped, and counted
        if items:
            sub.advance(items[-1].offset, items[-1].epoch)
        conn.msgs_out += len(items)
        remaining = len(held) if held else 0
        payload = (b'{"id":' + _encode(f.id) + b',"ok":true,"result":{"channel":' + _encode(inst)
                   + b',"remaining":' + str(remaining).encode()
                   + b',"more":' + (b"true" if remaining else b"false")
                   + b',"messages":[' + b",".join(o.payload for o in items) + b"]}}")
        hub.send_direct(conn, payload, Priority.CRITICAL)
        return None

    async def op_publish(self, conn: Conn, f: frames.Publish) -> None:
        if conn.closing:  # sent before the client saw our close: no reply can reach it, nothing is published
            return None
        d = self.daemon
        group, inst = resolve(f.channel, conn.principal, d.config.channels)
        gcfg = d.config.channels[group]
        if not may_publish(gcfg, conn.principal):
            return self.error(conn, f.id, errors.FORBIDDEN, f"not allowed to publish to {group}")
        if f.ttl is not None and f.ttl <= 0:
            return self.error(conn, f.id, errors.BAD_REQUEST, "ttl must be > 0 seconds")
        prio = Priority.parse(f.priority)  # one of the names or numbers: checked at decode
        _, company, user = instance_parts(inst)
        res = await d.hub.publish(channel=inst, group=group, msg_type=f.type, data=f.data, priority=int(prio),
                                  ttl_s=f.ttl, source=f"client:{conn.id}", user_id=user, company_id=company)
        return self.reply(conn, f.id, res)

    async def op_ack(self, conn: Conn, f: frames.Ack) -> None:
        if not self.daemon.hub.ack(conn, f.seq) and f.id is not None:
            self.error(conn, f.id, errors.NOT_FOUND, f"no unacked message with seq {f.seq}")

    async def op_ping(self, conn: Conn, f: frames.Ping) -> None:
        self.daemon.hub.on_app_ping(conn)
        return self.reply(conn, f.id, {"pong": time.time()})

    async def op_refresh(self, conn: Conn, f: frames.Refresh) -> None:
        """Take a new token: same user and company; the pool must still admit it; rights are checked again.

        Every subscription the new claims no longer allow is dropped, each announced with an
        ``unsubscribed`` push before the reply; a token the pool no longer admits closes with 4003.
        """
        d = self.daemon
        hub = d.hub
        try:
            claims = d.verifier.verify(f.token)
        except AuthError as exc:
            return self.error(conn, f.id, errors.INVALID_TOKEN, exc.message)
        if claims.user_id != conn.user_id or claims.company_id != conn.company_id:
            d.audit("refresh_refused", connection_id=conn.id, user_id=conn.user_id, reason="another user or company")
            return self.error(conn, f.id, errors.FORBIDDEN, "a refresh token must be for the same user and company")
        pool = conn.pool
        why = ""
        if claims.pool and claims.pool != pool.id:
            why = f"the token is for pool {claims.pool!r}"
        elif pool.roles and not pool.roles.intersection(claims.roles):
            why = f"pool {pool.id} needs one of the roles {sorted(pool.roles)}"
        if why:
            # The connection was admitted on rights this token no longer carries: end it (one decision,
            # one record), after telling the client why in the reply.
            d.audit("refresh_refused", connection_id=conn.id, user_id=conn.user_id, reason=why)
            d.emit("refresh_refused", connection_id=conn.id, user_id=conn.user_id, pool=pool.id, reason=why)
            self.error(conn, f.id, errors.FORBIDDEN, f"{why}: closing with {errors.NOT_ADMITTED.code}")
            hub.close(conn, errors.NOT_ADMITTED.code, f"{errors.NOT_ADMITTED.reason}: {why}")
            return None
        principal = Principal(conn.user_id, conn.company_id, frozenset(claims.roles), pool.id, pool.type,
                              d.config.auth.admin_role in claims.roles)
        conn.principal = principal
        conn.claims = claims
        conn.exp = claims.exp
        # Rights that came with the old token end with it: every subscription is resolved again, as a
        # new subscribe with this token would be, and kept only if it names the same instance.
        dropped: list[str] = []
        for inst in list(conn.subs):
            try:
                _, again = resolve(inst, principal, d.config.channels)
            except ChannelError as exc:
                code, message = exc.code, exc.message
            else:
                if again == inst:
                    continue
                code, message = errors.FORBIDDEN, f"not allowed to use {inst!r}"
            hub.remove_subscription(conn, inst)
            dropped.append(inst)
            hub.send_direct(conn, _encode({"type": "unsubscribed", "channel": inst, "reason": code,
                                           "message": f"after refresh: {message}"}), Priority.CRITICAL)
        if dropped:
            d.audit("subscriptions_revoked", connection_id=conn.id, user_id=conn.user_id, channels=dropped)
            await hub.persist_session(conn)
        d.emit("token_refreshed", connection_id=conn.id, user_id=conn.user_id, exp=claims.exp,
               unsubscribed=len(dropped))
        return self.reply(conn, f.id, {"exp": claims.exp})

    async def op_presence(self, conn: Conn, f: frames.Presence) -> None:
        # Who is subscribed where is tenant data: only admin-pool connections and admins may ask.
        if conn.pool.type != "admin" and not conn.principal.is_admin:
            return self.error(conn, f.id, errors.FORBIDDEN, "presence is for the admin pool")
        d = self.daemon
        _, inst = resolve(f.channel, conn.principal, d.config.channels)
        return self.reply(conn, f.id, d.hub.presence(inst))


#: frame type -> its Endpoint handler; importing this module fails when an op has no handler or a handler no op
OP_HANDLERS = frames.handler_table(Endpoint)
