"""Network address helpers shared by the endpoint (pool CIDRs) and the daemon (metrics allow list)."""

from __future__ import annotations

import ipaddress
from typing import Any


def ip_in(remote: str, networks: list[Any]) -> bool:
    """``remote`` (an IPv4-mapped IPv6 address counts as its IPv4) is inside one of ``networks``."""
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)


def client_address(text: str) -> str:
    """A client's address as a proxy relayed it, normalized: an IPv4-mapped IPv6 address is its IPv4 address
    (one client, one limiter key). Raises ValueError for anything but a plain IP address, a zone index
    (``fe80::1%eth0``: ``ipaddress`` takes any text after the ``%``) included."""
    if "%" in text:
        raise ValueError(f"{text!r} has a zone index")
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
