"""The client's address behind trusted proxies: ``X-Forwarded-For`` / ``Forwarded`` (RFC 7239) and the chain walk.

A connection's hops, from the nearest: the TCP peer, the address its PROXY protocol preamble gave (when
there is one), then the forwarded header's entries from right to left (each proxy appends the address it
got the request from). The client is the first hop, walking from the right, that is not a trusted proxy:
entries further left were written by someone no trusted proxy vouches for, and are never read. A peer
that is not trusted is the client, whatever it sends. An ``unknown`` or obfuscated (``_name``) entry where
the walk needs an address ends it at the trusted hop that wrote it.

Pure: no sockets, no HTTP library; the caller hands in the header's values (every line of it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from wsd.core.net import client_address, ip_in

__all__ = ["HEADERS", "MAX_CHARS", "TrustedProxies", "forwarded_for", "parse_node"]

#: ``server.forwarded_header`` values -> the HTTP header read ("" = none)
HEADERS = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded", "none": ""}

#: the longest forwarded header (every line of it) read: some 500 hops, more than any chain of proxies.
#: Beyond it, 400 before parsing: websockets lets 128 lines of 8 KiB through, which took the parser ~0.4 s
#: of the event loop per handshake.
MAX_CHARS = 8192

_QUOTED_PAIR = re.compile(r"\\(.)")
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_node(text: str, what: str) -> str | None:
    """One hop's address: normalized IP text; None for ``unknown`` or an obfuscated ``_name``.

    Taken: ``192.0.2.1``, ``192.0.2.1:4711``, ``2001:db8::1``, ``[2001:db8::1]``, ``[2001:db8::1]:4711``;
    an IPv4-mapped address reads as its IPv4 address, a zone index (``fe80::1%eth0``) is refused.
    Raises ValueError naming ``what`` (the header) otherwise.
    """
    t = text.strip()
    if t.lower() == "unknown" or t.startswith("_"):
        return None
    host = t
    if t.startswith("["):
        close = t.find("]")
        if close < 0 or (close + 1 < len(t) and not _port_ok(t[close + 1:])):
            raise ValueError(f"{what}: not an address: {_shown(t)}")
        host = t[1:close]
    elif t.count(":") == 1:  # IPv4 with a port
        host, port = t.split(":")
        if not _port_ok(":" + port):
            raise ValueError(f"{what}: not an address: {_shown(t)}")
    try:
        return client_address(host)
    except ValueError:
        raise ValueError(f"{what}: not an address: {_shown(t)}") from None


def _port_ok(s: str) -> bool:
    return len(s) > 1 and s[0] == ":" and s[1:].isdigit() and s[1:].isascii() and int(s[1:]) <= 65535


def _shown(t: str) -> str:
    return repr(t if len(t) <= 60 else t[:60] + "...")


def _elements(value: str) -> list[str]:
    """A Forwarded header's comma-separated elements (commas inside quoted strings kept)."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quoted:
        raise ValueError("Forwarded: unterminated quoted string")
    out.append("".join(cur))
    return out


def forwarded_for(element: str) -> str | None:
    """The ``for=`` node of one Forwarded element (RFC 7239 section 4) as ``parse_node`` reads it; an
    element without ``for`` is an unknown node. Raises ValueError for a malformed element."""
    found: str | None = None
    seen = False
    for pair in element.split(";"):
        pair = pair.strip()
        if not pair:
            continue
        name, eq, val = pair.partition("=")
        name = name.strip()
        if not eq or not name or not set(name) <= _TCHAR:
            raise ValueError(f"Forwarded: not a name=value pair: {_shown(pair)}")
        val = val.strip()
        if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
            val = _QUOTED_PAIR.sub(r"\1", val[1:-1])  # RFC 9110 quoted-pair: \x is x
        elif not val or not set(val) <= _TCHAR:
            raise ValueError(f"Forwarded: {name}= value must be a token or a quoted string: {_shown(val)}")
        if name.lower() == "for":
            if seen:
                raise ValueError("Forwarded: an element has more than one for=")
            seen = True
            found = val
    if found is None:
        return None
    return parse_node(found, "Forwarded")


class TrustedProxies:
    """``server.trusted_proxies`` (networks) and ``server.forwarded_header``: who may say who the client is."""

    __slots__ = ("header", "networks")

    def __init__(self, networks: Sequence[Any], header: str = "x-forwarded-for") -> None:
        self.networks = list(networks)
        self.header = HEADERS[header]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        return bool(self.networks) and ip_in(ip, self.networks)

    def client(self, peer: str, relayed: str | None, values: Sequence[str]) -> str:
        """The client's address: ``peer`` (the TCP peer), ``relayed`` (from a PROXY preamble: None without
        one, "" for one that named no client) and ``values`` (every line of the forwarded header, in order).
        Raises ValueError (a one-line reason naming the header) when an entry the walk reaches is
        malformed."""
        addr = peer
        if not self.trusts(addr):
            return addr
        if relayed == "":
            # LOCAL, UNKNOWN, AF_UNSPEC / AF_UNIX: an unknown hop, as ``unknown`` in a header. What follows
            # the preamble is the client's own bytes (TCP mode): its forwarded header is not the proxy's word.
            return addr
        if relayed is not None:
            addr = relayed
            if not self.trusts(addr):
                return addr
        if not self.header or not values:
            return addr
        joined = ",".join(values)
        if len(joined) > MAX_CHARS:
            raise ValueError(f"{self.header}: longer than {MAX_CHARS} characters (every line of it)")
        if self.header == "Forwarded":
            for element in reversed(_elements(joined)):
                if not element.strip():
                    continue
                hop = forwarded_for(element)  # read only when the walk gets there
                if hop is None:
                    return addr
                addr = hop
                if not self.trusts(addr):
                    return addr
            return addr
        for entry in reversed(joined.split(",")):
            if not entry.strip():
                continue  # an empty list element (",,") carries nothing (RFC 9110 section 5.6.1)
            hop = parse_node(entry, "X-Forwarded-For")
            if hop is None:
                return addr
            addr = hop
            if not self.trusts(addr):
                return addr
        return addr
