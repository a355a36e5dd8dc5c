"""Client frames of the wire protocol, as typed msgspec structs.

Decoding validates shape and types at once; an error names the key path (``$.history.limit``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

import msgspec

from wsd.core.outbox import PRIORITY_NAMES

# The largest count or offset a client may send (2**53 - 1, what every JSON client can represent). An
# unbounded int decodes fine but breaks the code it reaches (islice, deque sizes): refused at decode.
MAX_COUNT = 2**53 - 1
Count = Annotated[int, msgspec.Meta(le=MAX_COUNT)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]

#: a subscription's mode (docs/protocol.md, "Subscription modes")
Mode = Literal["realtime", "batch", "on_demand", "historical"]
MODES: tuple[str, ...] = get_args(Mode)
#: a message's priority on the wire: its name or its number (0 is critical), both read from Priority
PriorityValue = Literal[(*PRIORITY_NAMES, *range(len(PRIORITY_NAMES)))]  # type: ignore[valid-type]


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
    mode: Mode = "realtime"
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
    priority: PriorityValue = "normal"
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
#: the client frame types, in the union's order
FRAME_TYPES: tuple[type[msgspec.Struct], ...] = get_args(ClientFrame)


def op_of(frame_type: type[msgspec.Struct]) -> str:
    """The ``op`` a frame type is decoded from: its tag in the union."""
    config = frame_type.__struct_config__
    if config.tag_field != "op" or not isinstance(config.tag, str):
        raise TypeError(f"{frame_type.__name__} is not a client frame: it has no string tag in field 'op'")
    return config.tag


#: every op a client may send, read from the union's tags (never listed by hand)
OPS: tuple[str, ...] = tuple(op_of(t) for t in FRAME_TYPES)

decoder = msgspec.json.Decoder(ClientFrame)

#: what a client is told when a field holds a value outside its allowed set, by the key path decoding names
_CHOICES = {
    "$.mode": f"mode must be one of {', '.join(MODES)}",
    "$.priority": f"priority must be {', '.join(PRIORITY_NAMES[:-1])} or {PRIORITY_NAMES[-1]} "
                  f"(or 0..{len(PRIORITY_NAMES) - 1})",
}


def explain(text: str) -> str:
    """The text of a decode error as a client reads it: a bad mode or priority names the allowed values.

    msgspec's own words for these (``Invalid enum value 'x'``, ``Expected `int | str`, got `bool` ``) do
    not say what is allowed; the key path (`` - at `$.mode` ``) is kept.
    """
    _, sep, path = text.rpartition(" - at `")
    if sep:
        choices = _CHOICES.get(path[:-1])
        if choices is not None:
            return f"{choices} - at `{path}"
    return text


def handler_table(owner: type, frame_types: tuple[type[msgspec.Struct], ...] = FRAME_TYPES,
                  prefix: str = "op_") -> dict[type[msgspec.Struct], Callable[..., Any]]:
    """Each frame type's handler: the coroutine function ``owner.<prefix><op>``, found once.

    Raises TypeError, naming them, when a frame type has no handler, a handler is not ``async def``, or a
    ``<prefix>`` method has no frame type: an op is never silently unserved, a handler never dead.
    """
    table: dict[type[msgspec.Struct], Callable[..., Any]] = {}
    problems: list[str] = []
    for frame_type in frame_types:
        name = prefix + op_of(frame_type)
        handler = inspect.getattr_static(owner, name, None)
        if handler is None:
            problems.append(f"op {op_of(frame_type)!r} ({frame_type.__name__}) has no handler {name}")
        elif not inspect.iscoroutinefunction(handler):
            problems.append(f"{name} must be an async def method")
        else:
            table[frame_type] = handler
    ops = {prefix + op_of(t) for t in frame_types}
    for name in sorted(n for n in dir(owner) if n.startswith(prefix) and n not in ops):
        problems.append(f"{name} handles no frame type (ops: {', '.join(op_of(t) for t in frame_types)})")
    if problems:
        raise TypeError(f"{owner.__name__}: " + "; ".join(problems))
    return table


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
    return encode_publishable(msg_type, data, max_depth)[0]


def encode_publishable(msg_type: Any, data: Any, max_depth: int) -> tuple[str | None, bytes]:
    """``unpublishable``'s answer and, when it is None, ``data`` encoded as JSON (else ``b""``): the
    publisher's push is built around these bytes (``msgspec.Raw``) instead of encoding ``data`` again."""
    try:
        raw = _encode(data)
        if msg_type.__class__ is not str:
            _encode(msg_type)
        elif not msg_type.isascii():
            msg_type.encode()  # a lone surrogate cannot be sent
    except RecursionError:
        return _too_deep(max_depth), b""
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        return f"the message cannot be encoded as JSON: {exc}", b""
    # Every level opens a bracket: with few brackets in all (the common case) no path can be too deep,
    # and the walk is skipped.
    if raw.count(b"[") + raw.count(b"{") >= max_depth and nests_deeper(data, max_depth - 1):
        return _too_deep(max_depth), b""
    return None, raw


def _too_deep(max_depth: int) -> str:
    return f"data nests deeper than {max_depth - 1} levels (limits.max_json_depth = {max_depth})"
