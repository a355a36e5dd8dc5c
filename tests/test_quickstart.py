"""The README quick start end to end: `wsd serve` with NO config file, a token minted by the running
daemon (control socket `token`, and `wsctl token`), a client connects and gets its welcome."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.harness import Wsd, make_token, welcome


class BareWsd(Wsd):
    """`python -m wsd serve --port P --socket S`: no -c, no WSD_* variables, an empty working directory."""

    def start(self, timeout: float = 15.0) -> BareWsd:
        self.config_path.unlink()
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in self.env.items() if not k.startswith("WSD_")}
        cmd = [sys.executable, "-m", "wsd", "serve", "--port", str(self.port), "--socket", self.socket]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.workdir)
        self.wait_ready(timeout)
        return self


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareWsd]:
    w = BareWsd(tmp_path_factory.mktemp("quick"), "").start()
    yield w
    assert w.stop() == 0


async def test_no_config_serve_with_minted_token_gets_welcome(bare):
    """No config: the daemon runs on an ephemeral secret; a control-socket token connects to frontend."""
    assert "ephemeral" in bare.log()
    minted = await bare.ctl("token", user="alice", company="acme")
    url = f"ws://127.0.0.1:{bare.port}/ws/frontend?token={minted['token']}"
    async with connect(url, open_timeout=5) as ws:
        w = await welcome(ws)
    assert (w["pool"], w["user_id"], w["company_id"]) == ("frontend", "alice", "acme")
    assert w["subscriptions"] == ["system-status"]


async def test_no_config_serve_refuses_foreign_token(bare):
    """The ephemeral secret is the daemon's own: a token signed with any other key is refused 401."""
    with pytest.raises(InvalidStatus) as exc:
        async with connect(f"ws://127.0.0.1:{bare.port}/ws/frontend?token={make_token()}", open_timeout=5):
            pass
    assert exc.value.response.status_code == 401


async def test_wsctl_token_connects(bare):
    """`wsctl --socket S token --user bob` prints a token that opens the api pool."""
    out = subprocess.run([sys.executable, "-m", "wsctl", "--socket", bare.socket, "token", "--user", "bob"],
                         capture_output=True, text=True, timeout=20, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    url = f"ws://127.0.0.1:{bare.port}/ws/api"
    async with connect(url, additional_headers=headers, open_timeout=5) as ws:
        assert (await welcome(ws))["user_id"] == "bob"
    assert token not in bare.log()


async def test_sighup_without_config_file_is_logged_and_harmless(bare):
    """SIGHUP to a config-less daemon logs that there is nothing to reload and keeps serving."""
    import signal

    from tests.harness import wait_for

    bare.signal(signal.SIGHUP)

    async def logged() -> bool:
        return "no config file" in bare.log()

    await wait_for(logged, timeout=5)
    minted = await bare.ctl("token", user="carol")
    async with connect(f"ws://127.0.0.1:{bare.port}/ws/api?token={minted['token']}", open_timeout=5) as ws:
        assert (await welcome(ws))["user_id"] == "carol"
