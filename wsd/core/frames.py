"""Client frames of the wire protocol, as typed msgspec structs.

Decoding validates shape and types at once; an error names the key path (``$.history.limit``).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

# The largest count or offset a client may send (2**53 - 1, what every JSON client can represent). An
# unbounded int decodes fine but breaks the code it reaches (islice, deque sizes): refused at decode.
MAX_COUNT = 2**53 - 1
Count = Annotated[int, msgspec.Meta(le=MAX_COUNT)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]


class Position(msgspec.Struct, forbid_unknown_fields=True):
    offset: Offset
    epoch: str


class HistoryReq(msgspec.Struct, forbid_unknown_fields=True):
    limit: Count | None = None
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
    limit: Count | None = None
    since: Position | None = None


class Pull(msgspec.Struct, tag="pull", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str
    limit: Count | None = None


class Publish(msgspec.Struct, tag="publish", tag_field="op", forbid_unknown_fields=True):
    id: int | str
    channel: str
    type: str = "message"
    data: Any = None
    priority: str | int = "normal"
    ttl: float | None = None


class Ack(msgspec.Struct, tag="ack", tag_field="op", forbid_unknown_fields=True):
    seq: Count
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
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None, None


_encode = msgspec.json.Encoder().encode


def nests_deeper(value: Any, limit: int) -> bool:
    """True when ``value`` nests arrays/objects more than ``limit`` levels deep (``[]`` is 1, a scalar 0).

    Iterative, so no input can exhaust the stack; it stops at the first path found too deep.
    """
    t = type(value)
    if t is not dict and t is not list:
        return False
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        if depth > limit:
            return True
        for x in (v.values() if type(v) is dict else v):
            tx = type(x)
            if tx is dict or tx is list:
                push((x, depth + 1))
    return False


def unpublishable(msg_type: Any, data: Any, max_depth: int) -> str | None:
    """Why a message cannot be stored and sent again, or None when it can.

    ``max_depth`` is the frame nesting limit (``limits.max_json_depth``): a message's data sits one
    level inside its frame, so it may nest ``max_depth - 1`` levels. Whatever the JSON encoder refuses
    (a string with a lone surrogate, ...) is refused here, before any store.
    """
    try:
        raw = _encode(data)
        if msg_type.__class__ is not str:
            _encode(msg_type)
        elif not msg_type.isascii():
            msg_type.encode()  # a lone surrogate cannot be sent
    except RecursionError:
        return _too_deep(max_depth)
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        return f"the message cannot be encoded as JSON: {exc}"
    # Every level opens a bracket: with few brackets in all (the common case) no path can be too deep,
    # and the walk is skipped.
    if raw.count(b"[") + raw.count(b"{") >= max_depth and nests_deeper(data, max_depth - 1):
        return _too_deep(max_depth)
    return None


def _too_deep(max_depth: int) -> str:
    return f"data nests deeper than {max_depth - 1} levels (limits.max_json_depth = {max_depth})"
