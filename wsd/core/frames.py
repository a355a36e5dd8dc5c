"""Client frames of the wire protocol (SPEC section 4), as typed msgspec structs.

Decoding validates shape and types at once; an error names the key path (``$.history.limit``).
"""

from __future__ import annotations

from typing import Any

import msgspec


class Position(msgspec.Struct, forbid_unknown_fields=True):
    offset: int
    epoch: str


class HistoryReq(msgspec.Struct, forbid_unknown_fields=True):
    limit: int | None = None
    since: Position | None = None


class FilterReq(msgspec.Struct, forbid_unknown_fields=True):
    types: list[str] = []


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str
    mode: str = "realtime"
    history: HistoryReq | None = None
    filter: FilterReq | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str


class History(msgspec.Struct, tag="history", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str
    limit: int | None = None
    since: Position | None = None


class Pull(msgspec.Struct, tag="pull", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str
    limit: int | None = None


class Publish(msgspec.Struct, tag="publish", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str
    type: str = "message"
    data: Any = None
    priority: str | int = "normal"
    ttl: float | None = None


class Ack(msgspec.Struct, tag="ack", tag_field="op", forbid_unknown_fields=True):
    seq: int
    id: int | str | None = None


class Ping(msgspec.Struct, tag="ping", tag_field="op", forbid_unknown_fields=True):
    id: int | str


class Refresh(msgspec.Struct, tag="refresh", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    token: str


class Presence(msgspec.Struct, tag="presence", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str


ClientFrame = Subscribe | Unsubscribe | History | Pull | Publish | Ack | Ping | Refresh | Presence
OPS = ("subscribe", "unsubscribe", "history", "pull", "publish", "ack", "ping", "refresh", "presence")

decoder = msgspec.json.Decoder(ClientFrame)


class _IdOnly(msgspec.Struct):
    id: int | str | None = None
    op: Any = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


def salvage_id(raw: bytes | str) -> tuple[int | str | None, Any]:
    """The ``id`` and ``op`` of a frame that failed to decode, so the error reply can be correlated."""
    try:
        got = _id_decoder.decode(raw)
        return got.id, got.op
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, None
