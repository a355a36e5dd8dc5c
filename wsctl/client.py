"""A synchronous client for wsd's control socket, and where to find that socket.

Owns: socket discovery (``--socket``, ``$WSD_SOCKET``, config ``control.socket``, the runtime dir,
``/tmp/wsd-$UID``), the newline-delimited JSON framing, the protocol version check, and the three
ways a call can fail (``Unreachable`` exit 3, ``RequestFailed`` exit 1, ``UsageFailure`` exit 2).

Imports nothing from the daemon except ``wsd.control.protocol``: wsctl must start fast and work
against a daemon it does not share code with at run time. The TUI uses this client too.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from wsd.control import protocol as P

CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 30.0


class WsctlError(Exception):
    """A failure shown to the user as one line (plus optional detail lines) and a fixed exit code."""

    exit_code = 1

    def __init__(self, code: str, message: str, details: list[str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []
        self.extra = extra

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        out.update(self.extra)
        out["exit_code"] = self.exit_code
        return out


class RequestFailed(WsctlError):
    """The daemon answered with an error (exit 1)."""

    exit_code = 1


class UsageFailure(WsctlError):
    """The command line is wrong in a way the parser could not see (exit 2)."""

    exit_code = 2


class Unreachable(WsctlError):
    """No daemon answers on the socket (exit 3)."""

    exit_code = 3

    def __init__(self, path: str, why: str = "") -> None:
        msg = f"cannot reach wsd at {path}: " + (why or "is it running? (wsd serve)")
        super().__init__("unreachable", msg, socket=path)
        self.path = path


# ------------------------------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class SocketChoice:
    path: str
    source: str  # "--socket", "$WSD_SOCKET", "config FILE", "$WSD_CONTROL_SOCKET", "default"


def config_socket(config_path: str) -> str:
    """``control.socket`` from a wsd config file, resolved as wsd resolves it ("" if unset).

    A relative path is taken relative to the config file's directory; ``~`` is expanded.
    """
    try:
        with open(config_path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise UsageFailure(
            "bad_config", f"config {config_path}: cannot read: {exc.strerror or exc}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageFailure("bad_config", f"config {config_path}: TOML syntax error: {exc}") from None
    control = raw.get("control")
    value = control.get("socket", "") if isinstance(control, dict) else ""
    if not isinstance(value, str):
        raise UsageFailure("bad_config", f"config {config_path}: control.socket: expected a string")
    if not value:
        return ""
    value = os.path.expanduser(value)
    if not os.path.isabs(value):
        value = os.path.join(os.path.dirname(os.path.abspath(config_path)), value)
    return value


def default_candidates(env: Mapping[str, str]) -> list[str]:
    """The default socket paths, in discovery order: the runtime dir, then ``/tmp/wsd-$UID``."""
    out = []
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        out.append(os.path.join(xdg, "wsd", "wsd.sock"))
    out.append(f"/tmp/wsd-{os.getuid()}/wsd.sock")
    return out


def discover_socket(
    explicit: str | None = None, config_path: str | None = None, env: Mapping[str, str] | None = None
) -> SocketChoice:
    """The control socket to use, first found:

    ``--socket``, ``$WSD_SOCKET``, config ``control.socket`` (with ``$WSD_CONTROL_SOCKET`` overriding
    the file, as in wsd; the file is read only when ``-c`` or ``$WSD_CONFIG`` names it), then the first
    of ``$XDG_RUNTIME_DIR/wsd/wsd.sock`` and ``/tmp/wsd-$UID/wsd.sock`` that exists (the first of them
    when neither does, which is where wsd would put it).
    """
    env = os.environ if env is None else env
    if explicit:
        return SocketChoice(explicit, "--socket")
    if env.get("WSD_SOCKET"):
        return SocketChoice(env["WSD_SOCKET"], "$WSD_SOCKET")
    if env.get("WSD_CONTROL_SOCKET"):
        return SocketChoice(os.path.expanduser(env["WSD_CONTROL_SOCKET"]), "$WSD_CONTROL_SOCKET")
    cfg = config_path or env.get("WSD_CONFIG")
    if cfg:
        path = config_socket(cfg)
        if path:
            return SocketChoice(path, f"config {cfg}")
    cands = default_candidates(env)
    for c in cands:
        if os.path.exists(c):
            return SocketChoice(c, "default")
    return SocketChoice(cands[0], "default")


# -------------------------------------------------------------------------------------------- client


class Client:
    """One connection to the control socket; ``call`` methods, ``stream`` events.

    The first request on a connection is preceded by ``hello`` (pipelined: no extra round trip) so
    a daemon speaking another protocol version is reported plainly instead of misread.
    """

    def __init__(self, path: str, timeout: float = REPLY_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.file: Any = None
        self.next_id = 1
        self.hello: dict[str, Any] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            s.close()
            raise Unreachable(self.path) from None
        except PermissionError:
            s.close()
            raise Unreachable(
                self.path, "permission denied (run wsctl as the user that runs wsd, or root)"
            ) from None
        except TimeoutError:
            s.close()
            raise Unreachable(self.path, f"no answer within {CONNECT_TIMEOUT_S:g}s") from None
        except OSError as exc:
            s.close()
            raise Unreachable(self.path, f"{exc.strerror or exc}") from None
        s.settimeout(self.timeout)
        self.sock = s
        self.file = s.makefile("rb")

    def _send(self, method: str, params: Mapping[str, Any]) -> int:
        assert self.sock is not None
        rid = self.next_id
        self.next_id += 1
        line = json.dumps({"id": rid, "method": method, "params": dict(params)}, separators=(",", ":"))
        data = line.encode() + b"\n"
        if len(data) > P.MAX_REQUEST_BYTES:
            raise UsageFailure(
                "too_large", f"request larger than {P.MAX_REQUEST_BYTES} bytes (the daemon's limit)"
            )
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already answered (e.g. forbidden) and closed: read that reply
        except OSError as exc:
            raise Unreachable(self.path, f"{exc.strerror or exc}") from None
        return rid

    def _read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except TimeoutError:
            raise Unreachable(self.path, f"no reply within {self.timeout:g}s") from None
        except OSError as exc:
            raise Unreachable(self.path, f"{exc.strerror or exc}") from None
        if not line:
            raise Unreachable(self.path, "the daemon closed the connection without a reply")
        try:
            msg = json.loads(line)
        except ValueError:
            raise RequestFailed("protocol", f"wsd at {self.path} sent a line that is not JSON") from None
        if not isinstance(msg, dict):
            raise RequestFailed("protocol", f"wsd at {self.path} sent a reply that is not an object")
        return msg

    def _reply(self, msg: dict[str, Any]) -> Any:
        err = msg.get("error")
        if err is not None:
            code = str(err.get("code", "failed")) if isinstance(err, dict) else "failed"
            text = str(err.get("message", err)) if isinstance(err, dict) else str(err)
            first, *rest = text.split("\n")
            if code == P.E_FORBIDDEN and "uid" in first:
                first += " (run wsctl as the user that runs wsd, or root)"
            raise RequestFailed(code, first, rest)
        return msg.get("result")

    def _open(self, method: str, params: Mapping[str, Any]) -> int:
        """Connect if needed, send hello first on a new connection, then the request; check hello."""
        first = self.sock is None
        if first:
            self._connect()
            hid = self._send("hello", {})
        rid = self._send(method, params)
        if first:
            reply = self._read()
            hello = self._reply(reply)
            if reply.get("id") != hid or not isinstance(hello, dict):
                raise RequestFailed("protocol", f"wsd at {self.path} did not answer hello")
            self.hello = hello
            if hello.get("protocol") != P.PROTOCOL_VERSION:
                raise RequestFailed(
                    "protocol_version",
                    f"wsd at {self.path} speaks control protocol "
                    f"{hello.get('protocol')}, this wsctl speaks {P.PROTOCOL_VERSION}: "
                    "use the wsctl that came with this wsd",
                )
        return rid

    def call(self, method: str, /, **params: Any) -> Any:
        """One request, one reply: the ``result``, or ``RequestFailed`` with the daemon's code."""
        params = {k: v for k, v in params.items() if v is not None}
        rid = self._open(method, params)
        while True:
            msg = self._read()
            if msg.get("id") == rid or msg.get("id") is None:
                return self._reply(msg)

    def stream(self, method: str = "events.subscribe", /, **params: Any) -> Iterator[dict[str, Any]]:
        """Open a stream (``events.subscribe``) and yield each ``event`` until the daemon closes it."""
        params = {k: v for k, v in params.items() if v is not None}
        rid = self._open(method, params)
        msg = self._read()
        if msg.get("id") != rid:
            self._reply(msg)
            raise RequestFailed("protocol", f"wsd at {self.path} did not acknowledge {method}")
        self._reply(msg)
        assert self.sock is not None
        self.sock.settimeout(None)  # a quiet daemon is not a dead one
        while True:
            line = self.file.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and isinstance(msg.get("event"), dict):
                yield msg["event"]


def call(path: str, method: str, /, **params: Any) -> Any:
    """One call on a fresh connection."""
    with Client(path) as c:
        return c.call(method, **params)
