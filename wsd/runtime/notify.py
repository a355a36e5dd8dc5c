"""The service manager's notification protocol (sd_notify): one datagram per state change to $NOTIFY_SOCKET.

systemd (``Type=notify``) and other supervisors that speak it hand the daemon a Unix datagram socket in
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace) and read ``KEY=VALUE`` lines from it:
``READY=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=``, ``STOPPING=1``, ``STATUS=``, ``WATCHDOG=1``. With
``$NOTIFY_SOCKET`` unset every call is a no-op. A send never blocks the event loop and never raises: a
supervisor that is gone or not reading loses the message, not the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("wsd")

#: A STATUS= text is cut to this many characters (systemctl status shows one line).
STATUS_MAX = 300
#: Pings come at most this often (seconds), whatever ``$WATCHDOG_USEC`` asks: a far too short WatchdogSec=
#: (``1us`` for ``1s``) must not turn the event loop into a busy loop that starves the clients.
WATCHDOG_MIN_S = 0.01


def socket_address(value: str) -> str | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value: a path, or ``\\0name`` for ``@name``; None for a
    value this module cannot use (empty, relative, or another socket family such as ``vsock:``)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, when it is set for this process
    (``$WATCHDOG_PID`` absent or equal to ``pid``); None otherwise."""
    raw = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def one_line(text: str) -> str:
    """A STATUS= value: one line, bounded."""
    text = " ".join(text.split())
    return text if len(text) <= STATUS_MAX else text[:STATUS_MAX - 3] + "..."


class Notifier:
    """Messages to the service manager; every method is a no-op when ``$NOTIFY_SOCKET`` is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket path or @name: service notifications are off", raw)
        self.watchdog_s = watchdog_interval(env, os.getpid()) if self.address else None
        if self.watchdog_s is not None and self.watchdog_s < WATCHDOG_MIN_S:
            log.warning("WATCHDOG_USEC=%s is too short to be met (WatchdogSec= in the unit): pinging every %g s, "
                        "the service manager will restart the daemon", env.get("WATCHDOG_USEC"), WATCHDOG_MIN_S)
            self.watchdog_s = WATCHDOG_MIN_S
        self.last_status = ""
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when it could not be sent (or notifications are off)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:  # said once: a supervisor that went away would fill the log otherwise
                log.warning("service notification not sent to NOTIFY_SOCKET: %s", exc.strerror or exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def status_line(self, status: str) -> str:
        self.last_status = one_line(status)
        return f"STATUS={self.last_status}"

    def ready(self, status: str) -> bool:
        return self.send("READY=1", self.status_line(status), f"MAINPID={os.getpid()}")

    def reloading(self, status: str = "reloading the config") -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", self.status_line(status))

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", self.status_line(status))

    def status(self, status: str) -> bool:
        """A STATUS= line, sent only when the text changed."""
        if one_line(status) == self.last_status:
            return False
        return self.send(self.status_line(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
