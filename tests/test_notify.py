"""wsd under a service manager: sd_notify messages from a real daemon, and the example systemd unit.

The test binds the datagram socket systemd would ($NOTIFY_SOCKET: a path, or '@name' in the abstract
namespace), starts a real `wsd serve` with it, and reads what the daemon says: READY=1 once the port
accepts, RELOADING=1 + MONOTONIC_USEC then READY=1 around a reload (a refused one too, with STATUS= saying
why), WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 at SIGTERM.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Wsd, make_token, tool_missing
from wsd.runtime.notify import Notifier, one_line, socket_address, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "examples" / "systemd" / "wsd.service"


class NotifyListener:
    """The service manager's end: a bound datagram socket and every message received on it."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dir = ""
        if abstract:
            name = f"wsd-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="wsdn-")  # short: AF_UNIX paths are limited to ~107 bytes
            path = os.path.join(self.dir, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def _poll(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(fields)

    def wait(self, pred: Callable[[dict[str, str]], bool], start: int = 0, timeout: float = 10.0
             ) -> tuple[int, dict[str, str]]:
        """(index, message) of the first message from ``start`` on matching ``pred``."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.messages):
                if pred(self.messages[i]):
                    return i, self.messages[i]
                i += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching notification; got {self.messages[start:]}")
            self._poll()

    def close(self) -> None:
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[NotifyListener]:
    lst = NotifyListener(abstract=request.param == "abstract")
    yield lst
    lst.close()


def _start_watching(wsd_factory: Callable[..., Wsd], listener: NotifyListener, extra_env: dict[str, str] | None = None
                    ) -> tuple[Wsd, int, dict[str, str]]:
    """Start a daemon in a thread while this thread waits for READY=1 and connects at once: the port must
    accept by the time READY=1 is read. (daemon, index of READY=1, READY=1 message)."""
    w = wsd_factory(env={"NOTIFY_SOCKET": listener.env_value, **(extra_env or {})}, start=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        i, ready = listener.wait(lambda m: m.get("READY") == "1", timeout=20)
        with socket.create_connection(("127.0.0.1", w.port), timeout=2):
            pass  # refused here would mean READY=1 came before the listener
    finally:
        t.join(30)
    assert not errors, errors
    return w, i, ready


def test_ready_reload_and_stop(wsd_factory: Callable[..., Wsd], listener: NotifyListener) -> None:
    """READY=1 once the port accepts; RELOADING=1 with MONOTONIC_USEC then READY=1 on SIGHUP (also when the
    file is refused: STATUS= names why); STOPPING=1 on SIGTERM, then exit 0."""
    w, i, ready = _start_watching(wsd_factory, listener)
    assert w.proc is not None
    assert ready["MAINPID"] == str(w.proc.pid)
    assert f"listening on ws://127.0.0.1:{w.port}" in ready["STATUS"] and "0 connections" in ready["STATUS"]
    assert not any("RELOADING" in m or "STOPPING" in m for m in listener.messages[:i])

    # a good reload
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    w.signal(signal.SIGHUP)
    j, reloading = listener.wait(lambda m: m.get("RELOADING") == "1", i + 1)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    k, ready = listener.wait(lambda m: m.get("READY") == "1", j + 1)
    assert "refused" not in ready["STATUS"]

    # a refused reload still ends with READY=1, and STATUS= says why
    good = w.config_path.read_text()
    w.config_path.write_text(good + '\n[engine]\ntype = "nope"\n')
    w.signal(signal.SIGHUP)
    j, _ = listener.wait(lambda m: m.get("RELOADING") == "1", k + 1)
    k, ready = listener.wait(lambda m: m.get("READY") == "1", j + 1)
    assert "reload refused, running the previous config" in ready["STATUS"], ready
    assert "engine.type" in ready["STATUS"], ready  # the key path of the first error
    assert "0 connections; listening on" in ready["STATUS"]
    assert w.proc.poll() is None

    # fixed: the next reload clears the note
    w.config_path.write_text(good)
    w.signal(signal.SIGHUP)
    j, _ = listener.wait(lambda m: m.get("RELOADING") == "1", k + 1)
    k, ready = listener.wait(lambda m: m.get("READY") == "1", j + 1)
    assert "refused" not in ready["STATUS"]

    w.signal(signal.SIGTERM)
    _, stopping = listener.wait(lambda m: m.get("STOPPING") == "1", k + 1)
    assert stopping["STATUS"].startswith("draining")
    assert w.proc.wait(15) == 0


def test_reload_over_the_control_socket_notifies_too(wsd_factory: Callable[..., Wsd]) -> None:
    """`wsctl reload` goes through the same reload: RELOADING=1 then READY=1."""
    lst = NotifyListener(abstract=False)
    try:
        w, i, _ = _start_watching(wsd_factory, lst)
        out = subprocess.run([sys.executable, "-m", "wsctl", "--socket", w.socket, "reload"], capture_output=True,
                             text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert out.returncode == 0, out.stderr
        j, _ = lst.wait(lambda m: m.get("RELOADING") == "1", i + 1)
        lst.wait(lambda m: m.get("READY") == "1", j + 1)
    finally:
        lst.close()


def test_watchdog_pings_and_status_counts_connections(wsd_factory: Callable[..., Wsd]) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 comes about every half of it; STATUS= follows the connection count
    (at most every few seconds)."""
    lst = NotifyListener(abstract=True)
    try:
        w, i, _ = _start_watching(wsd_factory, lst, {"WATCHDOG_USEC": "200000"})  # a ping every 0.1 s
        t0 = time.monotonic()
        j = i
        for _ in range(5):
            j, _ = lst.wait(lambda m: m.get("WATCHDOG") == "1", j + 1, timeout=3)
        assert time.monotonic() - t0 < 3.0

        async def two_clients() -> dict[str, str]:
            async with w.connect("mt5", make_token("alice")) as a, w.connect("mt5", make_token("bob")) as b:
                await a.recv(), await b.recv()
                return await asyncio.to_thread(
                    lst.wait, lambda m: "2 connections" in m.get("STATUS", ""), j + 1, 12)

        _, status = asyncio.run(two_clients())
        assert status["STATUS"].startswith("2 connections; listening on ws://127.0.0.1:")
        # not per connection: STATUS= lines are at least STATUS_EVERY_S apart
        assert sum(1 for m in lst.messages if "STATUS" in m and "READY" not in m) <= 1 + (
            time.monotonic() - t0) / 5.0
    finally:
        lst.close()


def test_a_watchdog_for_another_process_is_not_pinged(wsd_factory: Callable[..., Wsd]) -> None:
    """WATCHDOG_PID naming another process (a wrapper's watchdog) means: not ours, no pings."""
    lst = NotifyListener(abstract=False)
    try:
        w, i, _ = _start_watching(wsd_factory, lst, {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
        time.sleep(0.6)  # six ping periods: enough for pings to show if they were (wrongly) sent
        lst._poll()
        assert not any("WATCHDOG" in m for m in lst.messages)
    finally:
        lst.close()


def test_a_notify_socket_nobody_listens_on_does_not_stop_the_daemon(wsd_factory: Callable[..., Wsd],
                                                                     tmp_path: Path) -> None:
    """A dead or bogus NOTIFY_SOCKET: the daemon serves anyway, says so once in its log, and stops cleanly."""
    for value in (str(tmp_path / "nobody-here"), "vsock:2:1234"):
        w = wsd_factory(env={"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "100000"})

        async def hello() -> None:
            async with w.connect("mt5", make_token()) as ws:
                assert '"welcome"' in await ws.recv()

        asyncio.run(hello())
        assert w.stop() == 0
        log = w.log()
        assert "NOTIFY_SOCKET" in log and log.count("NOTIFY_SOCKET") == 1, log


# -- the pure parts ---------------------------------------------------------------------------------------------


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@wsd/notify") == "\0wsd/notify"
    for bad in ("", "@", "relative/path", "vsock:2:1234"):
        assert socket_address(bad) is None


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    for bad in ("", "0", "-5", "ten"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}, 42) is None


def test_status_is_one_bounded_line_and_unset_socket_is_a_no_op() -> None:
    assert one_line("a\nb\r\n  c") == "a b c"
    assert len(one_line("x" * 1000)) == 300
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and not n.watchdog() and n.watchdog_s is None


# -- the example unit ----------------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_unit_matches_what_the_daemon_does() -> None:
    """Type=notify with a HUP reload, a watchdog, the control socket's runtime directory, a stop timeout longer
    than the default drain, and a sandbox without PrivateUsers (root's wsctl must keep its uid)."""
    from wsd.config import load_config

    s = _unit()["Service"]
    assert s["Type"] == "notify" and s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["RuntimeDirectory"] == "wsd" and s["Restart"] == "on-failure"
    assert re.fullmatch(r"\d+s", s["WatchdogSec"]) and re.fullmatch(r"\d+s", s["TimeoutStopSec"])
    drain_s = load_config(None, env={}).manager.drain_timeout_ms / 1000
    assert int(s["TimeoutStopSec"][:-1]) >= drain_s + 10
    assert "PrivateUsers" not in s
    assert s["ExecStart"].split()[1:3] == ["serve", "-c"]


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        msg = "systemd-analyze is not on PATH (Debian: apt-get install systemd)"
        tool_missing(msg)
    return tool


def _wsd_script() -> str:
    """The installed `wsd` console script (an executable file) for ExecStart, else this Python with -m wsd."""
    here = Path(sys.executable).with_name("wsd")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("wsd")
    return found or f"{sys.executable} -m wsd"  # not installed as a script: the module, same arguments


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds no unknown key, bad value or other complaint in the example unit (with
    ExecStart pointed at the installed wsd script, which must exist for verify)."""
    tool = _systemd_analyze()
    text = UNIT.read_text()
    assert "/opt/wsd/bin/wsd" in text
    unit = tmp_path / "wsd.service"
    unit.write_text(text.replace("/opt/wsd/bin/wsd", _wsd_script()))
    out = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 0 and not complaints, complaints

    # the check itself catches what it is for: a misspelt key and a bad value
    bad = tmp_path / "bad" / "wsd.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
                   .replace("LimitNOFILE=65536", "LimitNOFILE=lots"))
    out = subprocess.run([tool, "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=60)
    said = out.stdout + out.stderr
    assert "Unknown key 'ProtectClok'" in said and "lots" in said, said


# -- the control socket under systemd's RuntimeDirectory= ------------------------------------------------------


def test_default_control_socket_is_in_the_runtime_directory(tmp_path: Path) -> None:
    """With $RUNTIME_DIRECTORY (systemd RuntimeDirectory=wsd) and no control.socket, the daemon's control socket
    is $RUNTIME_DIRECTORY/wsd.sock, and wsctl reaches it there."""
    from tests.harness import BASE_CONFIG, free_port

    runtime = Path(tempfile.mkdtemp(prefix="wsdr-"))
    try:
        cfg = tmp_path / "wsd.toml"
        cfg.write_text(BASE_CONFIG)
        env = dict(os.environ, PYTHONPATH=str(ROOT), RUNTIME_DIRECTORY=str(runtime))
        for k in ("WSD_SOCKET", "WSD_CONTROL_SOCKET"):
            env.pop(k, None)
        sock = runtime / "wsd.sock"
        with open(tmp_path / "wsd.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "wsd", "serve", "-c", str(cfg), "--port", str(free_port())],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert proc.poll() is None, (tmp_path / "wsd.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "wsd.log").read_text()
                time.sleep(0.05)
            out = subprocess.run([sys.executable, "-m", "wsctl", "--socket", str(sock), "--json", "status"],
                                 capture_output=True, text=True, timeout=30, env=env)
            assert out.returncode == 0, out.stderr
            assert str(sock) in out.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        assert not sock.exists()  # removed at stop
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_wsctl_looks_in_run_wsd_after_the_user_runtime_dir(tmp_path: Path) -> None:
    """wsctl's default candidates: $XDG_RUNTIME_DIR/wsd/wsd.sock, /run/wsd/wsd.sock, /tmp/wsd-$UID/wsd.sock; with
    none present it names where a wsd started by this user would be (never /run/wsd)."""
    from wsctl.client import default_candidates, discover_socket

    tmp = f"/tmp/wsd-{os.getuid()}/wsd.sock"
    assert default_candidates({}) == ["/run/wsd/wsd.sock", tmp]
    (tmp_path / "xdg").mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    assert default_candidates(env) == [str(tmp_path / "xdg" / "wsd" / "wsd.sock"), "/run/wsd/wsd.sock", tmp]
    if not os.path.exists("/run/wsd/wsd.sock") and not os.path.exists(tmp):
        assert discover_socket(None, None, env).path == str(tmp_path / "xdg" / "wsd" / "wsd.sock")
        assert discover_socket(None, None, {}).path == tmp


# -- MemoryDenyWriteExecute= ---------------------------------------------------------------------------------------

SITECUSTOMIZE = '''
import ctypes, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    raise SystemExit("PR_SET_MDWE unsupported")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("PR_SET_MDWE set but a writable+executable mapping was allowed")
except PermissionError:
    pass
'''


def _mdwe_supported() -> bool:
    code = "import ctypes; print(ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() == "0"


def test_daemon_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the daemon must never need memory both writable and executable.
    Run it under the kernel's PR_SET_MDWE (the same refusal, set before any module of wsd is imported) with what
    loads native code: uvloop, msgspec, TLS, RS256 tokens (cryptography), permessage-deflate; and reload it."""
    if not _mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3+)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from websockets.asyncio.client import connect

    from tests.harness import BASE_CONFIG, SECRET
    from tests.test_tls import TlsWsd

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    (tmp_path / "jwt.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    keys = ROOT / "examples" / "configs" / "keys"
    config = (BASE_CONFIG.replace('algorithms = ["HS256"]', 'algorithms = ["RS256"]')
              .replace(f'secret = "{SECRET}"', f'public_key_file = "{tmp_path / "jwt.pub.pem"}"')
              .replace("[manager]\n", "[manager]\nenable_compression = true\n"))
    w = TlsWsd(tmp_path, config, env={"PYTHONPATH": f"{site}:{ROOT}",
                                      "WSD_SERVER_TLS_CERT": str(keys / "tls-example.crt.pem"),
                                      "WSD_SERVER_TLS_KEY": str(keys / "tls-example.key.pem")})
    w.client_ctx = ssl_context = ssl.create_default_context(cafile=str(keys / "tls-example.crt.pem"))
    try:
        w.start()
        token = make_token("alice", "acme", secret=priv, algorithm="RS256")

        async def session() -> None:
            async with connect(f"wss://127.0.0.1:{w.port}/ws/frontend?token={token}", ssl=ssl_context,
                               compression="deflate", open_timeout=10) as ws:
                assert '"welcome"' in await ws.recv()
                assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
                await ws.send('{"op":"subscribe","id":1,"channel":"trading-signals"}')
                assert '"ok":true' in await ws.recv()
                await w.ctl("publish", channel="trading-signals/acme", type="t", data={"x": "y" * 500})
                assert '"y' in await ws.recv()

        asyncio.run(session())
        w.signal(signal.SIGHUP)
        asyncio.run(session())
    finally:
        assert w.stop() == 0, w.log()
    assert "Traceback" not in w.log() and "PR_SET_MDWE" not in w.log()


def test_a_reload_storm_pairs_every_reloading_with_ready_and_keeps_serving(wsd_factory: Callable[..., Wsd]) -> None:
    """100 SIGHUPs as fast as they can be sent, a client connected throughout: the daemon serves on, each
    RELOADING=1 is followed by its READY=1 (the service manager is never left in "reloading"), and the
    MONOTONIC_USEC values never go back."""
    lst = NotifyListener(abstract=False)
    try:
        w, i, _ = _start_watching(wsd_factory, lst)
        assert w.proc is not None

        async def storm() -> None:
            async with w.connect("mt5", make_token("alice")) as ws:
                await ws.recv()
                for _ in range(100):
                    os.kill(w.proc.pid, signal.SIGHUP)
                await ws.send('{"op": "ping", "id": 1}')
                assert '"pong"' in await asyncio.wait_for(ws.recv(), 10)  # served on through the storm

        # Read as a service manager does, all along: a datagram socket queues only net.unix.max_dgram_qlen
        # (10) messages, and the daemon never blocks on a full one (a message it could not send is dropped).
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                lst._poll()
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            asyncio.run(storm())
        finally:
            stop.set()
            reader.join(5)

        async def reloads() -> int:
            return int((await w.ctl("status"))["reloads"])
        n = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = asyncio.run(reloads())
            lst._poll()
            if sum(1 for m in lst.messages[i + 1:] if m.get("READY") == "1") >= n and n >= 1:
                break
        for _ in range(20):
            lst._poll()
        after = [m for m in lst.messages[i + 1:] if "RELOADING" in m or "READY" in m]
        assert w.proc.poll() is None
        assert 1 <= n <= 100 and len(after) == 2 * n, (n, len(after))
        assert all("RELOADING" in a and "READY" in b for a, b in zip(after[::2], after[1::2], strict=True))
        usecs = [int(m["MONOTONIC_USEC"]) for m in after[::2]]
        assert usecs == sorted(usecs)
        assert "refused" not in after[-1]["STATUS"]
    finally:
        lst.close()


def test_a_watchdog_usec_far_too_short_does_not_spin_the_loop(wsd_factory: Callable[..., Wsd]) -> None:
    """WATCHDOG_USEC=1 (a typo in WatchdogSec=): pings come at most every 10 ms, not in a busy loop starving
    the clients, and the log says the watchdog cannot be met."""
    lst = NotifyListener(abstract=True)
    try:
        w, i, _ = _start_watching(wsd_factory, lst, {"WATCHDOG_USEC": "1"})
        time.sleep(0.5)  # fifty floor periods
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:
            lst._poll()
        pings = sum(1 for m in lst.messages[i + 1:] if m.get("WATCHDOG") == "1")
        assert 1 <= pings <= 100, pings
        assert "WATCHDOG_USEC" in w.log()
    finally:
        lst.close()
