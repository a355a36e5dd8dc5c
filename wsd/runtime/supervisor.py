"""`wsd serve --workers N`: N worker processes on one port, supervised by this process.

Each worker is a whole wsd (``python -m wsd serve --worker <node id>``): its own event loop, clients, hub and
node on the shared engine (Redis), listening on the same address with SO_REUSEPORT, so the kernel spreads new
connections over the workers. Its node id is ``<host>-w<slot>``; its control socket is private, in
``<control socket>.workers/`` (a 0700 directory).

The supervisor (this process) has no listener and no engine connection. It holds the one public control socket
and relays each request to a live worker's private socket: every cluster-wide view (wsctl status, connections,
events...) is that worker's, which covers every node on the engine. It answers ``reload`` itself (every worker
reloads; a refusal names the worker) and adds what only it knows: ``status.workers`` (slot, node, pid, CPU,
restarts) and its own events (``worker_started``, ``worker_exited``, ``worker_scaled``).

It is the one that talks to the service manager: the workers' ``$NOTIFY_SOCKET`` is a private datagram socket of
the supervisor, whose READY=1 tells it a worker listens; READY=1 goes to systemd once every worker listens.
A worker that dies is restarted after a back-off (0.5 s doubling to 30 s); one that dies ``CRASH_LIMIT`` times in
``CRASH_WINDOW_S`` stops the whole daemon with one log line and exit status 1. SIGHUP reloads every worker;
SIGTERM drains every worker (their clients get 1001) and exits 0 when they all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import sys
import time
from collections import deque
from typing import Any

import psutil

from wsd.control import protocol as P
from wsd.core.scaling import Scaler, WorkerCount
from wsd.runtime.control import peer_allowed, peer_uid, prepare_socket_dir
from wsd.runtime.events import Events
from wsd.runtime.notify import Notifier

log = logging.getLogger("wsd")

#: a worker that exits this many times within CRASH_WINDOW_S makes the supervisor give up
CRASH_LIMIT = 5
CRASH_WINDOW_S = 60.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: how long the first workers have to listen before the start counts as failed
START_TIMEOUT_S = 60.0
#: how often the autoscaler samples the workers' CPU
SAMPLE_EVERY_S = 1.0
#: what a drain may take beyond manager.drain_timeout_ms before a worker is killed
DRAIN_GRACE_S = 3.0


class Worker:
    __slots__ = ("crashes", "node", "pid", "proc", "ps", "ready", "restarts", "retiring", "slot", "socket",
                 "started", "waiter")

    def __init__(self, slot: int, node: str, sock: str) -> None:
        self.slot = slot
        self.node = node
        self.socket = sock
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.ps: psutil.Process | None = None
        self.ready = False
        self.retiring = False
        self.restarts = 0
        self.started = 0.0
        self.crashes: deque[float] = deque(maxlen=CRASH_LIMIT)
        self.waiter: asyncio.Task[None] | None = None

    def cpu(self) -> float:
        """CPU share of one core since the last call (0 when unknown)."""
        if self.ps is None:
            return 0.0
        try:
            return self.ps.cpu_percent(None) / 100.0
        except psutil.Error:
            return 0.0

    def describe(self) -> dict[str, Any]:
        return {"slot": self.slot, "node": self.node, "pid": self.pid, "ready": self.ready,
                "retiring": self.retiring, "restarts": self.restarts,
                "uptime_s": round(time.monotonic() - self.started, 1) if self.started else 0.0}


def _die_with_parent() -> None:  # in the child between fork and exec
    """A worker whose supervisor is gone (SIGKILL) drains and stops: nobody would restart or reach it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def node_prefix() -> str:
    return socket.gethostname().split(".")[0] or "wsd"


class Supervisor:
    def __init__(self, config: Any, count: WorkerCount, *, config_path: str | None, socket_path: str,
                 host: str | None, port: int | None, log_level: str, log_format: str) -> None:
        self.config = config
        self.count = count
        self.config_path = config_path
        self.socket_path = socket_path
        self.private_dir = socket_path + ".workers"
        self.host = host
        self.port = port
        self.log_level = log_level
        self.log_format = log_format
        self.workers: dict[int, Worker] = {}
        self.sink = Events()
        self.notifier = Notifier()
        self.stopping = False
        self.serving = False  # every first worker listens: from then on a worker that exits is restarted
        self.exit_code = 0
        self.prefix = node_prefix()
        # With no auth secret in the config each worker would make up its own: they share one made here.
        self.shared_secret = secrets.token_urlsafe(48)
        w = config.workers
        self.scaler = Scaler(count.low, count.high, up_cpu=w.scale_up_cpu, down_cpu=w.scale_down_cpu,
                             up_after_s=w.scale_up_after_s, down_after_s=w.scale_down_after_s)
        self._stop = asyncio.Event()
        self._reserve: socket.socket | None = None
        self._control: asyncio.AbstractServer | None = None
        self._control_inode = -1
        self._notify: socket.socket | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._next = 0

    # -- start ------------------------------------------------------------------------------------------------
    def _reserve_port(self) -> None:
        """``port = 0``: pick the port once (a bound, never listening SO_REUSEPORT socket holds it), so every
        worker and every restarted worker listens on the same one."""
        host = self.host or self.config.server.host
        port = self.port if self.port is not None else self.config.server.port
        if port != 0:
            return
        info = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        s = socket.socket(info[0], socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(info[4])
        self._reserve = s
        self.port = s.getsockname()[1]

    async def _start_control(self) -> None:
        path = self.socket_path
        prepare_socket_dir(os.path.dirname(os.path.abspath(path)), os.getuid())
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"control socket path {path} exists and is not a socket: refusing to "
                                   "replace it (remove it or choose another --socket)")
            try:
                _, w = await asyncio.wait_for(asyncio.open_unix_connection(path), 1.0)
            except (OSError, asyncio.TimeoutError):
                os.unlink(path)  # stale: nobody listens on it
            else:
                w.close()
                raise RuntimeError(f"another wsd is already serving the control socket {path}")
        old = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(self._client, path, limit=P.MAX_REQUEST_BYTES)
        except OSError as exc:
            raise RuntimeError(f"cannot create the control socket {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._control_inode = os.lstat(path).st_ino
        prepare_socket_dir(self.private_dir, os.getuid())
        notify_path = os.path.join(self.private_dir, "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        n.bind(notify_path)
        os.chmod(notify_path, 0o600)
        self._notify = n
        asyncio.get_running_loop().add_reader(n.fileno(), self._on_notify)

    def _on_notify(self) -> None:
        """A worker's sd_notify datagram: READY=1 (with MAINPID) says it listens."""
        assert self._notify is not None
        while True:
            try:
                data = self._notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line)
            if fields.get("READY") == "1" and fields.get("MAINPID", "").isdigit():
                pid = int(fields["MAINPID"])
                for w in self.workers.values():
                    if w.pid == pid and not w.ready:
                        w.ready = True
                        self.sink.emit("worker_started", slot=w.slot, worker=w.node, pid=pid, restarts=w.restarts)

    def _command(self, w: Worker) -> list[str]:
        cmd = [sys.executable, "-m", "wsd", "serve", "--worker", w.node, "--socket", w.socket,
               "--log-level", self.log_level, "--log-format", self.log_format]
        if self.config_path:
            cmd += ["-c", self.config_path]
        if self.host:
            cmd += ["--host", self.host]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        return cmd

    async def _spawn(self, w: Worker) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                                 "LISTEN_FDS", "LISTEN_PID")}
        env["NOTIFY_SOCKET"] = os.path.join(self.private_dir, "notify.sock")
        env["WSD_WORKER_SECRET"] = self.shared_secret
        w.ready = False
        w.proc = await asyncio.create_subprocess_exec(*self._command(w), env=env, stdin=asyncio.subprocess.DEVNULL,
                                                      preexec_fn=_die_with_parent)
        w.pid = w.proc.pid
        w.started = time.monotonic()
        try:
            w.ps = psutil.Process(w.pid)
            w.ps.cpu_percent(None)
        except psutil.Error:
            w.ps = None
        w.waiter = asyncio.get_running_loop().create_task(self._watch(w))

    def _add(self, slot: int) -> Worker:
        w = Worker(slot, f"{self.prefix}-w{slot}", os.path.join(self.private_dir, f"w{slot}.sock"))
        self.workers[slot] = w
        return w

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._reserve_port()
        await self._start_control()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        try:
            for slot in range(1, self.count.low + 1):
                await self._spawn(self._add(slot))
            deadline = loop.time() + START_TIMEOUT_S
            while not all(w.ready for w in self.workers.values()):
                if self._stop.is_set() or loop.time() > deadline:
                    if not self._stop.is_set():
                        log.error("the workers did not all listen within %.0f s: stopping", START_TIMEOUT_S)
                        self.exit_code = 1
                    await self._shutdown()
                    return self.exit_code
                await asyncio.sleep(0.05)
            host = self.host or self.config.server.host
            port = self.port if self.port is not None else self.config.server.port
            log.info("wsd supervisor: %d worker%s listening on %s:%s (%s), control socket %s", len(self.workers),
                     "" if len(self.workers) == 1 else "s", host, port,
                     ", ".join(w.node for w in self.workers.values()), self.socket_path)
            self.serving = True
            self.notifier.ready(self.service_status())
            tasks = [loop.create_task(self._service_loop())]
            if self.count.scaling:
                tasks.append(loop.create_task(self._autoscale()))
            await self._stop.wait()
            for t in tasks:
                t.cancel()
        finally:
            await self._shutdown()
        return self.exit_code

    def service_status(self) -> str:
        ready = sum(1 for w in self.workers.values() if w.ready)
        return f"{ready} of {len(self.workers)} workers listening"

    async def _service_loop(self) -> None:
        n = self.notifier
        every = 5.0 if n.watchdog_s is None else min(n.watchdog_s, 5.0)
        while True:
            await asyncio.sleep(every)
            if n.watchdog_s is not None:
                n.watchdog()
            n.status(self.service_status())

    # -- workers that exit --------------------------------------------------------------------------------------
    async def _watch(self, w: Worker) -> None:
        assert w.proc is not None
        code = await w.proc.wait()
        w.ready = False
        if self.stopping or w.retiring or self._stop.is_set():
            return
        if self.workers.get(w.slot) is not w:
            return
        now = time.monotonic()
        w.crashes.append(now)
        self.scaler.changed()
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if not self.serving:  # at start: the worker's own error line says why (port in use, engine down...)
            log.error("worker %s exited (%s) before it listened: stopping", w.node, how)
            self.exit_code = 1
            self._stop.set()
            return
        recent = [t for t in w.crashes if now - t <= CRASH_WINDOW_S]
        if len(recent) >= CRASH_LIMIT:
            self.sink.emit("worker_exited", slot=w.slot, worker=w.node, pid=w.pid, status=code, restart=False)
            log.error("worker %s exited (%s) %d times within %.0f s: giving up, stopping wsd (see the worker's "
                      "log lines above)", w.node, how, len(recent), CRASH_WINDOW_S)
            self.exit_code = 1
            self._stop.set()
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (len(recent) - 1))
        self.sink.emit("worker_exited", slot=w.slot, worker=w.node, pid=w.pid, status=code, restart=True,
                       restart_in_s=delay)
        log.warning("worker %s (pid %d) exited (%s): restarting it in %.1f s", w.node, w.pid, how, delay)
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
            return  # stopping meanwhile
        except asyncio.TimeoutError:
            pass
        if self.stopping or self.workers.get(w.slot) is not w:
            return
        w.restarts += 1
        await self._spawn(w)

    # -- autoscale -----------------------------------------------------------------------------------------------
    async def _autoscale(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            live = [w for w in self.workers.values() if w.ready and not w.retiring]
            if not live or len(live) != len([w for w in self.workers.values() if not w.retiring]):
                continue  # a worker starting or restarting: its CPU says nothing yet
            busiest = max(w.cpu() for w in live)
            step = self.scaler.decide(loop.time(), busiest, len(live))
            if step > 0:
                slot = next(i for i in range(1, len(self.workers) + 2) if i not in self.workers)
                w = self._add(slot)
                self.sink.emit("worker_scaled", direction="up", worker=w.node, workers=len(live) + 1,
                               busiest_cpu=round(busiest, 2))
                await self._spawn(w)
            elif step < 0:
                w = max(live, key=lambda x: x.slot)
                self.sink.emit("worker_scaled", direction="down", worker=w.node, workers=len(live) - 1,
                               busiest_cpu=round(busiest, 2))
                loop.create_task(self._retire(w))

    async def _retire(self, w: Worker) -> None:
        """Drain one worker (its listener closes first, its clients get 1001) and forget it."""
        w.retiring = True
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGUSR2)
            await self._reap(w, self.config.manager.drain_timeout_ms / 1000.0 + DRAIN_GRACE_S)
        if self.workers.get(w.slot) is w:
            del self.workers[w.slot]

    async def _reap(self, w: Worker, timeout: float) -> None:
        assert w.proc is not None
        try:
            await asyncio.wait_for(asyncio.shield(w.proc.wait()), timeout)
        except asyncio.TimeoutError:
            log.warning("worker %s did not finish draining within %.1f s: killing it", w.node, timeout)
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()

    # -- reload and stop ---------------------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Every worker re-reads the config (through its private control socket); a refusal names the worker."""
        self.notifier.reloading()
        results: dict[str, Any] = {}
        errors: list[str] = []
        for w in list(self.workers.values()):
            if not w.ready or w.retiring:
                continue
            try:
                reply = await self._ask(w, "reload", {})
            except (OSError, ValueError, asyncio.TimeoutError) as exc:
                reply = {"error": {"code": P.E_FAILED, "message": f"no answer: {exc}"}}
            results[w.node] = reply.get("result", reply.get("error"))
            if "error" in reply:
                msg = str(reply["error"].get("message", "refused"))
                errors.append(f"{w.node}: {msg}")
                log.error("reload refused by worker %s: %s", w.node, msg.splitlines()[-1] if msg else "refused")
        if self.config_path and not errors:
            from wsd import config as wconfig

            with contextlib.suppress(wconfig.ConfigError):
                cfg = wconfig.load_config(self.config_path)
                self.config = cfg
                w = cfg.workers
                self.scaler.reconfigure(up_cpu=w.scale_up_cpu, down_cpu=w.scale_down_cpu,
                                        up_after_s=w.scale_up_after_s, down_after_s=w.scale_down_after_s)
        first = next((r for r in results.values() if isinstance(r, dict) and "pending_restart" in r), {})
        status = self.service_status()
        if errors:
            status = f"reload refused by {len(errors)} worker(s): {errors[0]}; {status}"
        self.notifier.ready(status)
        return {"ok": not errors, "errors": errors, "workers": results,
                "restart_required": first.get("restart_required", []), "pending_restart": first.get("pending_restart", [])}

    async def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.stopping(f"draining {len(self.workers)} workers")
        running = [w for w in self.workers.values() if w.proc is not None and w.proc.returncode is None]
        for w in running:
            with contextlib.suppress(ProcessLookupError):
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)
        timeout = self.config.manager.drain_timeout_ms / 1000.0 + DRAIN_GRACE_S
        await asyncio.gather(*(self._reap(w, timeout) for w in running))
        for w in self.workers.values():
            if w.waiter is not None:
                w.waiter.cancel()
        if self._control is not None:
            self._control.close()
        for t in list(self._clients):
            t.cancel()
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._control_inode:
                os.unlink(self.socket_path)
        if self._notify is not None:
            asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._notify.close()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.private_dir, "notify.sock"))
        with contextlib.suppress(OSError):
            os.rmdir(self.private_dir)
        if self._reserve is not None:
            self._reserve.close()
        self.notifier.close()
        log.info("stopped (all workers drained)")

    # -- the control socket: relayed to a live worker ------------------------------------------------------------
    def _pick(self) -> Worker | None:
        live = [w for w in self.workers.values() if w.ready and not w.retiring]
        if not live:
            return None
        self._next += 1
        return live[self._next % len(live)]

    async def _ask(self, w: Worker, method: str, params: dict[str, Any]) -> dict[str, Any]:
        r, wr = await asyncio.wait_for(asyncio.open_unix_connection(w.socket, limit=P.MAX_REPLY_BYTES), 2.0)
        try:
            wr.write(json.dumps({"id": 1, "method": method, "params": params}).encode() + b"\n")
            await wr.drain()
            line = await asyncio.wait_for(r.readline(), 10.0)
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise ValueError("not a reply")
            return reply
        finally:
            wr.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One wsctl connection, relayed to one live worker's private socket. Requests are pipelined: each is
        forwarded as it comes, and the replies go back in request order (a ``reload``, answered here, in its
        place among them)."""
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        codec = P.ServerCodec()
        upstream: asyncio.StreamWriter | None = None
        replies: asyncio.Queue[Any] = asyncio.Queue()
        relay: asyncio.Task[None] | None = None
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if not peer_allowed(uid, os.getuid()):
                self.sink.emit("control_refused", uid=uid)
                writer.write(codec.error(None, P.E_FORBIDDEN, f"uid {uid} may not control this wsd "
                                                              "(run wsctl as the user that runs wsd, or root)"))
                await writer.drain()
                return
            w = self._pick()
            if w is None:
                writer.write(codec.error(None, P.E_FAILED, "no worker is listening (starting, restarting or "
                                                           "draining): try again"))
                await writer.drain()
                return
            up_r, upstream = await asyncio.open_unix_connection(w.socket, limit=P.MAX_REPLY_BYTES)
            relay = asyncio.get_running_loop().create_task(self._replies(w, replies, up_r, writer, codec))
            streaming = False
            while not relay.done():
                req = codec.next_event()
                if req is P.NEED_DATA:
                    codec.receive_data(await reader.read(1 << 16))
                    continue
                if req is P.CLOSED:
                    break
                if isinstance(req, P.BadRequest):
                    replies.put_nowait(req.reply)
                    if req.fatal:
                        break
                    continue
                assert isinstance(req, P.Request)
                if req.method == "reload":
                    replies.put_nowait(asyncio.ensure_future(self._reload_reply(codec, req)))
                    continue
                upstream.write(json.dumps({"id": req.id, "method": req.method, "params": req.params}).encode()
                               + b"\n")
                replies.put_nowait(req)
                await upstream.drain()
                if req.method in P.STREAM_METHODS:
                    streaming = True
                    break  # a stream ends only with its connection: nothing more is read from the client
            replies.put_nowait(None)
            if relay.done() or not streaming:
                await relay
            else:  # a stream: it ends when the worker ends it or when the client goes away
                gone = asyncio.get_running_loop().create_task(reader.read(1 << 16))
                await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("control relay failed")
        finally:
            self._clients.discard(task)
            if relay is not None:
                relay.cancel()
            if upstream is not None:
                upstream.close()
            writer.close()

    async def _reload_reply(self, codec: P.ServerCodec, req: P.Request) -> bytes:
        res = await self.reload()
        if res["ok"]:
            return codec.result(req.id, res)
        return codec.error(req.id, P.E_FAILED, "reload refused, the running config stays:\n" + "\n".join(res["errors"]))

    async def _replies(self, w: Worker, replies: asyncio.Queue[Any], up_r: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, codec: P.ServerCodec) -> None:
        """The replies of one relayed connection, in request order."""
        while True:
            item = await replies.get()
            if item is None:
                return
            if isinstance(item, bytes):
                writer.write(item)
            elif isinstance(item, asyncio.Future):
                writer.write(await item)
            else:
                if item.method in P.STREAM_METHODS:
                    await self._stream(item, up_r, writer, codec)
                    return
                line = await up_r.readline()
                if not line:
                    writer.write(codec.error(item.id, P.E_FAILED, f"worker {w.node} went away: try again"))
                    await writer.drain()
                    return
                writer.write(self._amend(item, line))
            await writer.drain()

    def _amend(self, req: P.Request, line: bytes) -> bytes:
        """A worker's reply with what only the supervisor knows: its workers (status), its events."""
        if req.method not in ("status", "events.recent"):
            return line
        try:
            reply = json.loads(line)
        except ValueError:
            return line
        res = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(res, dict):
            return line
        if req.method == "status":
            # the process to signal and the socket to use are the supervisor's (each worker's are in node_stats)
            res["pid"], res["socket"] = os.getpid(), self.socket_path
            res["workers"] = {"supervisor_pid": os.getpid(), "count": len(self.workers),
                              "min": self.count.low, "max": self.count.high,
                              "items": [w.describe() for w in sorted(self.workers.values(), key=lambda x: x.slot)]}
        elif isinstance(res.get("events"), list) and not req.params.get("node") and not req.params.get("local"):
            limit = req.params.get("limit", 100)
            mine = [dict(ev, node=f"{self.prefix}-supervisor") for ev in self.sink.log]
            evs = sorted(res["events"] + mine, key=lambda e: (e.get("ts", 0), e.get("seq", 0)))
            res["events"] = evs[-limit:] if isinstance(limit, int) and limit > 0 else []
        return json.dumps(reply).encode() + b"\n"

    async def _stream(self, req: P.Request, up_r: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      codec: P.ServerCodec) -> None:
        """An event stream: the worker's lines, with the supervisor's own events put in between."""
        kinds = set(req.params.get("kinds") or ())
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self.sink.subscribers.add(q)
        loop = asyncio.get_running_loop()
        read = loop.create_task(up_r.readline())
        get = loop.create_task(q.get())
        try:
            while True:
                done, _ = await asyncio.wait({read, get}, return_when=asyncio.FIRST_COMPLETED)
                if read in done:
                    line = read.result()
                    if not line:
                        return
                    writer.write(line)
                    read = loop.create_task(up_r.readline())
                if get in done:
                    ev = get.result()
                    if not kinds or ev.get("event") in kinds:
                        writer.write(codec.event(dict(ev, node=f"{self.prefix}-supervisor")))
                    get = loop.create_task(q.get())
                await writer.drain()
        finally:
            self.sink.subscribers.discard(q)
            read.cancel()
            get.cancel()
