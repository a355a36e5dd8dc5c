"""Real daemons and real clients for the tests: start `wsd serve` as a subprocess, talk to it.

Nothing here mocks the daemon: a ``Wsd`` is a child process listening on 127.0.0.1 with its own
config file, control socket and log file; waits are event-driven with a bound, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz-0123456789"

BASE_CONFIG = f"""
[manager]
heartbeat_interval_ms = 30000
drain_timeout_ms = 2000

[server]
host = "127.0.0.1"
port = 0

[auth]
algorithms = ["HS256"]
secret = "{SECRET}"

[limits]
connections_per_user_per_minute = 10000
connections_per_ip_per_minute = 100000
handshakes_in_progress_per_ip = 100000
max_connections_per_user = 1000
messages_per_connection_per_second = 1000
message_burst = 1000

[log]
level = "info"
"""


def tool_missing(why: str) -> NoReturn:
    """A test needs an outside tool this machine lacks: skip it, but fail under WSD_CI_REQUIRE_TOOLS=1 (CI installs
    every tool, so a missing one there is a broken install, not a reason to test less)."""
    if os.environ.get("WSD_CI_REQUIRE_TOOLS") == "1":
        pytest.fail(why)
    pytest.skip(why)


#: Why the Redis engine tests skip on a machine without redis-server, and how to get it.
REDIS_MISSING = ("redis-server is not on PATH: install it (apt-get install redis-server, or brew install redis) "
                 "to run the Redis engine tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_token(user: str = "alice", company: str = "acme", roles: list[str] | None = None, pool: str = "",
               ttl: float = 3600, secret: str = SECRET, algorithm: str = "HS256", **extra: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "roles": roles or [], "iat": now, "exp": now + ttl}
    if company:
        claims["company_id"] = company
    if pool:
        claims["pool"] = pool
    claims.update(extra)
    return jwt.encode(claims, secret, algorithm=algorithm)


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Wsd:
    """One running `wsd serve` child process."""

    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None,
                 args: list[str] | None = None, port: int | None = None, port_flag: bool = True) -> None:
        """``port``: the port to listen on (a free one by default), passed as ``--port`` unless
        ``port_flag`` is false (then the config file must name it)."""
        self.workdir = workdir
        self.config_path = workdir / "wsd.toml"
        self.config_path.write_text(config_text)
        # Unix socket paths are limited to ~107 bytes: keep the socket in a short temp dir.
        self.sockdir = Path(tempfile.mkdtemp(prefix="wsdt-"))
        self.socket = str(self.sockdir / "ctl" / "wsd.sock")
        self.log_path = workdir / "wsd.log"
        self.port = port if port is not None else free_port()
        self.port_chosen = port is None  # ours to change if another process takes it before the daemon binds
        self.port_flag = port_flag
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("WSD_SOCKET", None)
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Wsd:
        self._log = open(self.log_path, "ab")
        for attempt in range(3):
            port = ["--port", str(self.port)] if self.port_flag else []
            cmd = [sys.executable, "-m", "wsd", "serve", "-c", str(self.config_path), *port,
                   "--socket", self.socket, *self.args]
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError as exc:
                # free_port() only found a port free a moment ago: another test (or process) may have taken it
                # since. Try another one rather than fail a test for a race of the harness's own making.
                if not (self.port_flag and self.port_chosen and "already in use" in str(exc) and attempt < 2):
                    raise
                self.port = free_port()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"wsd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.port, "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"wsd not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def url(self, pool: str = "frontend", token: str | None = None, path: str | None = None, **query: str) -> str:
        q = dict(query)
        if token is not None:
            q["token"] = token
        qs = "&".join(f"{k}={v}" for k, v in q.items())
        p = path or f"/ws/{pool}"
        return f"ws://127.0.0.1:{self.port}{p}" + (f"?{qs}" if qs else "")

    def connect(self, pool: str = "frontend", token: str | None = None, **kw: Any) -> Any:
        query = kw.pop("query", {})
        return connect(self.url(pool, token, **query), compression=kw.pop("compression", None),
                       open_timeout=5, close_timeout=2, **kw)

    async def ctl(self, method: str, **params: Any) -> Any:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.socket), 5)
        try:
            writer.write(json.dumps({"id": 1, "method": method, "params": params}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        reply = json.loads(line)
        if "error" in reply:
            raise ControlError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the daemon (SIGTERM, then SIGKILL after ``timeout``) and remove its socket directory."""
        try:
            if self.proc is None:
                return 0
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self._log.close()
            return int(self.proc.returncode)
        finally:
            shutil.rmtree(self.sockdir, ignore_errors=True)


def http_get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
             ) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET over a raw socket: (status, body)."""
    return raw_request(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "Connection: close\r\n\r\n", timeout)


def raw_request(port: int, request: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = None
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                if length is not None and len(body) >= length:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def handshake(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw WebSocket upgrade request: (status, response headers, body)."""
    h = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    h.update(headers or {})
    req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if status != 101:
            length = int(hdrs.get("content-length", "0"))
            while len(body) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
    return status, hdrs, body


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(raw)


async def recv_until(ws: ClientConnection, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0
                     ) -> dict[str, Any]:
    """The first frame matching ``pred`` (others are skipped), within ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError("no matching frame")
        msg = await recv_json(ws, left)
        if pred(msg):
            return msg


async def request(ws: ClientConnection, frame: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send a client request and return its reply (matched by id), skipping pushes."""
    await ws.send(json.dumps(frame))
    return await recv_until(ws, lambda m: m.get("id") == frame.get("id") and "ok" in m, timeout)


async def frames_before(ws: ClientConnection, marker: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every frame received before the message whose data is ``{"sentinel": marker}``."""
    seen: list[dict[str, Any]] = []
    while True:
        m = await recv_json(ws, timeout)
        if m.get("type") == "message" and m.get("data") == {"sentinel": marker}:
            return seen
        seen.append(m)


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    msg = await recv_json(ws)
    assert msg["type"] == "welcome", msg
    return msg


async def closed_with(ws: ClientConnection, timeout: float = 10.0) -> tuple[int | None, str]:
    """Read until the server closes; the close code and reason the client saw."""
    from websockets.exceptions import ConnectionClosed

    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed:
        pass
    rcvd = ws.close_code if ws.close_code is not None else None
    return rcvd, ws.close_reason or ""


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout: float = 5.0, step: float = 0.02) -> None:
    """Poll an async predicate until true, failing after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await pred():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)
