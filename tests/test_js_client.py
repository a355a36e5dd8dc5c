"""The JavaScript client (clients/js/wsd-client.js) against real daemons: pytest starts the daemons (and a
private redis-server), then runs Node's own test runner on clients/js/test/*.test.js with the daemons'
addresses in WSD_* variables, and asserts its exit status (its output is shown on failure).

Needs Node 20+ (its WebSocket behind --experimental-websocket; Node 22+ has it by default): skipped without
node, failed instead under WSD_CI_REQUIRE_TOOLS=1."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401  # the Redis fixture
from tests.harness import tool_missing

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"

CONFIG = """
[pools.frontend]
type = "frontend"
path = "/ws/frontend"
default_subscriptions = ["system-status"]
batching = { enabled = true, interval_ms = 100, max_messages = 100 }

[pools.api]
type = "api"
path = "/ws/api"

[pools.admin]
type = "admin"
path = "/ws/admin"
roles = ["admin"]

[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.admin-events]
type = "admin"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
history_size = 3
publishers = ["api", "admin"]

[[routing.rules]]
id = "orders"
priority = 10
filter = { message_types = ["order"] }
target = { type = "channel", reliable_delivery = true, max_retries = 5, ack_timeout_ms = 5000 }
"""


def node_or_skip() -> str:
    """The node binary (20 or newer), else skip (fail under WSD_CI_REQUIRE_TOOLS=1)."""
    exe = shutil.which("node")
    why = "node is not on PATH: install Node.js 20.10 or newer for the JavaScript client tests"
    if exe:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = version.strip()
        parts = version.lstrip("v").split(".")
        major_minor = (int(parts[0]), int(parts[1])) if version.startswith("v") and len(parts) > 1 else (0, 0)
        if major_minor >= (20, 10):  # 20.10: the first with --experimental-websocket
            return exe
        why = f"node {version} is too old: the JavaScript client tests need Node.js 20.10 or newer"
    tool_missing(why)


def run_node(files: list[str], env: dict[str, str], timeout: float = 240) -> None:
    """Run ``node --test`` on ``files`` (relative to clients/js) and fail with its output unless it passed."""
    exe = node_or_skip()
    # --experimental-websocket: Node 20's global WebSocket (undici); accepted and redundant on Node 22+.
    cmd = [exe, "--experimental-websocket", "--test", "--test-concurrency=1", "--test-reporter=spec", *files]
    # Its own process group: `node --test` runs each file in a child, and a failed run may leave clients
    # reconnecting for ever; on a timeout the whole group goes.
    proc = subprocess.Popen(cmd, cwd=JS, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"node --test {' '.join(files)} did not finish in {timeout} s:\n{out}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children the run left behind
    assert proc.returncode == 0, f"node --test {' '.join(files)} exited {proc.returncode}:\n{out}"
    assert "# fail 0" in out.replace("ℹ fail 0", "# fail 0") and "pass 0\n" not in out, out


def test_js_client_pure_parts() -> None:
    """Backoff, the close-code table (against docs/protocol.md and wsd/client/policy.py), tokens,
    decryption."""
    run_node(["test/unit.test.js"], {}, timeout=60)


def test_js_client_lifecycle_against_what_it_cannot_control() -> None:
    """A token function that never settles (start/close still settle), close() during a reconnect backoff
    (Node exits at once), a server whose history pages never move on, junk frames, an epoch change, a drop
    mid-request: clients/js/test/lifecycle.test.js."""
    run_node(["test/lifecycle.test.js"], {}, timeout=90)


@pytest.mark.timeout(300)  # one Node run of about 20 tests, some waiting out token lifetimes
def test_js_client_against_a_daemon(wsd_factory) -> None:
    """Delivery, batches, dedupe, acks, gaps, resume after a dropped or stalled network, URL failover, kick,
    takeover, 4001 and token refresh, 4003, onOther: clients/js/test/daemon.test.js."""
    w = wsd_factory(CONFIG)
    try:
        run_node(["test/daemon.test.js"], {"WSD_PORT": str(w.port), "WSD_SOCKET": w.socket})
    except AssertionError:
        print(w.log()[-5000:])
        raise


@pytest.mark.timeout(120)
def test_js_client_survives_a_killed_redis_node(wsd_factory, redis_url) -> None:  # noqa: F811
    """Two nodes on Redis: the client's node is killed (-9); it fails over to the other URL, resumes its
    session and gets what was published meanwhile exactly once, with no Gap: clients/js/test/redis.test.js."""
    toml = CONFIG + engine_toml(redis_url, "j" + secrets.token_hex(3))
    a, b = wsd_factory(toml), wsd_factory(toml)
    assert a.proc is not None
    run_node(["test/redis.test.js"], {"WSD_PORT_A": str(a.port), "WSD_PORT_B": str(b.port),
                                      "WSD_SOCKET_B": b.socket, "WSD_PID_A": str(a.proc.pid)})


ENCRYPTED = """
[pools.frontend]
type = "frontend"
path = "/ws/frontend"

[pools.api]
type = "api"
path = "/ws/api"

[channels.sig]
type = "company"
history_size = 20
publishers = ["api"]
encrypt = "k1"

[channels.plain]
type = "company"
publishers = ["api"]

[encryption.keys]
k1 = "{k1}"
k2 = "{k2}"

[[routing.rules]]
id = "orders"
filter = {{ message_types = ["order"] }}
target = {{ type = "channel", reliable_delivery = true, max_retries = 5, ack_timeout_ms = 5000 }}
"""


@pytest.mark.timeout(120)
def test_js_client_decrypts_what_a_daemon_encrypted(wsd_factory, tmp_path) -> None:
    """A daemon with an encrypted channel group (key files written by the real `wsd keygen`): the JavaScript client
    decrypts client and operator publications live, in history() and in a subscribe replay; a wrong key or none
    sets decryptError and the messages are still delivered (a reliable one acked); the AAD is the instance name;
    after a reload rotates the key id both kids decrypt: clients/js/test/encryption.test.js."""
    keys = {}
    for kid in ("k1", "k2"):
        path = tmp_path / f"{kid}.key"
        proc = subprocess.run([sys.executable, "-m", "wsd", "keygen", str(path)], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
        assert proc.returncode == 0, proc.stderr
        keys[kid] = path
    w = wsd_factory(ENCRYPTED.format(k1=keys["k1"], k2=keys["k2"]))
    try:
        run_node(["test/encryption.test.js"], {
            "WSD_PORT": str(w.port), "WSD_SOCKET": w.socket, "WSD_CONFIG": str(w.config_path),
            "WSD_KEY1": keys["k1"].read_text(), "WSD_KEY2": keys["k2"].read_text()}, timeout=90)
    except AssertionError:
        print(w.log()[-5000:])
        raise
