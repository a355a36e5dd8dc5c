"""A bare-bones WebSocket client over a raw TCP stream, for what a library client hides.

It sends exactly the request line and headers it is given (absolute-form targets, odd headers),
reads frames as they arrive (so tests see the server's ping frames), and never answers a ping
or a close unless told to: the peer a heartbeat or a bounded drain has to deal with.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class RawWs:
    """One raw connection: the handshake response, then frames in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: dict[str, str], body: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    async def open(cls, port: int, target: str, headers: dict[str, str] | None = None,
                   timeout: float = 5.0) -> RawWs:
        """Send an upgrade for ``target`` (path or absolute URL) and read the response head."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        h = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
             "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Version": "13"}
        h.update(headers or {})
        req = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        writer.write(req.encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        body = b""
        if status != 101 and "content-length" in hdrs:
            body = await asyncio.wait_for(reader.readexactly(int(hdrs["content-length"])), timeout)
        return cls(reader, writer, status, hdrs, body)

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame (opcode, payload); raises EOFError when the server has closed the TCP stream."""
        async with asyncio.timeout(timeout):
            try:
                b1, b2 = await self.reader.readexactly(2)
                n = b2 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(n)
            except asyncio.IncompleteReadError:
                raise EOFError("server closed the connection") from None
        return b1 & 0x0F, payload

    async def read_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text frame as JSON, skipping control frames."""
        while True:
            op, payload = await self.read_frame(timeout)
            if op == OP_TEXT:
                return json.loads(payload)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        """One masked, final frame (clients must mask)."""
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def close_code(payload: bytes) -> int | None:
    """The status code carried by a close frame's payload."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
