"""TLS on the WebSocket port with a trustme CA: wss:// works for a client trusting the CA, and a plain
ws:// client (or one that does not trust the CA) cannot get in."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidMessage

from tests.harness import BASE_CONFIG, Wsd, make_token, welcome


class TlsWsd(Wsd):
    """A daemon serving wss://; readiness is polled over TLS."""

    client_ctx: ssl.SSLContext

    def wait_ready(self, timeout: float = 15.0) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"wsd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                c = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2, context=self.client_ctx)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"wsd not ready in {timeout}s:\n{self.log()}")


@pytest.fixture(scope="module")
def tls_wsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsWsd]:
    """A daemon with a server certificate for 127.0.0.1 issued by a throwaway CA."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(d / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    w = TlsWsd(d, BASE_CONFIG, env={"WSD_SERVER_TLS_CERT": str(d / "cert.pem"),
                                    "WSD_SERVER_TLS_KEY": str(d / "key.pem")})
    w.client_ctx = ssl.create_default_context()
    ca.configure_trust(w.client_ctx)
    w.start()
    yield w
    assert w.stop() == 0


async def test_wss_with_trusted_ca_connects(tls_wsd):
    """A wss:// client trusting the CA completes the handshake and gets its welcome."""
    url = f"wss://127.0.0.1:{tls_wsd.port}/ws/frontend?token={make_token('secure')}"
    async with connect(url, ssl=tls_wsd.client_ctx, open_timeout=5) as ws:
        w = await welcome(ws)
        assert w["user_id"] == "secure" and w["pool"] == "frontend"


async def test_plain_ws_to_tls_port_fails(tls_wsd):
    """A plain ws:// client cannot talk to the TLS port, and the daemon keeps serving."""
    url = f"ws://127.0.0.1:{tls_wsd.port}/ws/frontend?token={make_token('plain')}"
    with pytest.raises((InvalidMessage, InvalidHandshake, OSError, EOFError, asyncio.TimeoutError)):
        async with connect(url, open_timeout=3):
            pass
    async with connect(url.replace("ws://", "wss://"), ssl=tls_wsd.client_ctx, open_timeout=5) as ws:
        await welcome(ws)


async def test_wss_without_trusting_the_ca_fails(tls_wsd):
    """A client that does not trust the throwaway CA refuses the certificate."""
    url = f"wss://127.0.0.1:{tls_wsd.port}/ws/frontend?token={make_token('naive')}"
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(url, ssl=ssl.create_default_context(), open_timeout=5):
            pass
