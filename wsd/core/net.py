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
