"""A synchronous client for wsd's control socket, and where to find that socket.

Owns: socket discovery (``--socket``, ``$WSD_SOCKET``, config ``control.socket``, the runtime dir,
``/tmp/wsd-$UID``), the socket I/O, and the ways a call can fail (``Unreachable`` exit 3,
``RequestFailed`` exit 1, ``UsageFailure`` exit 2). The framing, id matching and protocol version
check are ``wsd.control.protocol.ClientCodec``'s, shared with the dashboard.

Imports nothing from the daemon except ``wsd.control.protocol``: wsctl must start fast and work
against a daemon it does not share code with at run time. The TUI uses this client too.
"""

from __future__ import annotations

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


# The daemon answered with an error (exit 1); also raised for a daemon that broke the protocol.
RequestFailed = P.RequestFailed


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


#: Where the systemd unit (examples/systemd/wsd.service) puts the control socket.
SERVICE_SOCKET = "/run/wsd/wsd.sock"


def default_candidates(env: Mapping[str, str]) -> list[str]:
    """The default socket paths, in discovery order: the runtime dir, the system service's
    (``/run/wsd/wsd.sock``: systemd ``RuntimeDirectory=wsd``), then ``/tmp/wsd-$UID``."""
    out = []
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        out.append(os.path.join(xdg, "wsd", "wsd.sock"))
    out.append(SERVICE_SOCKET)
    out.append(f"/tmp/wsd-{os.getuid()}/wsd.sock")
    return out


def discover_socket(
    explicit: str | None = None, config_path: str | None = None, env: Mapping[str, str] | None = None
) -> SocketChoice:
    """The control socket to use, first found:

    ``--socket``, ``$WSD_SOCKET``, config ``control.socket`` (with ``$WSD_CONTROL_SOCKET`` overriding
    the file, as in wsd; the file is read only when ``-c`` or ``$WSD_CONFIG`` names it), then the first
    of ``$XDG_RUNTIME_DIR/wsd/wsd.sock``, ``/run/wsd/wsd.sock`` and ``/tmp/wsd-$UID/wsd.sock`` that exists
    (``$XDG_RUNTIME_DIR/wsd/wsd.sock``, else ``/tmp/wsd-$UID/wsd.sock``, when none does: where wsd would put it).
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
    return SocketChoice(next(c for c in cands if c != SERVICE_SOCKET), "default")


# -------------------------------------------------------------------------------------------- client


class Client:
    """One connection to the control socket; ``call`` methods, ``stream`` events.

    The bytes go through ``wsd.control.protocol.ClientCodec``; this class only connects, writes and
    reads. The first request on a connection is preceded by ``hello`` (pipelined: no extra round
    trip), which the codec checks, so a daemon speaking another protocol version is reported plainly
    instead of misread.
    """

    def __init__(self, path: str, timeout: float = REPLY_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.codec: P.ClientCodec | None = None
        self.hello: dict[str, Any] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.codec = None

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
        self.codec = P.ClientCodec(peer=f"wsd at {self.path}")

    def _send(self, method: str, params: Mapping[str, Any]) -> int:
        """Connect if needed (then ``hello`` goes first, in the same write), and send one request."""
        out = b""
        if self.sock is None:
            self._connect()
            assert self.codec is not None
            out = self.codec.hello_request()[1]
        assert self.sock is not None and self.codec is not None
        try:
            rid, data = self.codec.request(method, dict(params))
        except P.RequestTooLarge as exc:
            if out:
                self.close()  # the hello was not sent either: the next call starts afresh
            raise UsageFailure(exc.code, exc.message) from None
        try:
            self.sock.sendall(out + data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already answered (e.g. forbidden) and closed: read that reply
        except OSError as exc:
            raise Unreachable(self.path, f"{exc.strerror or exc}") from None
        return rid

    def _next(self) -> P.Reply | P.Event | None:
        """The next reply or event, reading as needed; None when the daemon closed the connection."""
        assert self.sock is not None and self.codec is not None
        while True:
            ev = self.codec.next_event()
            if isinstance(ev, (P.Reply, P.Event)):
                return ev
            if ev is P.CLOSED:
                return None
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise Unreachable(self.path, f"no reply within {self.timeout:g}s") from None
            except OSError as exc:
                raise Unreachable(self.path, f"{exc.strerror or exc}") from None
            self.codec.receive_data(data)

    def _wait(self, rid: int) -> Any:
        """The result of request ``rid``, or the daemon's error (the hello's included) raised."""
        while True:
            ev = self._next()
            if ev is None:
                raise Unreachable(self.path, "the daemon closed the connection without a reply")
            if isinstance(ev, P.Reply):
                assert self.codec is not None
                self.hello = self.codec.hello
                if ev.id == rid or ev.id is None or ev.error is not None:
                    return ev.unwrap()

    def call(self, method: str, /, **params: Any) -> Any:
        """One request, one reply: the ``result``, or ``RequestFailed`` with the daemon's code."""
        return self._wait(self._send(method, params))

    def stream(self, method: str = "events.subscribe", /, **params: Any) -> Iterator[dict[str, Any]]:
        """Open a stream (``events.subscribe``) and yield each ``event`` until the daemon closes it."""
        self._wait(self._send(method, params))
        assert self.sock is not None
        self.sock.settimeout(None)  # a quiet daemon is not a dead one
        while True:
            ev = self._next()
            if ev is None:
                return
            if isinstance(ev, P.Event):
                yield ev.data


def call(path: str, method: str, /, **params: Any) -> Any:
    """One call on a fresh connection."""
    with Client(path) as c:
        return c.call(method, **params)
