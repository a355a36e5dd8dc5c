"""examples/configs/production.toml and cluster.toml: the real `wsd config check` accepts them as shipped, and a
real daemon runs on each (wss:// with the example certificate; the Redis engine on a private redis-server)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.harness import REDIS_MISSING, free_port, make_token, tool_missing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "configs"
CERT = EXAMPLES / "keys" / "tls-example.crt.pem"


def _env(**extra: str) -> dict[str, str]:
    """This machine's environment without WSD_* overrides, so the example is checked as written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.mark.parametrize("name", ["production.toml", "cluster.toml"])
def test_wsd_config_check_accepts_the_example(name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "wsd", "config", "check", str(EXAMPLES / name)],
                         capture_output=True, text=True, timeout=60, env=_env(), cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok: {EXAMPLES / name}"


def test_the_check_would_catch_a_missing_key_file(tmp_path: Path) -> None:
    """The production example names files that must exist: without them `wsd config check` says which."""
    shutil.copy(EXAMPLES / "production.toml", tmp_path / "production.toml")
    out = subprocess.run([sys.executable, "-m", "wsd", "config", "check", str(tmp_path / "production.toml")],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 1
    for key in ("server.tls_cert", "server.tls_key", "auth.public_key_file"):
        assert key in out.stderr, out.stderr


class Served:
    """`wsd serve -c EXAMPLE` on 127.0.0.1, a free port and a private control socket."""

    def __init__(self, config: Path, **env: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsde-"))
        self.socket = str(self.dir / "ctl.sock")
        self.port = free_port()
        self.log = self.dir / "wsd.log"
        self.env = _env(WSD_SERVER_HOST="127.0.0.1", WSD_AUDIT_PATH=str(self.dir / "audit.jsonl"), **env)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "wsd", "serve", "-c", str(config), "--port",
                                          str(self.port), "--socket", self.socket], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)

    def wsctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wsctl", "--socket", self.socket, *args], capture_output=True,
                              text=True, timeout=30, env=self.env)

    def wait_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket) or self.wsctl("status").returncode != 0:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


@pytest.fixture
def production() -> Iterator[Served]:
    s = Served(EXAMPLES / "production.toml")
    yield s
    s.stop()


def test_production_example_serves_wss_with_rs256_and_its_rules(production: Served) -> None:
    """The daemon runs on the production example as shipped: wss:// with the example certificate (verified as
    the client's CA, for localhost), RS256 pinned (an HS256 token is refused), the mt5 pool's TLS handshake, the
    three routing rules live."""
    production.wait_socket()
    ctx = ssl.create_default_context(cafile=str(CERT))
    url = f"wss://localhost:{production.port}/ws/mt5"

    async def refused(target: str) -> tuple[int, dict[str, str]]:
        try:
            async with connect(target, ssl=ctx, open_timeout=10):
                pass
        except InvalidStatus as exc:
            return exc.response.status_code, json.loads(exc.response.body)
        raise AssertionError("the handshake was accepted")

    status, body = asyncio.run(refused(url))
    assert (status, body["error"]) == (401, "missing_token")
    status, body = asyncio.run(refused(f"{url}?token={make_token()}"))
    assert (status, body["error"]) == (401, "invalid_token")  # HS256 against an RS256-only daemon

    rules = json.loads(production.wsctl("--json", "rules").stdout)
    ids = [r["id"] for r in (rules["rules"] if isinstance(rules, dict) else rules)]
    assert ids == ["system-alerts", "large-signals-to-risk-desk", "trading-signals"]
    assert production.stop() == 0


def test_cluster_example_runs_on_redis(tmp_path: Path) -> None:
    """The cluster example runs as shipped but for WSD_ENGINE_URL, pointed at a private redis-server (the way the
    file says a node gets its Redis URL)."""
    if shutil.which("redis-server") is None:
        tool_missing(REDIS_MISSING)
    from tests.chaos import RedisServer

    redis = RedisServer(tmp_path)
    redis.start()
    node = Served(EXAMPLES / "cluster.toml", WSD_ENGINE_URL=redis.url, WSD_MANAGER_MANAGER_ID="wsd-node-7")
    try:
        node.wait_socket()
        status = json.loads(node.wsctl("--json", "status").stdout)
        text = json.dumps(status)
        assert "redis" in text and "wsd-node-7" in text, status
        assert node.stop() == 0
    finally:
        node.stop()
        redis.stop()
