"""The PROXY protocol (HAProxy's, versions 1 and 2): the preamble a proxy sends before the client's bytes.

Sans-I/O and pure: ``parse(buffer)`` is given everything received so far on a connection and answers

- ``None``: not enough bytes yet (read more and call again with the longer buffer);
- a ``Preamble``: the client's address (``source``; None for the LOCAL command, ``UNKNOWN`` or a family
  without an IP address: use the connection's own peer) and ``length``, the bytes it took (what follows
  is the client's data);
- or it raises ``ProxyHeaderError`` with a one-line reason: not a PROXY header, a malformed one, or one
  longer than the protocol allows.

The receiver decides whether a connection must start with a preamble (by its peer's address) and never
guesses from the bytes; this module only reads one. Version 2's TLVs are skipped unread (their length is
within the header's).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from wsd.core.net import client_address

__all__ = ["V1_MAX", "V2_SIGNATURE", "Preamble", "ProxyHeaderError", "parse"]

#: the 12 bytes every version 2 header starts with
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: a version 1 line is at most 107 bytes, CRLF included
V1_MAX = 107
_V2_HEAD = 16


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


class Preamble(NamedTuple):
    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL" (a version 1 "UNKNOWN" reads as LOCAL)
    source: str | None  # the client's address, normalized; None: use the connection's peer
    source_port: int
    length: int  # bytes of the buffer the preamble took


def parse(buf: bytes) -> Preamble | None:
    """Read a PROXY header from the start of ``buf``: a Preamble, None (need more), or ProxyHeaderError."""
    n = len(buf)
    if buf[:12] == V2_SIGNATURE[:min(n, 12)]:
        return _v2(buf) if n >= 12 else None
    if buf[:6] == V1_PREFIX[:min(n, 6)]:
        return _v1(buf) if n >= 6 else None
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _v1(buf: bytes) -> Preamble | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX or b"\n" in buf[:V1_MAX]:
            raise ProxyHeaderError(f"PROXY v1 line without CRLF in its first {V1_MAX} bytes")
        return None
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return Preamble(1, "LOCAL", None, 0, end + 2)
    if len(parts) != 6:
        raise ProxyHeaderError(f"PROXY v1 line has {len(parts)} fields; expected 6 "
                               "(PROXY TCP4|TCP6 source destination source_port destination_port)")
    _, proto, src, dst, sport, dport = parts
    version = {"TCP4": 4, "TCP6": 6}.get(proto)
    if version is None:
        raise ProxyHeaderError(f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, got {proto[:10]!r}")
    for what, text in (("source", src), ("destination", dst)):
        try:
            ip = ipaddress.ip_address(text)
            client_address(text)  # no zone index
        except ValueError:
            raise ProxyHeaderError(f"PROXY v1 {what} address is not an IP address: {text[:45]!r}") from None
        if ip.version != version:
            raise ProxyHeaderError(f"PROXY v1 {what} address {text} is not IPv{version} ({proto})")
    ports = []
    for what, text in (("source", sport), ("destination", dport)):
        if not text.isdigit() or not text.isascii() or len(text) > 5 or (len(text) > 1 and text[0] == "0") \
                or int(text) > 65535:
            raise ProxyHeaderError(f"PROXY v1 {what} port is not a port number 0-65535: {text[:10]!r}")
        ports.append(int(text))
    return Preamble(1, "PROXY", client_address(src), ports[0], end + 2)


def _v2(buf: bytes) -> Preamble | None:
    if len(buf) < _V2_HEAD:
        return None
    ver_cmd, fam, size = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header has version {ver_cmd >> 4}; expected 2")
    cmd = ver_cmd & 0x0F
    if cmd > 1:
        raise ProxyHeaderError(f"PROXY v2 command {cmd} is neither LOCAL (0) nor PROXY (1)")
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise ProxyHeaderError(f"PROXY v2 address family/protocol byte 0x{fam:02x} is not defined")
    total = _V2_HEAD + size
    if len(buf) < total:
        return None
    if cmd == 0:  # LOCAL: the proxy's own connection (a health check); addresses, if any, are ignored
        return Preamble(2, "LOCAL", None, 0, total)
    body = buf[_V2_HEAD:total]
    if family == 1:  # AF_INET: source, destination (4 bytes each), source port, destination port
        if size < 12:
            raise ProxyHeaderError(f"PROXY v2 IPv4 addresses need 12 bytes, the header has {size}")
        return Preamble(2, "PROXY", str(ipaddress.IPv4Address(body[:4])), struct.unpack_from("!H", body, 8)[0],
                        total)
    if family == 2:  # AF_INET6: 16 + 16 + 2 + 2
        if size < 36:
            raise ProxyHeaderError(f"PROXY v2 IPv6 addresses need 36 bytes, the header has {size}")
        source = client_address(str(ipaddress.IPv6Address(body[:16])))  # an IPv4-mapped one as IPv4
        return Preamble(2, "PROXY", source, struct.unpack_from("!H", body, 32)[0], total)
    # AF_UNSPEC or AF_UNIX: no IP address of the client; the connection's own peer stands for it
    return Preamble(2, "PROXY", None, 0, total)
