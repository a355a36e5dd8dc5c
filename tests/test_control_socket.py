"""The control socket's framing end to end: a real daemon fed bytes as a careless client would send them,
and the real wsctl and dashboard source against a daemon that speaks another protocol version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from pathlib import Path

from tests.test_wsctl import awsctl, wsctl
from wsd.control import protocol as P


async def _exchange(path: str, chunks: list[bytes], replies: int, timeout: float = 10.0) -> list[dict]:
    """Write ``chunks`` one by one (each its own write), then read ``replies`` lines."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=P.MAX_REPLY_BYTES), 5)
    try:
        for c in chunks:
            writer.write(c)
            await writer.drain()
            await asyncio.sleep(0)  # let the daemon see a partial line
        out = []
        async with asyncio.timeout(timeout):
            for _ in range(replies):
                line = await reader.readline()
                assert line.endswith(b"\n"), (out, line)
                out.append(json.loads(line))
        return out
    finally:
        writer.close()


async def test_pipelined_split_and_bad_lines_each_get_their_reply_in_order(wsd):
    hello = b'{"id": 1, "method": "hello"}\n'
    status = b'{"id": 2, "method": "status"}\n'
    chunks = [hello + status[:9], status[9:] + b"nonsense\n" + b'{"id": 3, "method": "nope"}\n',
              b'\n{"id": 4, "method": "events.recent", "params": {"limit": 1}}\n']
    got = await _exchange(wsd.socket, chunks, 5)
    assert [r.get("id") for r in got] == [1, 2, None, 3, 4]
    assert got[0]["result"]["protocol"] == P.PROTOCOL_VERSION
    assert "connections" in got[1]["result"]
    assert got[2]["error"]["code"] == P.E_PARSE
    assert got[3]["error"]["code"] == P.E_UNKNOWN_METHOD
    assert isinstance(got[4]["result"]["events"], list)


async def test_an_oversize_request_is_refused_and_the_connection_closed(wsd):
    reader, writer = await asyncio.open_unix_connection(wsd.socket)
    try:
        writer.write(b'{"id": 1, "method": "publish", "params": {"data": "' + b"x" * (P.MAX_REQUEST_BYTES + 10))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        assert json.loads(line) == {"id": None, "error": {
            "code": P.E_BAD_REQUEST, "message": f"request larger than {P.MAX_REQUEST_BYTES} bytes"}}
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    finally:
        writer.close()
    assert (await wsd.ctl("hello"))["protocol"] == P.PROTOCOL_VERSION  # the daemon is fine


async def test_events_subscribe_refuses_an_unknown_kind(wsd):
    req = b'{"id": 9, "method": "events.subscribe", "params": {"kinds": ["kick", "bogus"]}}\n'
    got = await _exchange(wsd.socket, [req], 1)
    assert got[0]["id"] == 9 and got[0]["error"]["code"] == P.E_BAD_REQUEST
    assert "'bogus'" in got[0]["error"]["message"] and "heartbeat_timeout" in got[0]["error"]["message"]


class OtherVersionDaemon:
    """A socket that answers every request as a daemon of control protocol ``version`` would."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = str(path)
        self.version = version
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f, contextlib.suppress(OSError):  # the client may hang up first
                for line in f:
                    req = json.loads(line)
                    res = {"protocol": self.version, "version": "9.0.0"} if req["method"] == "hello" else {}
                    conn.sendall(json.dumps({"id": req["id"], "result": res}).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def test_wsctl_refuses_a_daemon_of_another_protocol_version(tmp_path):
    other = OtherVersionDaemon(tmp_path / "other.sock", P.PROTOCOL_VERSION + 1)
    try:
        r = wsctl(None, "--socket", other.path, "status")
        assert r.rc == 1, r
        assert r.err == (f"wsctl: error: wsd at {other.path} speaks control protocol {P.PROTOCOL_VERSION + 1}, "
                         f"this wsctl speaks {P.PROTOCOL_VERSION}: use the wsctl that came with this wsd\n"), r
        r = wsctl(None, "--socket", other.path, "--json", "pools")
        err = json.loads(r.err)["error"]
        assert (r.rc, err["code"], err["exit_code"]) == (1, P.E_PROTOCOL_VERSION, 1), r
    finally:
        other.close()


async def test_the_dashboard_source_reports_a_daemon_of_another_protocol_version(tmp_path):
    from wsctl.tui.source import LiveSource, Unavailable

    other = OtherVersionDaemon(tmp_path / "other.sock", P.PROTOCOL_VERSION + 1)
    src = LiveSource(other.path, timeout=5)
    try:
        try:
            await src.call("status")
        except Unavailable as exc:
            assert f"speaks control protocol {P.PROTOCOL_VERSION + 1}" in str(exc)
        else:
            raise AssertionError("a daemon of another protocol version was used")
        assert not src.available
    finally:
        await src.close()
        other.close()


async def test_wsctl_refuses_a_request_over_the_daemons_limit_before_sending_it(wsd, tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"blob": "x" * P.MAX_REQUEST_BYTES}))
    r = await awsctl(wsd, "publish", "system-status", "--data", f"@{big}")
    assert r.rc == 2, r
    assert r.err == f"wsctl: error: request larger than {P.MAX_REQUEST_BYTES} bytes (the daemon's limit)\n", r
    assert (await wsd.ctl("history.get", channel="system-status"))["messages"] == []  # nothing was published
