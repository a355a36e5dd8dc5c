"""The daemon: config, pools, engine, hub, the WebSocket server, the control socket, signals.

This is the only place that owns process-wide lifecycle: start, SIGHUP reload (an invalid
file is refused and the running config stays), SIGTERM/SIGINT drain (readyz 503, every
client closed with 1001, exit 0 within a bounded time).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import resource
import secrets
import signal
import ssl
import time
from collections import deque
from typing import Any

import msgspec
import psutil
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

import wsd
from wsd import config as wconfig
from wsd import errors
from wsd.control.protocol import default_socket_path
from wsd.core.auth import TokenSigner, TokenVerifier
from wsd.core.capacity import Share
from wsd.core.forwarded import TrustedProxies
from wsd.core.net import ip_in
from wsd.core.ratelimit import KeyedLimiter, per_minute
from wsd.engine.base import Engine
from wsd.engine.memory import MemoryEngine
from wsd.runtime.control import ControlServer
from wsd.runtime.events import Events
from wsd.runtime.hub import Hub
from wsd.runtime.metrics import prometheus_text
from wsd.runtime.notify import Notifier
from wsd.runtime.server import Endpoint
from wsd.runtime.wsadapter import listen

log = logging.getLogger("wsd")


class PoolRuntime:
    """A pool as the runtime uses it: its config resolved against the server defaults."""

    __slots__ = ("batching", "compression", "default_subscriptions", "id", "max_connections", "min_connections",
                 "networks", "origins", "path", "roles", "type")

    # the pool type as an upper-case enum-style name (`type_name` in pools.list), by config name
    TYPE_NAMES = {"frontend": "FRONTEND_POOL", "mt5_client": "MT5_CLIENT_POOL", "admin": "ADMIN_POOL",
                  "api": "API_POOL"}

    def __init__(self, pool_id: str, cfg: Any, config: Any) -> None:
        self.id = pool_id
        self.type = cfg.type
        self.path = cfg.path
        self.max_connections = cfg.max_connections
        self.min_connections = cfg.min_connections
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cfg.allow_cidrs]
        origins = cfg.allowed_origins if cfg.allowed_origins is not None else config.server.allowed_origins
        self.origins = frozenset(origins)
        self.roles = frozenset(cfg.roles)
        self.default_subscriptions = list(cfg.default_subscriptions)
        self.compression = config.manager.enable_compression if cfg.compression is None else cfg.compression
        self.batching = cfg.batching

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "type_name": self.TYPE_NAMES.get(self.type, self.type),
                "path": self.path, "max_connections": self.max_connections,
                "min_connections": self.min_connections,
                "allow_cidrs": [str(n) for n in self.networks], "allowed_origins": sorted(self.origins),
                "roles": sorted(self.roles), "default_subscriptions": self.default_subscriptions,
                "compression": self.compression,
                "batching": {"enabled": self.batching.enabled, "interval_ms": self.batching.interval_ms,
                             "max_messages": self.batching.max_messages}}


# The deadline for a TCP connection to complete its WebSocket handshake (websockets' open_timeout):
# a connection that has not sent a whole upgrade request by then is closed.
HANDSHAKE_TIMEOUT_S = 10.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard limit: (limit before, limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1048576
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def make_engine(cfg: Any) -> Engine:
    if cfg.engine.type == "redis":
        try:
            from wsd.engine.redis import RedisEngine
        except ImportError:
            raise RuntimeError("engine.type = \"redis\" needs the redis extra: pip install 'wsd[redis]'") from None
        e = cfg.engine
        return RedisEngine(e.url, e.prefix, mode=e.mode, sentinels=e.sentinels, sentinel_master=e.sentinel_master,
                           sentinel_password=e.sentinel_password, cluster_nodes=e.cluster_nodes,
                           wait_replicas=e.wait_replicas)
    return MemoryEngine()


#: Settings read once at start: a reload that changes them in the file reports them as pending a restart
#: and keeps running on the values it started with.
RESTART_KEYS = (("server", "host"), ("server", "port"), ("server", "tls_cert"), ("server", "tls_key"),
                ("server", "max_message_bytes"), ("server", "backlog"), ("engine", "type"), ("engine", "url"),
                ("engine", "prefix"), ("engine", "mode"), ("engine", "sentinels"), ("engine", "sentinel_master"),
                ("engine", "sentinel_password"), ("engine", "cluster_nodes"), ("engine", "wait_replicas"),
                ("control", "socket"))


def listen_error(host: str, port: int, exc: OSError) -> str:
    """One line for a listener that could not bind, with what to do about it."""
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {addr}: the address is already in use; choose another port with --port "
                f"(or server.port), or run `wsctl status` to see whether a wsd is running there")
    if exc.errno == errno.EACCES:
        return f"cannot listen on {addr}: permission denied (ports below 1024 need privileges); use --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {addr}: no such local address; check --host (or server.host)"
    return f"cannot listen on {addr}: {exc.strerror or exc}"


class Daemon:
    def __init__(self, config: Any, *, config_path: str | None = None, host: str | None = None,
                 port: int | None = None, socket_path: str | None = None, worker: str = "",
                 shared_secret: str = "") -> None:
        self.config = config
        # A worker of `wsd serve --workers` (wsd.runtime.supervisor): its node id, a listener shared with the
        # other workers (SO_REUSEPORT), and SIGUSR2 = retire (stop accepting, then drain like SIGTERM).
        self.worker = worker
        if shared_secret:  # the supervisor's ephemeral secret: a token minted by one worker verifies on all
            self._ephemeral = shared_secret
        self.config_path = config_path
        self.host_override = host
        self.port_override = port
        self.socket_override = socket_path
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.ready = False
        self.draining = False
        self.sink = Events()
        # The sink's event log and followers, under the names the control server reads.
        self.events: deque[dict[str, Any]] = self.sink.log
        self.event_subscribers: set[asyncio.Queue[dict[str, Any]]] = self.sink.subscribers
        self.ephemeral_secret = False
        self.reloads = 0
        self._stop = asyncio.Event()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self.server: asyncio.Server | None = None
        self.control: Any = None
        # ``config`` is what runs: the file's values, the command line's overrides, and the settings
        # read once at start (RESTART_KEYS) as they were then. ``file_config`` is the file as last read.
        self.file_config = config
        self.started_config = config = self._with_overrides(config)
        self.config = config
        self.pending_restart: list[dict[str, Any]] = []
        self.bound_port = 0
        # Descriptors: the soft limit, and the descriptor number at which accepted sockets are closed
        # at once (a reserve is kept for the control socket, logs and files).
        self.fd_limit = 1024
        self.fd_alarm = 1024
        # The service manager (systemd Type=notify): READY/RELOADING/STOPPING, STATUS, the watchdog.
        self.notifier = Notifier()
        self.status_note = ""  # said in STATUS= until the next good reload (a refused one)
        self.scheme = "ws"  # wss once TLS is on: what STATUS= says it listens on
        self._service_task: asyncio.Task[None] | None = None

    # -- running values -----------------------------------------------------------------------------------
    def overrides(self) -> dict[str, tuple[str, Any]]:
        """Settings the command line set: key -> (flag, value)."""
        o: dict[str, tuple[str, Any]] = {}
        if self.host_override:
            o["server.host"] = ("--host", self.host_override)
        if self.port_override is not None:
            o["server.port"] = ("--port", self.port_override)
        if self.socket_override:
            o["control.socket"] = ("--socket", self.socket_override)
        return o

    def _with_overrides(self, cfg: Any) -> Any:
        ov = self.overrides()
        server = msgspec.structs.replace(cfg.server, host=ov.get("server.host", (0, cfg.server.host))[1],
                                         port=ov.get("server.port", (0, cfg.server.port))[1])
        control = msgspec.structs.replace(cfg.control, socket=ov.get("control.socket", (0, cfg.control.socket))[1])
        return msgspec.structs.replace(cfg, server=server, control=control)

    def _running(self, cfg: Any) -> Any:
        """``cfg`` (a file just read) with the restart-only settings at the values this process runs on."""
        started = self.started_config
        sections = {}
        for sec in ("server", "engine", "control"):
            keys = {k: getattr(getattr(started, sec), k) for s_, k in RESTART_KEYS if s_ == sec}
            sections[sec] = msgspec.structs.replace(getattr(cfg, sec), **keys)
        return msgspec.structs.replace(cfg, **sections)

    def _shown(self, key: str, value: Any) -> Any:
        if key == "engine.url":
            return wconfig.config_to_dict(msgspec.structs.replace(
                self.started_config, engine=msgspec.structs.replace(self.started_config.engine, url=value)),
                redact=True)["engine"]["url"]
        if key == "engine.sentinel_password" and value:
            return wconfig.REDACTED
        if key == "server.port" and value == 0 and self.bound_port:
            return self.bound_port  # "any free port": the one it got
        return value

    def _pending(self, file_cfg: Any) -> list[dict[str, Any]]:
        """Restart-only settings whose value in the file differs from the running one (the command
        line's overrides excepted: they win at the next start too)."""
        ov = self.overrides()
        out = []
        for sec, k in RESTART_KEYS:
            key = f"{sec}.{k}"
            if key in ov:
                continue
            running = getattr(getattr(self.started_config, sec), k)
            new = getattr(getattr(file_cfg, sec), k)
            if running != new:
                out.append({"key": key, "running": self._shown(key, running), "file": self._shown(key, new)})
        return out

    @staticmethod
    def pending_text(pending: list[dict[str, Any]]) -> str:
        def v(x: Any) -> str:
            return json.dumps(x) if isinstance(x, str) else str(x)
        return ", ".join(f"{p['key']} (running {v(p['running'])}, file {v(p['file'])})" for p in pending)

    # -- setup ----------------------------------------------------------------------------------------------
    def _apply(self, cfg: Any) -> None:
        """Everything derived from config that a reload can change."""
        self.config = cfg
        self.pools = {pid: PoolRuntime(pid, p, cfg) for pid, p in cfg.pools.items()}
        self.pools_by_path = {p.path: p for p in self.pools.values()}
        # each pool's reservation and ceiling, for the admission (wsd.core.capacity)
        self.shares = {pid: Share(p.min_connections, p.max_connections) for pid, p in self.pools.items()}
        key, sign_key = self._keys(cfg)
        self.verifier = TokenVerifier(cfg.auth, key)
        self.signer = TokenSigner(cfg.auth, sign_key) if sign_key else None
        lim = cfg.limits
        self.ip_limiter = KeyedLimiter(*per_minute(lim.connections_per_ip_per_minute))
        self.user_limiter = KeyedLimiter(*per_minute(lim.connections_per_user_per_minute))
        comp = cfg.manager.compression
        self.deflate = [ServerPerMessageDeflateFactory(
            server_max_window_bits=comp.server_max_window_bits,
            client_max_window_bits=comp.client_max_window_bits,
            compress_settings={"memLevel": comp.memory_level},
        )]
        self.metrics_networks = [ipaddress.ip_network(c, strict=False) for c in cfg.http.metrics_allow]
        self.proxies = TrustedProxies([ipaddress.ip_network(c, strict=False) for c in cfg.server.trusted_proxies],
                                      cfg.server.forwarded_header)
        self.sink.set_audit(cfg.audit.path, cfg.audit.max_bytes, cfg.audit.backups)

    def _keys(self, cfg: Any) -> tuple[str, str]:
        """(verify key, sign key): the ones the config's load read and checked; no file is read here."""
        keys = wconfig.resolved_auth(cfg)
        if keys.hmac and not keys.verify_key:
            secret = getattr(self, "_ephemeral", None) or secrets.token_urlsafe(48)
            self._ephemeral = secret
            self.ephemeral_secret = True
            return secret, secret
        self.ephemeral_secret = False
        return keys.verify_key, keys.sign_key

    # -- events and audit --------------------------------------------------------------------------------
    def emit(self, kind: str, *, log_line: bool = True, **fields: Any) -> None:
        """A lifecycle or security event (see ``Events.emit``)."""
        self.sink.emit(kind, log_line=log_line, **fields)

    def audit(self, kind: str, **fields: Any) -> None:
        self.sink.audit(kind, **fields)

    def limiters(self) -> tuple[Any, ...]:
        """The keyed limiters the hub's memory sweep frees refilled buckets of (replaced at each reload)."""
        return (self.ip_limiter, self.user_limiter)

    # -- HTTP helpers ----------------------------------------------------------------------------------------
    def metrics_allowed(self, remote: str) -> bool:
        return ip_in(remote, self.metrics_networks)

    def prometheus_text(self) -> str:
        return prometheus_text(self)

    def process_stats(self) -> dict[str, Any]:
        with self._proc.oneshot():
            mem = self._proc.memory_info()
            return {"pid": self._proc.pid, "rss_bytes": mem.rss, "cpu_percent": self._proc.cpu_percent(None),
                    "threads": self._proc.num_threads(), "fds": self._proc.num_fds()}

    # -- run ---------------------------------------------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        return self.started_config.control.socket or default_socket_path()

    def _limit_descriptors(self) -> None:
        before, now = raise_fd_limit()
        self.fd_limit = now
        self.fd_alarm = now - min(1024, max(16, now // 32))
        if now > before:
            log.info("descriptor limit raised from %d to %d (the hard limit)", before, now)
        else:
            log.info("descriptor limit %d (already the hard limit)", now)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Descriptor exhaustion at accept, as the event loop reports it: counted and logged, rate limited.

        asyncio reports EMFILE/ENFILE from accept() here ("socket.accept() out of system resource") and
        retries a second later. uvloop (libuv) accepts and closes pending connections itself while it
        holds a spare descriptor, reporting nothing; only when that fails does it report here, and it
        closes the listener.
        """
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE) and hasattr(self, "endpoint"):
            message = str(context.get("message", ""))
            self.endpoint.descriptors_exhausted(f"{message}: {exc.strerror}")
            if message.startswith("Fatal error on server"):
                log.error("the event loop closed the WebSocket listener after descriptor exhaustion: restart wsd "
                          "(and raise its descriptor limit)")
            return
        loop.default_exception_handler(context)

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._limit_descriptors()
        self.loop.set_exception_handler(self._loop_exception)
        self._apply(self.config)
        if self.ephemeral_secret:
            log.warning("no auth secret configured: using an ephemeral HS256 secret generated at start "
                        "(tokens die with this process; mint them with `wsctl token`)")
        self.engine = make_engine(self.config)
        if self.worker:
            self.engine.node_id = self.worker
        self.engine.configure(self.config.channels)
        self.hub = Hub(self.config, self.engine, self.sink, limiters=self.limiters())
        self.engine.on_gap = self.hub.on_bus_gap  # a hole in a shared engine's bus that history cannot fill
        self.engine.on_takeover = self.hub.on_takeover  # another node resumed a session held here
        try:
            await self.engine.start(self.hub.on_remote)
        except Exception as exc:
            raise RuntimeError(f"engine {self.engine.name} failed to start: {exc}") from exc
        self.endpoint = Endpoint(self)
        srv = self.config.server  # the command line's overrides are in it
        host = srv.host
        port = srv.port
        ssl_ctx = None
        if srv.tls_cert:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(srv.tls_cert, srv.tls_key)
        try:
            # The control socket first: a second wsd on the same socket stops here, before binding.
            control = ControlServer(self, self.socket_path)
            await control.start()
            self.control = control  # only a socket this process created is removed again
            self.server = await self._listen(host, port, ssl_ctx)
        except BaseException:
            # A failed start leaves nothing behind: no control socket file, no engine connection.
            if self.control is not None:
                await self.control.stop()
                self.control = None
            with contextlib.suppress(Exception):
                await self.engine.stop()
            raise
        bound = [s.getsockname() for s in self.server.sockets]
        self.bound_port = bound[0][1] if bound else port
        self.hub.start()
        self.ready = True
        scheme = "wss" if ssl_ctx else "ws"
        log.info("wsd %s listening on %s://%s:%s (pools: %s), control socket %s, engine %s", wsd.__version__,
                 scheme, host, self.bound_port, ", ".join(f"{p.id}={p.path}" for p in self.pools.values()),
                 self.socket_path, self.engine.name)
        self.emit("started", port=self.bound_port, engine=self.engine.name)
        self.scheme = scheme
        if self.notifier.enabled:
            self.notifier.ready(self.service_status())
            self._service_task = self.loop.create_task(self._service_loop())
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_async()))
        if self.worker:
            loop.add_signal_handler(signal.SIGUSR2, self.retire)
        await self._stop.wait()
        await self.shutdown()
        return 0

    async def _listen(self, host: str, port: int, ssl_ctx: Any) -> asyncio.Server:
        """Bind the WebSocket listener; a bind failure becomes one line naming the address."""
        m = self.config.manager
        srv = self.config.server
        try:
            # heartbeats are ours (one sweep, 3 missed pongs), and so are refusals and the close timeout
            return await listen(host, port, ssl=ssl_ctx, backlog=srv.backlog,
                                open_timeout=HANDSHAKE_TIMEOUT_S, close_timeout=max(0.5, m.drain_timeout_ms / 1000.0),
                                max_size=srv.max_message_bytes, write_limit=m.write_high_water_bytes,
                                reuse_port=bool(self.worker))
        except OSError as exc:
            raise RuntimeError(listen_error(host, port, exc)) from None

    def request_stop(self) -> None:
        self._stop.set()

    def retire(self) -> None:
        """A worker the supervisor retires: its listener closes first (new connections go to the other workers
        sharing the port, not to a 503), then its clients are drained with 1001 to resume elsewhere."""
        if self.server is not None:
            self.server.close()  # the listening socket only: its connections stay, to be drained with 1001
        self._stop.set()

    # -- the service manager ------------------------------------------------------------------------------
    #: The shortest time between two STATUS= updates of the connection count.
    STATUS_EVERY_S = 5.0

    def service_status(self) -> str:
        """One line for the service manager's STATUS=: connections, where it listens, a refused reload."""
        n = len(self.hub.conns)
        conns = f"{n} connection{'' if n == 1 else 's'}"
        if self.draining:
            text = f"draining: {conns} left"
        else:
            host = self.config.server.host
            host = f"[{host}]" if ":" in host else host
            text = f"{conns}; listening on {self.scheme}://{host}:{self.bound_port}"
        return f"{self.status_note}; {text}" if self.status_note else text

    async def _service_loop(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC and STATUS= at most every STATUS_EVERY_S, from the event loop
        itself: a loop that stops turning stops the pings, and the service manager restarts the daemon."""
        n = self.notifier
        every = self.STATUS_EVERY_S if n.watchdog_s is None else min(n.watchdog_s, self.STATUS_EVERY_S)
        last_status = self.loop.time()
        while True:
            await asyncio.sleep(every)
            if n.watchdog_s is not None:
                n.watchdog()
            now = self.loop.time()
            if now - last_status >= self.STATUS_EVERY_S - 1e-3:
                last_status = now
                n.status(self.service_status())

    async def shutdown(self) -> None:
        """Stop accepting, close every client with 1001, and exit within the drain time."""
        self.draining = True
        self.emit("draining", connections=len(self.hub.conns))
        self.notifier.stopping(self.service_status())
        deadline = self.loop.time() + self.config.manager.drain_timeout_ms / 1000.0
        assert self.server is not None
        # The listener stays open while draining: new handshakes and /readyz get 503 (draining)
        # instead of a refused TCP connect, so load balancers and clients see why.
        for conn in list(self.hub.conns.values()):
            self.hub.close(conn, errors.SHUTDOWN.code, errors.SHUTDOWN.reason)
        while self.hub.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.server.close()  # stop accepting; we closed clients ourselves
        for conn in list(self.hub.conns.values()):
            tr = conn.ws.transport
            if tr is not None:
                tr.abort()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 1.0)
        except (asyncio.TimeoutError, Exception):
            pass
        await self.hub.stop()
        if self.control is not None:
            await self.control.stop()
        await self.engine.stop()
        self.endpoint.flush_repeats()  # the counts of repeated records not yet summarised
        if self._service_task is not None:
            self._service_task.cancel()
        self.notifier.close()
        log.info("stopped")

    # -- reload --------------------------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the config file (SIGHUP, `wsctl reload`); the service manager sees RELOADING=1, then
        READY=1 whatever the outcome, with a refused reload's reason in STATUS=. Only while serving: a
        `wsctl reload` before the listener is up, or during the drain, must not say READY=1."""
        serving = self.ready and not self.draining
        if serving:
            self.notifier.reloading()
        res: dict[str, Any] = {"ok": False, "errors": ["reload failed"]}
        try:
            res = self._reload()
            return res
        finally:
            if res["ok"]:
                restart = res.get("restart_required") or []
                self.status_note = f"restart required for {', '.join(restart)}" if restart else ""
            else:
                errs = res["errors"] or ["refused"]
                more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
                self.status_note = f"reload refused, running the previous config: {errs[0]}{more}"
            if serving:
                self.notifier.ready(self.service_status())

    def _reload(self) -> dict[str, Any]:
        if not self.config_path:
            log.warning("reload: nothing to re-read, no config file (running on the embedded default)")
            return {"ok": False, "errors": ["no config file: the daemon runs on its embedded default"]}
        try:
            cfg = wconfig.load_config(self.config_path)
            rekeyed = wconfig.rekeyed(self.config, cfg)
            if rekeyed:
                raise wconfig.ConfigError(rekeyed)
        except wconfig.ConfigError as exc:
            self.emit("reload_failed", log_line=False, errors=exc.errors)
            log.error("reload refused, keeping the running config:\n%s", "\n".join(exc.errors))
            return {"ok": False, "errors": exc.errors}
        # Compared with what runs, not with the file read last time: putting a value back clears it.
        pending = self._pending(cfg)
        self.file_config = cfg
        self.pending_restart = pending
        self._apply(self._running(cfg))
        self.hub.configure(self.config, limiters=self.limiters())
        self.reloads += 1
        restart = [p["key"] for p in pending]
        self.emit("reload", log_line=False, restart_required=restart)
        if pending:
            log.warning("reload: applied; restart required: %s", self.pending_text(pending))
        else:
            log.info("reload: the new config is live")
        return {"ok": True, "errors": [], "restart_required": restart, "pending_restart": pending}

    async def reload_async(self) -> None:
        self.reload()

