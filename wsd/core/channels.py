"""Channel groups and the resolution of channel instances from a subscriber's claims.

Tenant isolation holds by construction here: for a non-admin principal the instance of a
user or company group is *built* from the principal's own claims; a name given in full is
accepted only when it is exactly the instance that would have been built. No string a
client sends is ever used to pick another tenant's instance.

Pure: no asyncio, sockets or time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from wsd import errors

GROUP_TYPES = ("user", "company", "global", "admin")
# The group types as upper-case enum-style names (`type_name` in channels.list), by config name.
GROUP_TYPE_NAMES = {"user": "USER_SPECIFIC", "company": "COMPANY_WIDE", "global": "GLOBAL", "admin": "ADMIN_ONLY"}

# Matched with fullmatch: "$" would also accept a trailing newline ("alice\n").
_SEGMENT = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")
ID_RULE = "1 to 128 of A-Z a-z 0-9 _ . : @ + = - (nothing else, no whitespace)"


class ChannelError(Exception):
    """A request that cannot be served: ``code`` is ``forbidden``, ``unknown_channel`` or ``bad_request``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Principal:
    """Who is asking: the identity a token proved, plus the pool it came through."""

    __slots__ = ("company_id", "is_admin", "pool", "pool_type", "roles", "user_id")

    def __init__(self, user_id: str, company_id: str, roles: frozenset[str], pool: str, pool_type: str,
                 is_admin: bool) -> None:
        self.user_id = user_id
        self.company_id = company_id
        self.roles = roles
        self.pool = pool
        self.pool_type = pool_type
        self.is_admin = is_admin


def valid_segment(value: str) -> bool:
    """True when ``value`` may appear as one segment of a channel instance name."""
    return _SEGMENT.fullmatch(value) is not None


def instance_parts(instance: str) -> tuple[str, str, str]:
    """(group, company_id, user_id) of a channel instance name; missing parts are ''."""
    parts = instance.split("/")
    group = parts[0]
    company = parts[1] if len(parts) > 1 else ""
    user = parts[2] if len(parts) > 2 else ""
    return group, company, user


def resolve(name: str, who: Principal, groups: Mapping[str, Any]) -> tuple[str, str]:
    """Resolve a channel name a client sent to ``(group_id, instance)`` or raise ChannelError.

    ``groups`` maps group ids to objects with a ``type`` attribute (user|company|global|admin).
    """
    if not isinstance(name, str) or not name:
        raise ChannelError(errors.BAD_REQUEST, "channel must be a non-empty string")
    parts = name.split("/")
    group_id = parts[0]
    cfg = groups.get(group_id)
    if cfg is None:
        raise ChannelError(errors.UNKNOWN_CHANNEL, f"no channel group {group_id!r}")
    gtype = cfg.type
    if gtype == "admin" and not who.is_admin:
        raise ChannelError(errors.FORBIDDEN, f"channel {group_id!r} is for admins only")
    if gtype in ("global", "admin"):
        if len(parts) != 1:
            raise ChannelError(errors.BAD_REQUEST, f"channel group {group_id!r} has a single instance: {group_id!r}")
        return group_id, group_id
    if gtype == "company":
        if len(parts) == 1:
            if not who.company_id:
                raise ChannelError(errors.FORBIDDEN, "the token has no company_id for a company channel")
            return group_id, f"{group_id}/{who.company_id}"
        if len(parts) != 2:
            raise ChannelError(errors.BAD_REQUEST, f"a company channel is {group_id}/<company_id>")
        if who.is_admin and valid_segment(parts[1]):
            return group_id, name
        own = f"{group_id}/{who.company_id}" if who.company_id else None
        if own is not None and name == own:
            return group_id, own
        raise ChannelError(errors.FORBIDDEN, f"not allowed to use {name!r}")
    # user group
    if len(parts) == 1:
        if not who.company_id or not who.user_id:
            raise ChannelError(errors.FORBIDDEN, "the token has no company_id / sub for a user channel")
        return group_id, f"{group_id}/{who.company_id}/{who.user_id}"
    if len(parts) != 3:
        raise ChannelError(errors.BAD_REQUEST, f"a user channel is {group_id}/<company_id>/<user_id>")
    if who.is_admin and valid_segment(parts[1]) and valid_segment(parts[2]):
        return group_id, name
    own = f"{group_id}/{who.company_id}/{who.user_id}"
    if who.company_id and who.user_id and name == own:
        return group_id, own
    raise ChannelError(errors.FORBIDDEN, f"not allowed to use {name!r}")


def resolve_for_operator(name: str, groups: Mapping[str, Any]) -> tuple[str, str]:
    """Resolve a channel name given by an operator (control socket): instances must be named in full."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not parts[0]:
        raise ChannelError(errors.BAD_REQUEST, "channel must be a non-empty string")
    cfg = groups.get(parts[0])
    if cfg is None:
        raise ChannelError(errors.UNKNOWN_CHANNEL, f"no channel group {parts[0]!r}")
    want = {"global": 1, "admin": 1, "company": 2, "user": 3}[cfg.type]
    if len(parts) != want or not all(valid_segment(p) for p in parts[1:]):
        shape = {1: parts[0], 2: f"{parts[0]}/<company_id>", 3: f"{parts[0]}/<company_id>/<user_id>"}[want]
        raise ChannelError(errors.BAD_REQUEST, f"a {cfg.type} channel is named {shape}")
    return parts[0], name


def may_publish(group_cfg: Any, who: Principal) -> bool:
    """Whether a principal may publish into a group: the pool id or one of the roles is in ``publishers``."""
    pubs = group_cfg.publishers
    if not pubs:
        return False
    if who.pool in pubs:
        return True
    return any(r in pubs for r in who.roles)
