"""`wsctl top` in a real pseudo-terminal, with the daemon stopped and started again under it.

The Textual pilot runs the app in-process with no terminal, so it cannot see what an operator sees
when the daemon goes away: a process killed by SIGPIPE, a terminal left in the alternate screen with
mouse tracking on. Here the real `python -m wsctl top` runs on a pty (os.openpty), its screen output
is read back, and every wait is bounded.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import make_token, welcome

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (os.openpty)")

LEAVE_ALT_SCREEN = b"\x1b[?1049l"
ENTER_ALT_SCREEN = b"\x1b[?1049h"
MOUSE_OFF = b"\x1b[?1000l"
MOUSE_ON = b"\x1b[?1000h"


class PtyProcess:
    """A child process on a pseudo-terminal of a fixed size; everything it draws is kept in ``out``."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 40, cols: int = 140) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.master = master
        self.out = bytearray()

    def pump(self, timeout: float) -> None:
        """Read what the child drew during at most ``timeout`` seconds."""
        r, _, _ = select.select([self.master], [], [], timeout)
        if r:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal (it exited)
                data = b""
            if data:
                self.out += data
            else:
                time.sleep(min(timeout, 0.05))

    def wait_for(self, pred: Callable[[bytes], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(bytes(self.out)):
                return
            self.pump(0.1)
        tail = bytes(self.out[-3000:]).decode(errors="replace")
        raise AssertionError(f"no {what} within {timeout}s (rc={self.proc.poll()}); screen tail:\n{tail!r}")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        for _ in range(20):  # drain what it wrote on the way out
            before = len(self.out)
            self.pump(0.05)
            if len(self.out) == before:
                break
        rc = self.proc.poll()
        assert rc is not None, f"still running after {timeout}s"
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        os.close(self.master)


async def test_top_survives_the_daemon_stopping_and_restores_the_terminal(wsd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_") and k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    ws = await wsd.connect("frontend", make_token("before-stop", "acme"))
    await welcome(ws)
    top = PtyProcess([sys.executable, "-m", "wsctl", "--socket", wsd.socket, "top", "--refresh", "0.2"], env)
    try:
        top.wait_for(lambda b: b"before-stop" in b, 30, "connection row for the first client")
        assert ENTER_ALT_SCREEN in top.out and MOUSE_ON in top.out
        await ws.close()

        wsd.stop()
        mark = len(top.out)
        top.wait_for(lambda b: b"cannot reach wsd" in b[mark:], 20, '"cannot reach wsd" banner')
        top.wait_for(lambda b: b"retrying" in b[mark:], 5, '"retrying" in the banner')
        for _ in range(10):  # several refreshes against the dead socket: still alive
            top.pump(0.1)
        assert top.proc.poll() is None, f"wsctl top died with {top.proc.returncode} when wsd stopped"

        wsd.start()
        ws2 = await wsd.connect("frontend", make_token("after-restart", "acme"))
        await welcome(ws2)
        mark = len(top.out)
        top.wait_for(lambda b: b"after-restart" in b[mark:], 30, "the new daemon's connection (reconnected)")
        await ws2.close()

        top.send(b"q")
        rc = top.wait_exit(15)
        assert rc == 0, f"wsctl top exited with {rc}"
        out = bytes(top.out)
        # the last thing drawn leaves the alternate screen and turns mouse tracking off
        assert out.rfind(LEAVE_ALT_SCREEN) > out.rfind(ENTER_ALT_SCREEN), "alternate screen not left"
        assert out.rfind(MOUSE_OFF) > out.rfind(MOUSE_ON), "mouse tracking left on"
        tail = out[-400:]
        assert LEAVE_ALT_SCREEN in tail and MOUSE_OFF in tail, f"terminal not restored at the end: {tail!r}"
    finally:
        top.close()
