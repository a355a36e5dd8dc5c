"""The control socket: a Unix stream socket (0600; its directory is created 0700) serving the control protocol.

Peers whose uid (SO_PEERCRED) is neither the daemon's nor root are refused. Requests are
bounded in size; a malformed request gets an error reply and never hurts the daemon. Each
client is served by its own task, so many wsctl clients never slow delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

import wsd
from wsd import config as wconfig
from wsd.control import protocol as P
from wsd.core.channels import ChannelError, instance_parts, resolve_for_operator
from wsd.core.outbox import PRIORITY_NAMES, Priority
from wsd.engine.base import CONTROL_DEADLINE_S
from wsd.runtime import cluster

if TYPE_CHECKING:
    from wsd.runtime.daemon import Daemon

log = logging.getLogger("wsd.control")
_encode = msgspec.json.Encoder().encode


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def prepare_socket_dir(directory: str, uid: int) -> None:
    """Create the socket's directory 0700, or check that an existing one is safe (its mode is kept)."""
    try:
        os.makedirs(os.path.dirname(directory) or "/", exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(directory, 0o700)  # the umask may have taken bits away, never added any: be exact
        return
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"control socket directory {directory} is not a directory")
    if st.st_uid not in (uid, 0):
        raise RuntimeError(f"control socket directory {directory} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {uid}) or root: refusing to use it")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise RuntimeError(f"control socket directory {directory} is writable by everyone without the sticky bit "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it")


def peer_allowed(uid: int | None, own_uid: int) -> bool:
    """The peer may talk to the daemon: same uid as the daemon, or root."""
    return uid is not None and (uid == own_uid or uid == 0)


def _str(params: dict[str, Any], key: str, default: str = "") -> str:
    v = params.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ControlError(P.E_BAD_REQUEST, f"params.{key}: expected a string")
    return v


def _int(params: dict[str, Any], key: str, default: int) -> int:
    v = params.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise ControlError(P.E_BAD_REQUEST, f"params.{key}: expected an integer")
    return v


def _list(params: dict[str, Any], key: str) -> list[str]:
    v = params.get(key) or []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ControlError(P.E_BAD_REQUEST, f"params.{key}: expected a list of strings")
    return v


def _priority(params: dict[str, Any]) -> int:
    try:
        return int(Priority.parse(params.get("priority") or "normal"))
    except ValueError:
        raise ControlError(P.E_BAD_REQUEST, f"params.priority: expected {P.one_of(P.PRIORITIES)}") from None


def _ttl(params: dict[str, Any]) -> float | None:
    v = params.get("ttl_s", params.get("ttl"))
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ControlError(P.E_BAD_REQUEST, "params.ttl_s: expected a positive number of seconds")
    return float(v)


# connections.list: how each of the protocol's sort fields orders the connections
SORTERS: dict[str, Callable[[Any], Any]] = {
    "id": lambda c: c.id, "pool": lambda c: c.pool.id, "user_id": lambda c: c.user_id,
    "company_id": lambda c: c.company_id, "state": lambda c: c.state,
    "age_s": lambda c: -c.created_mono,  # ascending age = youngest first
    "msgs_in": lambda c: c.msgs_in, "msgs_out": lambda c: c.msgs_out, "queue": lambda c: c.queue_depth(),
    "latency_ms": lambda c: c.latency_ms, "breaker": lambda c: c.breaker_state(),
    "remote_address": lambda c: c.remote_address, "bytes_out": lambda c: c.bytes_out,
    "drops": lambda c: c.drops_overflow + c.drops_expired,
}
assert set(SORTERS) == set(P.SORT_FIELDS), "every sort field of the protocol needs a sorter, and no other"


class ControlServer:
    def __init__(self, daemon: Daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self.uid = os.getuid()
        self._inode = -1
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "hello": self.m_hello, "help": self.m_help, "status": self.m_status, "pools.list": self.m_pools,
            "connections.list": self.m_connections, "connections.get": self.m_connection,
            "channels.list": self.m_channels, "subscriptions.list": self.m_subscriptions,
            "presence.get": self.m_presence, "history.get": self.m_history, "metrics.get": self.m_metrics,
            "metrics.prometheus": self.m_prometheus, "publish": self.m_publish, "broadcast": self.m_broadcast,
            "send": self.m_send, "kick": self.c_kick, "rules.list": self.m_rules, "rules.get": self.m_rule,
            "rules.set_enabled": self.m_rule_enable, "token": self.m_token, "reload": self.m_reload,
            "config.get": self.m_config, "events.recent": self.m_events_recent,
        }
        self.methods.update({"rules.test": self.m_rules_test, "publish.trace": self.m_publish_trace})
        # Each node serves its own part of these through the engine's control channel (serve_node); the node
        # wsctl talks to asks every node (or those named) and merges their replies (the c_ methods).
        self.node_methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "status": self.m_status, "connections.list": self.m_connections, "connections.get": self.m_connection,
            "connections.locate": self.n_locate, "subscriptions.list": self.m_subscriptions,
            "presence.get": self.m_presence, "kick": self.n_kick, "send": self.m_send,
            "channels.list": self.m_channels, "metrics.get": self.m_metrics, "events.recent": self.m_events_recent,
            "events.since": self.n_events_since,
        }
        self.methods.update({
            "status": self.c_status, "connections.list": self.c_connections, "connections.get": self.c_connection,
            "subscriptions.list": self.c_subscriptions, "presence.get": self.c_presence, "kick": self.c_kick,
            "send": self.c_send, "channels.list": self.c_channels, "metrics.get": self.c_metrics,
            "events.recent": self.c_events_recent,
        })
        handled = set(self.methods) | P.STREAM_METHODS
        assert handled == set(P.METHODS), f"control methods and handlers differ: {handled ^ set(P.METHODS)}"
        assert P.PRIORITIES == PRIORITY_NAMES, "the protocol's priority names must be the Priority enum's"

    async def start(self) -> None:
        """Listen on the socket path, removing only a stale socket there, in a directory that is safe.

        A directory the daemon creates is made 0700; an existing one keeps its mode, and is refused when
        another user owns it or anyone may write to it without the sticky bit. Anything at the path that
        is not a socket (a regular file, a symlink, a directory) is never removed.
        """
        path = self.path
        directory = os.path.dirname(os.path.abspath(path))
        prepare_socket_dir(directory, self.uid)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"control socket path {path} exists and is not a socket: refusing to "
                                   "replace it (remove it or choose another --socket)")
            if await self._alive():
                raise RuntimeError(f"another wsd is already serving the control socket {path}")
            os.unlink(path)  # a stale socket from a crashed daemon: nobody listens on it
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path, limit=P.MAX_REQUEST_BYTES)
        except OSError as exc:  # bind's own error names no path: say which socket could not be made
            raise RuntimeError(f"cannot create the control socket {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._inode = os.lstat(path).st_ino
        engine = self.daemon.engine
        if not engine.node_id:  # one node alone (the memory engine): it is named by its manager id
            engine.node_id = self.daemon.config.manager.manager_id
        engine.on_control = self.serve_node

    async def _alive(self) -> bool:
        try:
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(self.path), 1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        w.close()
        return True

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.clients):
            t.cancel()
        for t in list(self.clients):
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(OSError):
            # Only the socket this daemon created: never a file that replaced it meanwhile.
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        codec = P.ServerCodec(encode=_encode)
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if not peer_allowed(uid, self.uid):
                self.daemon.emit("control_refused", uid=uid)
                writer.write(codec.error(None, P.E_FORBIDDEN, f"uid {uid} may not control this wsd "
                                                              "(run wsctl as the user that runs wsd, or root)"))
                await writer.drain()
                return
            while True:
                req = codec.next_event()
                if req is P.NEED_DATA:
                    codec.receive_data(await reader.read(1 << 16))
                    continue
                if req is P.CLOSED:
                    return
                if isinstance(req, P.BadRequest):
                    writer.write(req.reply)
                    await writer.drain()
                    if req.fatal:
                        return
                    continue
                assert isinstance(req, P.Request)
                if req.method in P.STREAM_METHODS:
                    await self._stream_events(codec, req, writer)
                    return  # a stream ends only with its connection
                writer.write(await self._handle(codec, req))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("control client failed")
        finally:
            self.clients.discard(task)
            writer.close()

    async def _handle(self, codec: P.ServerCodec, req: P.Request) -> bytes:
        """The reply line to one request: its result, or an error reply (never an exception)."""
        try:
            return codec.result(req.id, await self.methods[req.method](req.params))
        except ControlError as exc:
            return codec.error(req.id, exc.code, exc.message)
        except ChannelError as exc:
            return codec.error(req.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("control method %s failed", req.method)
            return codec.error(req.id, P.E_FAILED, f"{type(exc).__name__}: {exc}")

    async def _stream_events(self, codec: P.ServerCodec, req: P.Request, writer: asyncio.StreamWriter) -> None:
        """Stream events: this node's as they happen; with a shared engine the other nodes' too, asked for what
        came after the last one seen every ``EVENT_POLL_S`` (a node that does not answer a poll is asked again at
        the next one: its events wait in its log). Each event carries the ``node`` it happened on."""
        d = self.daemon
        try:
            kinds = set(_list(req.params, "kinds"))
            backlog = _int(req.params, "backlog", 0)
            unknown = sorted(kinds - set(P.EVENT_KINDS))
            if unknown:
                raise ControlError(P.E_BAD_REQUEST, f"params.kinds: no event kind {unknown[0]!r}; "
                                                    f"one of {', '.join(P.EVENT_KINDS)}")
            scope = self._scope(req.params)
        except ControlError as exc:
            writer.write(codec.error(req.id, exc.code, exc.message))
            await writer.drain()
            return
        me = self.node
        local = scope is None or me in scope
        remote = d.engine.shared and (scope is None or any(n != me for n in scope))
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
        if local:
            d.event_subscribers.add(q)
        loop = asyncio.get_running_loop()
        after: dict[str, int] = {}
        try:
            writer.write(codec.result(req.id, {"streaming": True}))
            past: list[dict[str, Any]] = []
            if remote:  # where each node's log stands now (and its backlog)
                ok, _, _ = await self._fan("events.recent", {"limit": max(backlog, 1)}, scope)
                for node, res in ok.items():
                    evs = res.get("events") or []
                    after[node] = max((ev.get("seq", 0) for ev in evs), default=0)
                    if node != me or local:
                        past += [dict(ev, node=node) for ev in evs[-backlog:]] if backlog > 0 else []
                past.sort(key=lambda e: (e.get("ts", 0), e.get("seq", 0)))
            elif backlog > 0:
                past = [dict(ev, node=me) for ev in list(d.events)[-backlog:]]
            for ev in past[-backlog:] if backlog > 0 else ():
                if not kinds or ev["event"] in kinds:
                    writer.write(codec.event(ev))
            await writer.drain()
            next_poll = loop.time() + EVENT_POLL_S
            while True:
                wait = max(0.0, next_poll - loop.time()) if remote else None
                ev: dict[str, Any] | None = None
                if local:
                    with contextlib.suppress(asyncio.TimeoutError):
                        ev = await asyncio.wait_for(q.get(), wait)
                else:
                    await asyncio.sleep(wait or 0)
                if ev is not None:
                    if not kinds or ev["event"] in kinds:
                        writer.write(codec.event(dict(ev, node=me)))
                        await writer.drain()
                    continue
                if remote and loop.time() >= next_poll:
                    await self._poll_events(writer, codec, scope, me, after, kinds)
                    next_poll = loop.time() + EVENT_POLL_S
        finally:
            d.event_subscribers.discard(q)

    async def _poll_events(self, writer: asyncio.StreamWriter, codec: P.ServerCodec, scope: list[str] | None,
                           me: str, after: dict[str, int], kinds: set[str]) -> None:
        targets = [n for n in (scope if scope is not None else self.daemon.engine.live_nodes() or []) if n != me]
        if not targets:
            return
        try:
            res = await self.daemon.engine.control("events.since", {"after": after}, targets, EVENT_POLL_S * 2)
        except Exception as exc:  # the engine lost Redis: this poll has nothing, the next one asks again
            log.debug("asking the nodes for their events failed: %s", exc)
            return
        for node, reply in sorted(res.replies.items()):
            evs = (reply.get("result") or {}).get("events") or []
            for ev in evs:
                if isinstance(ev, dict) and (not kinds or ev.get("event") in kinds):
                    writer.write(codec.event(dict(ev, node=node)))
            if evs:
                after[node] = max(int(ev.get("seq", 0)) for ev in evs if isinstance(ev, dict))
        await writer.drain()

    # -- methods ------------------------------------------------------------------------------------------
    async def m_hello(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        return {"protocol": P.PROTOCOL_VERSION, "version": wsd.__version__, "manager_id": d.config.manager.manager_id,
                "pid": os.getpid()}

    async def m_help(self, p: dict[str, Any]) -> Any:
        return {"methods": [{"name": k, "help": v} for k, v in P.METHODS.items()]}

    async def m_status(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        hub = d.hub
        by_pool: dict[str, int] = {pid: 0 for pid in d.pools}
        by_state: dict[str, int] = {}
        for c in hub.conns.values():
            by_pool[c.pool.id] = by_pool.get(c.pool.id, 0) + 1
            by_state[c.state] = by_state.get(c.state, 0) + 1
        st = hub.stats
        proc = d.process_stats()
        return {
            "manager_id": d.config.manager.manager_id, "version": wsd.__version__,
            "uptime_s": round(time.monotonic() - d.started_mono, 1), "started_at": d.started_wall,
            "engine": d.engine.describe(), "nodes": d.engine.live_nodes() or [d.config.manager.manager_id],
            "listen": {"host": d.host_override or d.config.server.host, "port": d.bound_port,
                       "tls": bool(d.config.server.tls_cert)},
            "connections": len(hub.conns), "max_connections": d.config.manager.max_connections,
            "by_pool": by_pool, "by_state": by_state, "draining": d.draining,
            "rate_in": round(st.rate_in, 2), "rate_out": round(st.rate_out, 2),
            "rate_publish": round(st.rate_pub, 2), "latency": st.latency(),
            "pid": proc["pid"], "rss_bytes": proc["rss_bytes"], "cpu_percent": proc["cpu_percent"],
            "ephemeral_secret": d.ephemeral_secret, "config_path": d.config_path or "",
            "reloads": d.reloads, "socket": d.socket_path, "pending_restart": d.pending_restart,
            "samples": list(st.samples)[-_int(p, "samples", 0):] if _int(p, "samples", 0) else [],
        }

    async def m_pools(self, p: dict[str, Any]) -> Any:
        from wsd.runtime.metrics import pool_capacity, pool_totals

        d = self.daemon
        totals = pool_totals(d)
        rows = []
        for pool in d.pools.values():
            t = totals[pool.id]
            row = pool.describe()
            row.update({"connections": t["connections"], "msgs_in": t["messages_received"],
                        "msgs_out": t["messages_sent"], "drops": t["drops"], "errors": t["errors"],
                        "error_rate": t["error_rate"], "queued": t["queued"],
                        "shared_used": max(0, t["connections"] - pool.min_connections)})
            rows.append(row)
        return {"pools": rows, "capacity": pool_capacity(d)}

    async def m_connections(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        pool, user, company, state = _str(p, "pool"), _str(p, "user"), _str(p, "company"), _str(p, "state")
        q = _str(p, "filter").lower()
        sort = _str(p, "sort", P.DEFAULT_SORT) or P.DEFAULT_SORT
        desc = sort.startswith("-")
        key = sort.removeprefix("-")
        if key not in SORTERS:
            raise ControlError(P.E_BAD_REQUEST,
                               f"params.sort: one of {', '.join(P.SORT_FIELDS)} (prefix - for descending)")
        limit = _int(p, "limit", 100)
        offset = _int(p, "offset", 0)
        if limit < 0 or offset < 0:
            raise ControlError(P.E_BAD_REQUEST, "params.limit/offset must be >= 0")
        if state and state not in P.CONNECTION_STATES:
            raise ControlError(P.E_BAD_REQUEST, f"params.state: one of {', '.join(P.CONNECTION_STATES)}")
        if pool and pool not in d.pools:
            raise ControlError(P.E_NOT_FOUND, _no_pool(pool, d.pools))
        now, wall = d.loop.time(), time.time()
        # Filter and sort on the Conn objects and build rows for one page only: a dashboard paging
        # 10,000 connections every second must not stall delivery building 10,000 dicts.
        conns = []
        for c in d.hub.conns.values():
            if pool and c.pool.id != pool or user and c.user_id != user or company and c.company_id != company:
                continue
            if state and c.state != state:
                continue
            if q and q not in f"{c.id} {c.pool.id} {c.user_id} {c.company_id} {c.state} {c.remote_address}".lower():
                continue
            conns.append(c)
        conns.sort(key=SORTERS[key], reverse=desc)
        cap = d.config.manager.message_buffer_size
        page = [_row(c.summary(now, wall), cap) for c in conns[offset:offset + limit]]
        return {"total": len(conns), "offset": offset, "limit": limit, "items": page}

    def _conn(self, p: dict[str, Any]) -> Any:
        cid = _str(p, "id")
        conn = self.daemon.hub.conns.get(cid)
        if conn is None:
            matches = [c for k, c in self.daemon.hub.conns.items() if cid and k.startswith(cid)]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise ControlError(P.E_AMBIGUOUS, f"connection id prefix {cid!r} is ambiguous: {len(matches)} "
                                                  "connections match; give more characters")
            raise ControlError(P.E_NOT_FOUND, f"no connection {cid!r}")
        return conn

    async def m_connection(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        c = self._conn(p)
        now, wall = d.loop.time(), time.time()
        out = c.summary(now, wall)
        ob = c.outbox
        out.update({
            "info": {"remote_address": c.remote_address, "user_agent": c.user_agent,
                     "protocol_version": c.protocol_version, "extensions": list(c.extensions),
                     "subprotocol": c.subprotocol, "token_source": c.token_source, "session_id": c.session_id,
                     "created_at": c.created_at, "resumed": c.resumed},
            "auth": c.claims.as_dict(),
            "subscriptions": [s.describe() for s in c.subs.values()],
            "queue": {"depth": c.queue_depth(), "capacity": d.config.manager.message_buffer_size,
                      "by_priority": dict(zip(P.PRIORITIES,
                                              ob.depth_by_priority() if ob is not None else (0, 0, 0, 0))),
                      "dropped_overflow": c.drops_overflow, "dropped_expired": c.drops_expired},
            "breaker": {"state": c.breaker_state(),
                        "failures": c.breaker.failures if c.breaker is not None else 0,
                        "opened_count": c.breaker.opened_count if c.breaker is not None else 0},
            "reliable": ({"next_seq": c.reliable.next_seq, "unacked": len(c.reliable.unacked),
                          "resent": c.reliable.resent, "given_up": c.reliable.given_up}
                         if c.reliable is not None else None),
            "metrics": c.metrics(now),
            "health": {"latency_ms": round(c.latency_ms, 2),
                       "throughput_msgs_s": round(c.msgs_out / max(1.0, now - c.created_mono), 3),
                       "error_rate": round(c.errors / c.msgs_in, 4) if c.msgs_in else 0.0,
                       "uptime_s": round(now - c.created_mono, 1)},
            "exp": c.exp,
            "events": [e for e in d.events if e.get("connection_id") == c.id][-20:],
        })
        return out

    async def m_channels(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        hub = d.hub
        hist = d.engine.channels()
        instances: dict[str, dict[str, Any]] = {}
        for name in set(hist) | set(hub.by_channel):
            subs = hub.by_channel.get(name, {})
            h = hist.get(name, {})
            instances[name] = {"channel": name, "group": instance_parts(name)[0], "subscribers": len(subs),
                               "users": len({s.conn.user_id for s in subs.values()}),
                               "history_depth": h.get("depth", 0), "offset": h.get("offset", 0),
                               "epoch": h.get("epoch", "")}
        groups = []
        from wsd.core.channels import GROUP_TYPE_NAMES
        for gid, g in d.config.channels.items():
            mine = [v for v in instances.values() if v["group"] == gid]
            groups.append({"group_id": gid, "name": g.name or gid, "type": g.type,
                           "type_name": GROUP_TYPE_NAMES[g.type], "history_size": g.history_size,
                           "history_ttl_s": g.history_ttl_s, "publishers": list(g.publishers),
                           "instances": len(mine), "subscribers": sum(v["subscribers"] for v in mine)})
        return {"groups": groups, "instances": sorted(instances.values(), key=lambda v: v["channel"])}

    async def m_subscriptions(self, p: dict[str, Any]) -> Any:
        hub = self.daemon.hub
        cid, ch = _str(p, "connection"), _str(p, "channel")
        if cid:
            conn = self._conn({"id": cid})
            subs = list(conn.subs.values())
        elif ch:
            subs = list(hub.by_channel.get(ch, {}).values())
        else:
            subs = [s for c in hub.conns.values() for s in c.subs.values()]
        limit = _int(p, "limit", 1000)
        rows = [dict(s.describe(), user_id=s.conn.user_id, pool=s.conn.pool.id) for s in subs[:limit]]
        by_mode: dict[str, int] = {}
        for s in subs:
            by_mode[s.mode] = by_mode.get(s.mode, 0) + 1
        return {"total": len(subs), "by_mode": by_mode, "items": rows}

    async def m_presence(self, p: dict[str, Any]) -> Any:
        _, inst = resolve_for_operator(_str(p, "channel"), self.daemon.config.channels)
        return self.daemon.hub.presence(inst)

    async def m_history(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        _, inst = resolve_for_operator(_str(p, "channel"), d.config.channels)
        limit = _int(p, "limit", 50)
        res = await d.engine.history(inst, limit=limit)
        return {"channel": inst, "position": {"offset": res.position.offset, "epoch": res.position.epoch},
                "messages": [{"offset": x.offset, "epoch": x.epoch, "type": x.type, "ts": x.ts,
                              "priority": P.PRIORITIES[x.priority], "data": x.data,
                              "source": x.source, **({"enc": x.enc} if x.enc else {})}
                             for x in res.publications]}

    async def m_metrics(self, p: dict[str, Any]) -> Any:
        from wsd.runtime.metrics import metrics_snapshot

        return metrics_snapshot(self.daemon)

    async def m_prometheus(self, p: dict[str, Any]) -> Any:
        return {"text": self.daemon.prometheus_text()}

    async def m_publish(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        group, inst = resolve_for_operator(_str(p, "channel"), d.config.channels)
        _, company, user = instance_parts(inst)
        return await d.hub.publish(channel=inst, group=group, msg_type=_str(p, "type", "message") or "message",
                                   data=p.get("data"), priority=_priority(p), ttl_s=_ttl(p), source="control",
                                   user_id=user, company_id=company)

    async def m_broadcast(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        pools = _list(p, "pools") or ([_str(p, "pool")] if _str(p, "pool") else [])
        companies = _list(p, "companies") or ([_str(p, "company")] if _str(p, "company") else [])
        for pl in pools:
            if pl not in d.pools:
                raise ControlError(P.E_NOT_FOUND, _no_pool(pl, d.pools))
        return await d.hub.publish(channel="", group="", msg_type=_str(p, "type", "broadcast") or "broadcast",
                                   data=p.get("data"), priority=_priority(p), ttl_s=_ttl(p), source="control",
                                   pools=pools, companies=companies, broadcast=True)

    async def m_send(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        conn = self._conn({"id": _str(p, "connection_id") or _str(p, "id")})
        from wsd.engine.base import Publication
        from wsd.runtime.hub import Outgoing, encode_push

        ttl = _ttl(p)
        pub = Publication(id="", channel="", group="", type=_str(p, "type", "direct") or "direct",
                          priority=_priority(p), data=p.get("data"), ts=round(time.time(), 6), source="control",
                          ttl_s=ttl, expires_at=(d.loop.time() + ttl) if ttl else None)
        d.hub.flush_all()  # a send never overtakes channel messages published before it
        d.hub.deliver(conn, Outgoing(encode_push(pub), pub.priority, pub.expires_at, "", 0, pub.type,
                                     time.perf_counter()))
        d.hub.stats.delivered += 1
        return {"delivered": 1, "connection_id": conn.id}

    async def n_kick(self, p: dict[str, Any]) -> Any:
        """This node's part of a kick: whole connection ids (the cluster located them), or every connection of
        the users, company or pool named (combined, they narrow each other)."""
        d = self.daemon
        ids = _list(p, "ids")
        users = _list(p, "users") or ([_str(p, "user")] if _str(p, "user") else [])
        company, pool = _str(p, "company"), _str(p, "pool")
        if not (ids or users or company or pool):
            raise ControlError(P.E_BAD_REQUEST, "name connection ids, users, a company or a pool")
        if ids:
            conns = d.hub.select(ids=ids)
        else:
            seen: dict[str, Any] = {}
            for user in users or [""]:
                for c in d.hub.select(user=user, company=company, pool=pool):
                    seen[c.id] = c
            conns = list(seen.values())
        n = d.hub.kick(conns, _str(p, "reason", "kicked") or "kicked")
        return {"closed": n, "ids": [c.id for c in conns]}

    async def n_locate(self, p: dict[str, Any]) -> Any:
        """The whole ids of this node's connections that each id names (itself, or the connections it is a
        prefix of: at most two, enough to tell a unique prefix from an ambiguous one)."""
        conns = self.daemon.hub.conns
        out: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for cid in _list(p, "ids")[:1000]:
            if cid in conns:
                out[cid] = [cid]
            elif cid:
                hits = [k for k in conns if k.startswith(cid)]
                out[cid], counts[cid] = hits[:2], len(hits)
        return {"ids": out, "counts": counts}

    async def n_events_since(self, p: dict[str, Any]) -> Any:
        """This node's events after the seq the streaming node saw last (all it keeps when the node restarted
        since: its seq went back), at most 1000."""
        after = p.get("after") or {}
        seq = after.get(self.daemon.engine.node_id, 0) if isinstance(after, dict) else 0
        if not isinstance(seq, int):
            raise ControlError(P.E_BAD_REQUEST, "params.after: node id -> seq")
        events = list(self.daemon.events)
        if events and events[-1].get("seq", 0) < seq:
            seq = 0
        return {"events": [ev for ev in events if ev.get("seq", 0) > seq][:1000]}

    async def m_rules(self, p: dict[str, Any]) -> Any:
        r = self.daemon.hub.rules
        return {"rules": r.describe(), "metrics": _router_metrics(r)}

    async def m_rule(self, p: dict[str, Any]) -> Any:
        try:
            return self.daemon.hub.rules.get(_str(p, "id"))
        except KeyError:
            raise ControlError(P.E_NOT_FOUND, f"no rule {_str(p, 'id')!r}") from None

    async def m_rule_enable(self, p: dict[str, Any]) -> Any:
        rid = _str(p, "id")
        enabled = p.get("enabled")
        if not isinstance(enabled, bool):
            raise ControlError(P.E_BAD_REQUEST, "params.enabled: expected true or false")
        try:
            self.daemon.hub.rules.set_enabled(rid, enabled)
        except KeyError:
            raise ControlError(P.E_NOT_FOUND, f"no rule {rid!r}") from None
        self.daemon.emit("rule_changed", rule_id=rid, enabled=enabled)
        return self.daemon.hub.rules.get(rid)

    async def m_token(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        if d.signer is None:
            raise ControlError(P.E_FAILED, "this wsd holds no signing key (auth.private_key_file is not set): "
                                           "mint tokens with your identity provider")
        user = _str(p, "user")
        if not user:
            raise ControlError(P.E_BAD_REQUEST, "params.user: required")
        pool = _str(p, "pool")
        if pool and pool not in d.pools:
            raise ControlError(P.E_NOT_FOUND, f"no pool {pool!r}")
        ttl = p.get("ttl_s")
        if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ControlError(P.E_BAD_REQUEST, "params.ttl_s: expected a positive number")
        from wsd.core.channels import ID_RULE, valid_segment

        company = _str(p, "company")
        for key, value in (("user", user), ("company", company)):
            if value and not valid_segment(value):
                raise ControlError(P.E_BAD_REQUEST, f"params.{key}: {value!r} is not a plain id: {ID_RULE}")
        token, exp = d.signer.sign(user, company, _list(p, "roles"), pool, ttl)
        d.audit("token_minted", user_id=user, company_id=company, roles=_list(p, "roles"), pool=pool, exp=exp)
        return {"token": token, "exp": exp, "user": user, "company": company, "roles": _list(p, "roles"),
                "pool": pool}

    async def m_reload(self, p: dict[str, Any]) -> Any:
        res = self.daemon.reload()
        if not res["ok"]:
            raise ControlError(P.E_FAILED, "reload refused, the running config stays:\n" + "\n".join(res["errors"]))
        return res

    async def m_config(self, p: dict[str, Any]) -> Any:
        """The running config (the command line's overrides in it), what the command line set, and the
        file's values that wait for a restart."""
        d = self.daemon
        overrides = [{"key": k, "flag": flag, "value": v} for k, (flag, v) in d.overrides().items()]
        return {"path": d.config_path or "", "toml": wconfig.dump_config(d.config, redact=True),
                "config": wconfig.config_to_dict(d.config, redact=True), "overrides": overrides,
                "pending_restart": d.pending_restart, "listen_port": d.bound_port}

    async def m_events_recent(self, p: dict[str, Any]) -> Any:
        n = _int(p, "limit", 100)
        return {"events": list(self.daemon.events)[-n:] if n else []}

    # -- where does a message go: rules.test (dry run) and publish.trace ------------------------------
    def _operator_message(self, p: dict[str, Any]) -> Any:
        """The Publication an operator's publish params describe (not stored, not numbered)."""
        from wsd.engine.base import Publication

        d = self.daemon
        group, inst = resolve_for_operator(_str(p, "channel"), d.config.channels)
        _, company, user = instance_parts(inst)
        user, company = _str(p, "user") or user, _str(p, "company") or company
        return Publication(id="", channel=inst, group=group, type=_str(p, "type", "message") or "message",
                           data=p.get("data"), priority=_priority(p), ts=round(time.time(), 6), ttl_s=_ttl(p),
                           source=_str(p, "source", "control") or "control", user_id=user, company_id=company)

    async def m_rules_test(self, p: dict[str, Any]) -> Any:
        hub = self.daemon.hub
        pub = self._operator_message(p)
        result = hub.explain_routing(pub)
        schema = hub.schemas.get(pub.group)
        problem = schema.problem(pub.data) if schema is not None else None
        result["message"] = {"channel": pub.channel, "group": pub.group, "type": pub.type,
                             "priority": P.PRIORITIES[pub.priority], "user_id": pub.user_id,
                             "company_id": pub.company_id, "source": pub.source, "data": pub.data}
        result["data_schema"] = ("none" if schema is None else "valid" if problem is None
                                 else {"path": problem[0], "reason": problem[1]})
        return result

    async def m_publish_trace(self, p: dict[str, Any]) -> Any:
        d = self.daemon
        if d.engine.shared:
            raise ControlError(P.E_FAILED, "tracing needs the memory engine: with a shared engine every node "
                                           "delivers from the bus")
        for key in ("user", "company"):  # a real publication: its tenant is its channel instance's, always
            if p.get(key) is not None:
                raise ControlError(P.E_BAD_REQUEST, f"params.{key}: publish.trace takes the tenant from the "
                                                    "channel instance (rules.test can try another)")
        limit = _int(p, "limit", TRACE_LIMIT)
        if limit < 0:
            raise ControlError(P.E_BAD_REQUEST, "params.limit must be >= 0")
        pub = self._operator_message(p)
        return await d.hub.publish(channel=pub.channel, group=pub.group, msg_type=pub.type, data=pub.data,
                                   priority=pub.priority, ttl_s=pub.ttl_s, source="control",
                                   user_id=pub.user_id, company_id=pub.company_id, trace=True, trace_limit=limit)

    # -- the cluster: ask every node (or those named), merge their replies ---------------------------------
    async def serve_node(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """This node's part of a control request from the engine's control channel: a reply, never an exception."""
        handler = self.node_methods.get(method)
        if handler is None or not isinstance(params, dict):
            return {"error": {"code": P.E_UNKNOWN_METHOD, "message": f"no node method {method!r}"}}
        try:
            return {"result": await handler(params)}
        except (ControlError, ChannelError) as exc:
            return {"error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.exception("control method %s (for the cluster) failed", method)
            return {"error": {"code": P.E_FAILED, "message": f"{type(exc).__name__}: {exc}"}}

    @property
    def node(self) -> str:
        return self.daemon.engine.node_id or self.daemon.config.manager.manager_id

    def _scope(self, p: dict[str, Any]) -> list[str] | None:
        """The nodes a request names: ``local`` (this node), ``node`` (node ids), or None (every node)."""
        local = p.get("local")
        if local is not None and not isinstance(local, bool):
            raise ControlError(P.E_BAD_REQUEST, "params.local: expected true or false")
        nodes = _list(p, "node")
        if local and nodes:
            raise ControlError(P.E_BAD_REQUEST, "params.local and params.node cannot be combined")
        if local:
            return [self.node]
        if not nodes:
            return None
        live = self.daemon.engine.live_nodes() or [self.node]
        for n in nodes:
            if n not in live:
                raise ControlError(P.E_NOT_FOUND, f"no live node {n!r} (nodes: {', '.join(live)})")
        return sorted(set(nodes))

    def _deadline(self, p: dict[str, Any]) -> float:
        v = p.get("deadline_s", CONTROL_DEADLINE_S)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.05 <= v <= 60:
            raise ControlError(P.E_BAD_REQUEST, "params.deadline_s: expected seconds between 0.05 and 60")
        return float(v)

    async def _fan(self, method: str, p: dict[str, Any], nodes: list[str] | None | bool = False
                   ) -> tuple[dict[str, Any], dict[str, dict[str, str]], list[str]]:
        """Ask the nodes in scope (or ``nodes``) to serve ``method``: their results, their errors, the missing."""
        scope = self._scope(p) if nodes is False else nodes
        params = {k: v for k, v in p.items() if k not in ("node", "local", "deadline_s")}
        res = await self.daemon.engine.control(method, params, scope, self._deadline(p))  # type: ignore[arg-type]
        ok, failed = cluster.split(res.replies)
        return ok, failed, res.missing

    def _answer(self, merged: dict[str, Any], ok: dict[str, Any], failed: dict[str, dict[str, str]],
                missing: list[str]) -> dict[str, Any]:
        """A merged reply with who answered; when no node gave a result, the first error is the reply's."""
        if not ok and failed:
            mine = failed.get(self.node) or next(iter(failed.values()))
            raise ControlError(mine["code"], mine["message"] + _missing_note(missing))
        if not ok and missing:
            raise ControlError(P.E_FAILED, f"no node answered within the deadline: {', '.join(missing)}")
        merged.update(node=self.node, nodes=sorted(ok), missing=missing)
        if failed:
            merged["failed"] = cluster.failures(failed)
        return merged

    async def _locate(self, ids: list[str], p: dict[str, Any]) -> tuple[dict[str, list[str]], list[str]]:
        """node -> the whole ids of the connections ``ids`` name there; ``not_found`` / ``ambiguous`` as one
        node alone would say them (a node that did not answer is named in the message)."""
        ok, failed, missing = await self._fan("connections.locate", dict(p, ids=ids))
        found: dict[str, list[tuple[str, str]]] = {i: [] for i in ids}
        counts: dict[str, int] = {}
        for node, res in ok.items():
            for cid, whole in (res.get("ids") or {}).items():
                if cid in found:
                    found[cid] += [(node, w) for w in whole]
                    counts[cid] = counts.get(cid, 0) + int((res.get("counts") or {}).get(cid, len(whole)))
        where: dict[str, list[str]] = {}
        for cid, hits in found.items():
            exact = [h for h in hits if h[1] == cid]
            hits = exact or hits
            if not hits:
                if not ok and failed:
                    self._answer({}, ok, failed, missing)
                raise ControlError(P.E_NOT_FOUND, f"no connection {cid!r}" + _missing_note(missing))
            if len(hits) > 1:
                raise ControlError(P.E_AMBIGUOUS, f"connection id prefix {cid!r} is ambiguous: "
                                                  f"{max(counts.get(cid, 0), len(hits))} connections match; "
                                                  "give more characters")
            node, whole = hits[0]
            where.setdefault(node, []).append(whole)
        return where, missing

    async def c_status(self, p: dict[str, Any]) -> Any:
        ok, failed, missing = await self._fan("status", p)
        out = self._answer(cluster.merge_status(ok, self.node) if ok else {}, ok, failed, missing)
        out["answered"] = out["nodes"]
        live = self.daemon.engine.live_nodes() or [self.node]
        out["nodes"] = sorted(set(live) | set(ok) | set(missing))  # every live node, whether asked or not
        return out

    async def c_connections(self, p: dict[str, Any]) -> Any:
        limit, offset = _int(p, "limit", 100), _int(p, "offset", 0)
        if limit < 0 or offset < 0:
            raise ControlError(P.E_BAD_REQUEST, "params.limit/offset must be >= 0")
        if offset + limit > cluster.MAX_CLUSTER_ROWS:
            raise ControlError(P.E_BAD_REQUEST, f"params.offset + params.limit: at most {cluster.MAX_CLUSTER_ROWS} "
                                                "rows (narrow with pool, user, company, state or node)")
        sort = _str(p, "sort", P.DEFAULT_SORT) or P.DEFAULT_SORT
        ok, failed, missing = await self._fan("connections.list", dict(p, offset=0, limit=offset + limit))
        return self._answer(cluster.merge_connections(ok, sort, offset, limit), ok, failed, missing)

    async def c_connection(self, p: dict[str, Any]) -> Any:
        where, missing = await self._locate([_str(p, "id")], p)
        node, (whole,) = next(iter(where.items()))
        ok, failed, late = await self._fan("connections.get", dict(p, id=whole), [node])
        out = self._answer(dict(ok.get(node) or {}), ok, failed, late)
        out["node"], out["missing"] = node, sorted(set(missing) | set(late))
        return out

    async def c_subscriptions(self, p: dict[str, Any]) -> Any:
        cid = _str(p, "connection")
        limit = _int(p, "limit", 1000)
        nodes: list[str] | None | bool = False
        missing: list[str] = []
        if cid:
            where, missing = await self._locate([cid], p)
            nodes = list(where)
            p = dict(p, connection=next(iter(where.values()))[0])
        ok, failed, late = await self._fan("subscriptions.list", p, nodes)
        out = self._answer(cluster.merge_subscriptions(ok, limit), ok, failed, late)
        out["missing"] = sorted(set(missing) | set(late))
        return out

    async def c_presence(self, p: dict[str, Any]) -> Any:
        _, inst = resolve_for_operator(_str(p, "channel"), self.daemon.config.channels)
        ok, failed, missing = await self._fan("presence.get", p)
        return self._answer(cluster.merge_presence(ok, inst), ok, failed, missing)

    async def c_channels(self, p: dict[str, Any]) -> Any:
        ok, failed, missing = await self._fan("channels.list", p)
        return self._answer(cluster.merge_channels(ok), ok, failed, missing)

    async def c_metrics(self, p: dict[str, Any]) -> Any:
        ok, failed, missing = await self._fan("metrics.get", p)
        return self._answer(cluster.merge_metrics(ok, self.node), ok, failed, missing)

    async def c_events_recent(self, p: dict[str, Any]) -> Any:
        n = _int(p, "limit", 100)
        ok, failed, missing = await self._fan("events.recent", p)
        return self._answer({"events": cluster.merge_events(ok, n)}, ok, failed, missing)

    async def c_kick(self, p: dict[str, Any]) -> Any:
        ids = _list(p, "ids")
        users = _list(p, "users") + ([_str(p, "user")] if _str(p, "user") else [])
        company, pool = _str(p, "company"), _str(p, "pool")
        if not (ids or users or company or pool):
            raise ControlError(P.E_BAD_REQUEST, "name connection ids, users, a company or a pool")
        if pool and pool not in self.daemon.pools:
            raise ControlError(P.E_NOT_FOUND, _no_pool(pool, self.daemon.pools))
        reason = _str(p, "reason", "kicked") or "kicked"
        if ids:  # every id first resolved, on whichever node holds it: all or nothing, as on one node
            where, missing = await self._locate(ids, p)
            ok: dict[str, Any] = {}
            failed: dict[str, dict[str, str]] = {}
            late: list[str] = []
            for node, whole in where.items():
                o, f, m = await self._fan("kick", {"ids": whole, "reason": reason, "deadline_s": self._deadline(p)},
                                          [node])
                ok.update(o)
                failed.update(f)
                late += m
            missing = sorted(set(missing) | set(late))
        else:
            ok, failed, missing = await self._fan("kick", dict(p, ids=None, user=None, users=users or None))
        merged = {"closed": sum(int(r.get("closed", 0)) for r in ok.values()),
                  "ids": [i for r in ok.values() for i in r.get("ids", [])],
                  "by_node": {n: int(r.get("closed", 0)) for n, r in ok.items()}}
        return self._answer(merged, ok, failed, missing)

    async def c_send(self, p: dict[str, Any]) -> Any:
        where, missing = await self._locate([_str(p, "connection_id") or _str(p, "id")], p)
        node, (whole,) = next(iter(where.items()))
        ok, failed, late = await self._fan("send", dict(p, connection_id=whole, id=None), [node])
        out = self._answer(dict(ok.get(node) or {}), ok, failed, late)
        out["node"], out["missing"] = node, sorted(set(missing) | set(late))
        return out


def _missing_note(missing: list[str]) -> str:
    return f" (no answer from node{'s' if len(missing) != 1 else ''} {', '.join(missing)})" if missing else ""


#: how often an event stream asks the other nodes of a cluster for their new events
EVENT_POLL_S = 0.5
TRACE_LIMIT = 1000  # publish.trace lists this many receivers by default (the unusual outcomes first)


def _no_pool(pool: str, pools: Any) -> str:
    return f"no pool {pool!r} (pools: {', '.join(pools)})"


def _row(row: dict[str, Any], capacity: int) -> dict[str, Any]:
    """A connection row with ``queue`` and ``breaker`` as objects, the shape ``connections.get`` gives."""
    row["queue"] = {"depth": row["queue"], "capacity": capacity}
    row["breaker"] = {"state": row["breaker"]}
    return row


def _router_metrics(r: Any) -> dict[str, Any]:
    return dict(r.metrics())
