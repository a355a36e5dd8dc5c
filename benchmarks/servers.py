"""Start and stop the servers under test (bare reference and wsd) for the benchmark scripts.

Each server runs in its own session (process group) with PR_SET_PDEATHSIG, its output goes to a log
file in a private temp directory (never a pipe that could fill up), and ``stop()`` kills the whole
group and reaps it. ``stop_all()`` is the safety net the scripts call from ``finally`` and atexit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loadgen import Target, log

HERE = Path(__file__).resolve().parent
_RUNNING: list[ServerProcess] = []


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the benchmark


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup,
                close_fds=True,
                env=self.env,
            )
        _RUNNING.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after ``timeout``; always reaps."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {timeout}s after SIGTERM, sending SIGKILL")
        if proc.poll() is None:  # the leader is still ours: the whole group goes
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for pid in _group_members(proc.pid):  # leftovers of the group whose leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self in _RUNNING:
            _RUNNING.remove(self)
        return proc.returncode


def _group_members(pgid: int) -> list[int]:
    import psutil

    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.pid != os.getpid():
                members.append(p.pid)
    return members


def stop_all() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop(timeout=3)


async def start_bare(
    tmpdir: Path, ping_interval: float = 30.0, uvloop: bool = True
) -> tuple[ServerProcess, Target]:
    argv = [
        sys.executable,
        str(HERE / "bare_server.py"),
        "--port",
        "0",
        "--ping-interval",
        str(ping_interval),
    ]
    if uvloop:
        argv.append("--uvloop")
    server = ServerProcess("bare", argv, tmpdir / f"bare-{time.time_ns()}.log")
    server.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"bare server exited: {server.tail()}")
        for line in server.tail(5).splitlines():
            if line.startswith("{") and '"port"' in line:
                info = json.loads(line)
                target = Target.bare(int(info["port"]), publish_path=info["publish_path"])
                target.user_publish_path = info.get("user_publish_path", "/publish-user")
                target.server_pid = server.pid
                return server, target
        await asyncio.sleep(0.05)
    server.stop()
    raise RuntimeError("bare server not ready within 20 s")


# Limits a benchmark must not hit: the publisher of the api path sends hundreds of requests a second
# on one connection. ``message_burst`` is a newer key an older wsd build may not know, so it is dropped if refused.
EXTRA_LIMITS = {"messages_per_connection_per_second": 1_000_000, "message_burst": 1_000_000}


def wsd_config(
    n: int,
    port: int,
    sock: Path,
    secret: str,
    extra_limits: dict[str, int] | None = None,
    extra_toml: str = "",
    redis_url: str = "",
) -> str:
    """The benchmark's wsd config: limits out of the way, one global channel ``bench``; ``extra_toml``
    (more tables, e.g. a channel group or ``[engine]``) is appended; the Redis engine at ``redis_url`` when
    given (``--workers``)."""
    extra = "".join(f"{k} = {v}\n" for k, v in (extra_limits or {}).items())
    engine = f'[engine]\ntype = "redis"\nurl = "{redis_url}"\nprefix = "bench{time.time_ns()}"\n' if redis_url else ""
    return engine + f"""\
# written by benchmarks/servers.py for one benchmark run
[server]
host = "127.0.0.1"
port = {port}

[control]
socket = "{sock}"

[auth]
algorithms = ["HS256"]
secret = "{secret}"

[manager]
max_connections = {n + 100}
heartbeat_interval_ms = 30000
message_buffer_size = 1000

[limits]
connections_per_user_per_minute = 1000000
connections_per_ip_per_minute = 1000000
handshakes_in_progress_per_ip = 1000000
handshakes_in_progress = 1000000
max_connections_per_user = 1000000
{extra}
[log]
level = "warning"

[pools.frontend]
type = "frontend"
path = "/ws/frontend"
max_connections = {n + 100}
default_subscriptions = []

[pools.api]
type = "api"
path = "/ws/api"

[channels.bench]
type = "global"
publishers = ["api"]
{extra_toml}"""


def _readyz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def default_wsd_cmd() -> list[str]:
    return [sys.executable, "-m", "wsd"]


async def start_wsd(
    tmpdir: Path,
    n: int,
    publish: str = "control",
    wsd_cmd: str | None = None,
    ready_timeout_s: float = 30.0,
    extra_limits: dict[str, int] | None = None,
    extra_toml: str = "",
    workers: int = 0,
    redis_url: str = "",
) -> tuple[ServerProcess, Target]:
    extra = {**EXTRA_LIMITS, **(extra_limits or {})}
    for _attempt in range(len(EXTRA_LIMITS) + 1):  # bounded: each retry drops one refused key
        try:
            return await _start_wsd_once(tmpdir, n, publish, wsd_cmd, ready_timeout_s, extra, extra_toml, workers,
                                         redis_url)
        except _RefusedKey as exc:
            log(f"wsd refused [limits] {exc.key}; retrying without it")
            extra.pop(exc.key)
    raise RuntimeError("wsd refused the benchmark config")


class _RefusedKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


async def _start_wsd_once(
    tmpdir: Path,
    n: int,
    publish: str,
    wsd_cmd: str | None,
    ready_timeout_s: float,
    extra_limits: dict[str, int],
    extra_toml: str = "",
    workers: int = 0,
    redis_url: str = "",
) -> tuple[ServerProcess, Target]:
    port = free_port()
    run_dir = tmpdir / f"wsd-{time.time_ns()}"
    run_dir.mkdir(mode=0o700)
    sock = run_dir / "wsd.sock"
    secret = secrets.token_urlsafe(48)  # 64 chars
    cfg = run_dir / "wsd.toml"
    cfg.write_text(wsd_config(n, port, sock, secret, extra_limits, extra_toml, redis_url))
    cfg.chmod(0o600)
    argv = [*(shlex.split(wsd_cmd) if wsd_cmd else default_wsd_cmd()), "serve", "-c", str(cfg)]
    if workers:
        argv += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}  # no stray overrides
    server = ServerProcess("wsd", argv, run_dir / "wsd.log", env=env)
    server.start()
    deadline = time.monotonic() + ready_timeout_s
    try:
        status = None
        while time.monotonic() < deadline:
            if not server.alive():
                log_text = server.tail(40)
                for key in extra_limits:
                    if key in log_text:
                        raise _RefusedKey(key)
                raise RuntimeError(
                    f"wsd exited with {server.proc.returncode if server.proc else '?'}: {server.tail()}"
                )
            status = await asyncio.to_thread(_readyz, port)
            if status == 200 and (publish != "control" or sock.exists()):
                target = Target.wsd(port, secret, str(sock), publish)
                target.server_pid = server.pid
                return server, target
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"wsd not ready within {ready_timeout_s}s (last /readyz: {status}): {server.tail()}"
        )
    except BaseException:
        server.stop()
        raise


async def start(kind: str, tmpdir: Path, n: int, args: Any) -> tuple[ServerProcess, Target]:
    if kind == "bare":
        server, target = await start_bare(tmpdir, args.ping_interval, uvloop=args.bare_loop == "uvloop")
        target.bare_frame = args.bare_frame
    else:
        server, target = await start_wsd(tmpdir, n, args.publish, args.wsd_cmd,
                                         workers=getattr(args, "workers", 0) or 0,
                                         redis_url=getattr(args, "redis_url", "") or "")
    return server, target
