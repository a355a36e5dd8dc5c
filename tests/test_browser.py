"""examples/browser in headless Chromium: the page (served by `python -m http.server`, as its README says)
shows live messages and the connection state; after a restart of its daemon (Redis engine) it resumes, shows
what was published meanwhile exactly once and marks no gap; after Redis lost the channel it marks a gap.

Drives Debian's /usr/bin/chromium through the Python `playwright` package (`executable_path`: no browser
download). Skipped when either is missing, failed instead under WSD_CI_REQUIRE_TOOLS=1."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import RedisServer
from tests.harness import REDIS_MISSING, SECRET, Wsd, free_port, tool_missing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "browser"
CHROMIUM = os.environ.get("WSD_CHROMIUM", "/usr/bin/chromium")
#: The launch flags: no sandbox (containers, root), nothing that talks to the network on its own.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]



def wsctl(w: Wsd, *args: str) -> str:
    """The real wsctl against this daemon's control socket; its standard output."""
    proc = subprocess.run([sys.executable, "-m", "wsctl", "--socket", w.socket, *args], capture_output=True,
                          text=True, timeout=30, env=dict(w.env, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def publish(w: Wsd, data: dict[str, Any]) -> None:
    """What `wsctl publish trading-signals/acme --type trading_signal --data ...` does, without a process."""
    # Playwright's sync API runs an event loop in this thread: a plain blocking socket instead of Wsd.ctl.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(w.socket)
        params = {"channel": "trading-signals/acme", "type": "trading_signal", "data": data}
        s.sendall(json.dumps({"id": 1, "method": "publish", "params": params}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "the control socket closed without a reply"
            reply += chunk
    assert "result" in json.loads(reply), reply


def serve_static(port: int) -> subprocess.Popen[bytes]:
    """`python -m http.server PORT --bind 127.0.0.1` at the repository root (examples/browser/README.md)."""
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("http.server did not start") from None
            time.sleep(0.05)


def test_example_config_allows_the_origin_the_readme_serves_from() -> None:
    """The README's `python -m http.server 8000` origin is the one examples/browser/wsd.toml allows."""
    readme = (EXAMPLE / "README.md").read_text()
    toml = (EXAMPLE / "wsd.toml").read_text()
    assert "python -m http.server 8000 --bind 127.0.0.1" in readme
    assert '"http://127.0.0.1:8000"' in toml and "http://127.0.0.1:8000/examples/browser/" in readme


@pytest.mark.timeout(240)  # three daemon starts and a browser, on a loaded 2-core machine
def test_dashboard_resumes_after_a_daemon_restart_and_marks_a_gap(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        tool_missing(f"{CHROMIUM} is missing: apt-get install chromium (the browser test drives it)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        tool_missing("the Python package playwright is missing: pip install -e '.[test]'")
    try:
        redis = RedisServer(tmp_path)
    except FileNotFoundError:
        tool_missing(REDIS_MISSING)
    redis.start()
    http_port, ws_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{http_port}"
    env = {"WSD_AUTH_SECRET": SECRET, "WSD_ENGINE_TYPE": "redis", "WSD_ENGINE_URL": redis.url,
           "WSD_ENGINE_PREFIX": "b" + secrets.token_hex(3), "WSD_SERVER_ALLOWED_ORIGINS": origin,
           "PYTHONPATH": str(ROOT)}
    config = (EXAMPLE / "wsd.toml").read_text()
    daemons: list[Wsd] = []

    def daemon(name: str, port: int | None = None) -> Wsd:
        d = tmp_path / name
        d.mkdir()
        w = Wsd(d, config, env=env, port=port)
        daemons.append(w)
        return w.start()

    static = serve_static(http_port)
    console: list[str] = []
    try:
        a = daemon("a", ws_port)
        b = daemon("b")  # a second node on the same Redis: publishes while A is down
        token = wsctl(a, "token", "--user", "alice", "--company", "acme").strip()
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=FLAGS)
            try:
                page = ctx.new_page()
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                ws_url = f"ws://127.0.0.1:{ws_port}/ws/frontend"
                page.goto(f"{origin}/examples/browser/#url={ws_url}&token={token}")
                state = page.locator("#state")
                expect(state).to_have_attribute("data-state", "open", timeout=15000)
                publish(a, {"m": 1})
                expect(page.locator("li.msg", has_text='{"m":1}')).to_have_count(1, timeout=10000)

                a.stop()  # SIGTERM: A drains (1001); the page reconnects to A, which is down
                expect(state).to_have_attribute("data-state", "connecting", timeout=10000)
                publish(b, {"m": 2})  # published while A is down
                a = daemon("a2", ws_port)  # A again, same port, same Redis
                # the page's backoff grew while A was down (up to 30 s, jittered)
                expect(page.locator("li.msg", has_text='{"m":2}')).to_have_count(1, timeout=45000)
                expect(state).to_have_attribute("data-state", "open", timeout=10000)
                publish(a, {"m": 3})
                expect(page.locator("li.msg", has_text='{"m":3}')).to_have_count(1, timeout=10000)
                # Resumed, not started again: once each, in order, and no gap marked.
                rows = page.locator("li.msg").all_inner_texts()
                assert len(rows) == 3, rows  # newest first
                assert ['"m":3' in rows[0], '"m":2' in rows[1], '"m":1' in rows[2]] == [True] * 3, rows
                expect(page.locator("li.gap")).to_have_count(0)
                assert "connections 2" in page.locator("#stats").inner_text()

                # Redis loses everything while A is down: the session and the channel's history are gone
                # (a new epoch), so what the page missed cannot be replayed: it marks a gap, then goes on.
                a.stop()
                b.stop()
                expect(state).to_have_attribute("data-state", "connecting", timeout=10000)
                redis.client().flushall()
                a = daemon("a3", ws_port)
                expect(state).to_have_attribute("data-state", "open", timeout=45000)
                publish(a, {"m": 4})
                gap = page.locator("li.gap")
                expect(gap).to_have_count(1, timeout=10000)
                expect(gap).to_contain_text("trading-signals/acme")
                expect(gap).to_be_visible()
                expect(page.locator("li.msg", has_text='{"m":4}')).to_have_count(1, timeout=10000)
                assert page.locator("#error").inner_text() == ""
            except Exception:
                print("browser console:\n" + "\n".join(console))
                for w in daemons:
                    print(f"--- {w.workdir.name}\n{w.log()[-3000:]}")
                raise
            finally:
                ctx.close()
    finally:
        static.terminate()
        static.wait(10)
        for w in daemons:
            w.stop()
        redis.stop()


ENCRYPTED_GROUPS = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
history_size = 20
publishers = ["api", "admin"]
encrypt = "k1"

[encryption.keys]
k1 = "{key}"
"""


@pytest.mark.timeout(180)
def test_dashboard_decrypts_an_encrypted_group_with_the_key_given_after_the_hash(tmp_path: Path) -> None:
    """The README's `#...&keys=KID=BASE64`: the page decrypts what the daemon encrypted (history and live); without
    the key, or with a wrong one, every message is still listed, marked with the reason; a key that is not 32 bytes
    is an error naming its key id, never the key."""
    if not Path(CHROMIUM).exists():
        tool_missing(f"{CHROMIUM} is missing: apt-get install chromium (the browser test drives it)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        tool_missing("the Python package playwright is missing: pip install -e '.[test]'")
    import base64

    # a key whose base64 has "+", "/" and "=": the address must carry them through (URLSearchParams reads + as " ")
    while "+" not in (text := base64.b64encode(os.urandom(32)).decode()) or "/" not in text:
        pass
    key_file = tmp_path / "k1.key"
    key_file.write_text(text + "\n")
    key_file.chmod(0o600)
    wrong = base64.b64encode(os.urandom(32)).decode()
    http_port = free_port()
    origin = f"http://127.0.0.1:{http_port}"
    env = {"WSD_AUTH_SECRET": SECRET, "WSD_SERVER_ALLOWED_ORIGINS": origin, "PYTHONPATH": str(ROOT)}
    config = (EXAMPLE / "wsd.toml").read_text() + ENCRYPTED_GROUPS.format(key=key_file)
    (tmp_path / "d").mkdir()
    w = Wsd(tmp_path / "d", config, env=env).start()
    static = serve_static(http_port)
    console: list[str] = []
    try:
        publish(w, {"m": 1, "s": "é€"})  # in history before the page connects
        token = wsctl(w, "token", "--user", "alice", "--company", "acme").strip()
        base = f"{origin}/examples/browser/#url=ws://127.0.0.1:{w.port}/ws/frontend&token={token}"
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=FLAGS)
            try:
                pages = {}
                for name, keys in (("right", f"k1={text}"), ("none", None), ("wrong", f"k1={wrong}")):
                    page = ctx.new_page()
                    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                    page.goto(base + (f"&keys={keys}" if keys else ""))
                    expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=15000)
                    pages[name] = page
                publish(w, {"m": 2})
                right = pages["right"]
                expect(right.locator("li.msg.decrypted")).to_have_count(2, timeout=10000)
                rows = right.locator("li.msg").all_inner_texts()  # newest first
                assert '{"m":2}' in rows[0] and '{"m":1,"s":"é€"}' in rows[1], rows
                assert all("(decrypted, key k1)" in r for r in rows), rows
                expect(right.locator("li.decrypt-error")).to_have_count(0)
                for name, reason in (("none", "no key for kid 'k1'"), ("wrong", "authentication failed")):
                    marked = pages[name].locator("li.msg.decrypt-error")
                    expect(marked).to_have_count(2, timeout=10000)  # still listed, both
                    for r in marked.all_inner_texts():
                        assert f"(not decrypted: {reason})" in r and '"m"' not in r, r
                bad = ctx.new_page()
                bad.goto(base + "&keys=k1=AAAA")
                expect(bad.locator("#error")).to_contain_text('keys["k1"] must hold 32 bytes', timeout=10000)
                assert "AAAA" not in bad.locator("#error").inner_text()
                expect(bad.locator("#state")).to_have_attribute("data-state", "closed")
            except Exception:
                print("browser console:\n" + "\n".join(console) + f"\n--- wsd\n{w.log()[-3000:]}")
                raise
            finally:
                ctx.close()
    finally:
        static.terminate()
        static.wait(10)
        w.stop()
