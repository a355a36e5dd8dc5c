"""Unit tests for wsd.core.frames: the ops read from the tagged union, the handler table's completeness
check, and the typed mode and priority fields with the answers a client gets for a bad value."""

from __future__ import annotations

import msgspec
import pytest

from wsd.core import frames
from wsd.core.outbox import Priority

# one minimal valid frame per op
MINIMAL = {
    "subscribe": {"id": 1, "channel": "c"},
    "unsubscribe": {"id": 1, "channel": "c"},
    "history": {"id": 1, "channel": "c"},
    "pull": {"id": 1, "channel": "c"},
    "publish": {"id": 1, "channel": "c"},
    "ack": {"seq": 1},
    "ping": {"id": 1},
    "refresh": {"id": 1, "token": "t"},
    "presence": {"id": 1, "channel": "c"},
}


def decode(frame: dict) -> object:
    return frames.decoder.decode(msgspec.json.encode(frame))


def bad_value(frame: dict) -> tuple[type[Exception], str]:
    """The error class and the text a client is answered with for a frame that fails to decode."""
    with pytest.raises(msgspec.ValidationError) as info:
        decode(frame)
    return info.type, frames.explain(str(info.value))


def test_ops_are_the_tags_of_the_union_in_order():
    """OPS is read from the frame types' tags, one per type, and each op decodes to its own type."""
    assert frames.OPS == tuple(t.__struct_config__.tag for t in frames.FRAME_TYPES)
    assert len(set(frames.OPS)) == len(frames.FRAME_TYPES) == len(frames.OPS)
    assert sorted(frames.OPS) == sorted(MINIMAL)
    for frame_type in frames.FRAME_TYPES:
        op = frames.op_of(frame_type)
        assert type(decode({"op": op, **MINIMAL[op]})) is frame_type


def test_op_of_refuses_a_struct_that_is_not_a_client_frame():
    with pytest.raises(TypeError, match="Position is not a client frame"):
        frames.op_of(frames.Position)


def _complete_handlers() -> dict[str, object]:
    async def handler(self, conn, frame):
        return None

    return {f"op_{op}": handler for op in frames.OPS}


def test_handler_table_maps_every_frame_type_to_its_handler():
    owner = type("Owner", (), _complete_handlers())
    table = frames.handler_table(owner)
    assert list(table) == list(frames.FRAME_TYPES)
    for frame_type, handler in table.items():
        assert handler is owner.__dict__["op_" + frames.op_of(frame_type)]


def test_handler_table_fails_loudly_on_a_missing_handler():
    """An op without a handler is refused when the table is built, naming the op and the method."""
    methods = _complete_handlers()
    del methods["op_ping"]
    with pytest.raises(TypeError, match=r"op 'ping' \(Ping\) has no handler op_ping"):
        frames.handler_table(type("Owner", (), methods))


def test_handler_table_fails_loudly_on_a_handler_without_a_frame_type():
    async def op_teleport(self, conn, frame):
        return None

    owner = type("Owner", (), {**_complete_handlers(), "op_teleport": op_teleport})
    with pytest.raises(TypeError, match="op_teleport handles no frame type"):
        frames.handler_table(owner)


def test_handler_table_fails_loudly_on_a_handler_that_is_not_async():
    def op_ack(self, conn, frame):
        return None

    owner = type("Owner", (), {**_complete_handlers(), "op_ack": op_ack})
    with pytest.raises(TypeError, match="op_ack must be an async def method"):
        frames.handler_table(owner)


def test_handler_table_names_every_problem_at_once():
    methods = _complete_handlers()
    del methods["op_subscribe"], methods["op_presence"]
    with pytest.raises(TypeError) as info:
        frames.handler_table(type("Owner", (), methods))
    assert "op_subscribe" in str(info.value) and "op_presence" in str(info.value)


@pytest.mark.parametrize("mode", frames.MODES)
def test_every_mode_decodes(mode):
    assert decode({"op": "subscribe", "id": 1, "channel": "c", "mode": mode}).mode == mode


def test_modes_are_the_documented_four():
    assert frames.MODES == ("realtime", "batch", "on_demand", "historical")
    assert decode({"op": "subscribe", "id": 1, "channel": "c"}).mode == "realtime"


@pytest.mark.parametrize("mode", ["streaming", "REALTIME", "", 3, None, ["batch"]])
def test_a_bad_mode_is_answered_with_the_allowed_modes_at_its_key_path(mode):
    _, text = bad_value({"op": "subscribe", "id": 1, "channel": "c", "mode": mode})
    assert text == "mode must be one of realtime, batch, on_demand, historical - at `$.mode`"


@pytest.mark.parametrize("value, expected", [
    ("critical", Priority.CRITICAL), ("high", Priority.HIGH), ("normal", Priority.NORMAL), ("low", Priority.LOW),
    (0, Priority.CRITICAL), (1, Priority.HIGH), (2, Priority.NORMAL), (3, Priority.LOW),
])
def test_every_priority_name_and_number_decodes(value, expected):
    frame = decode({"op": "publish", "id": 1, "channel": "c", "priority": value})
    assert frame.priority == value and Priority.parse(frame.priority) is expected


def test_priority_defaults_to_normal():
    assert Priority.parse(decode({"op": "publish", "id": 1, "channel": "c"}).priority) is Priority.NORMAL


@pytest.mark.parametrize("value", ["urgent", "HIGH", "high\n", "hıgh", "", 4, -1, 1.0, True, None, {"p": 1}])
def test_a_bad_priority_is_answered_with_the_allowed_values_at_its_key_path(value):
    _, text = bad_value({"op": "publish", "id": 1, "channel": "c", "priority": value})
    assert text == "priority must be critical, high, normal or low (or 0..3) - at `$.priority`"


@pytest.mark.parametrize("frame, text", [
    ({"op": "subscribe", "id": 1, "channel": 5}, "Expected `str`, got `int` - at `$.channel`"),
    ({"op": "publish", "id": 1, "channel": "c", "ttl": "x"}, "Expected `float | null`, got `str` - at `$.ttl`"),
    ({"op": "subscribe", "id": 1, "channel": "c", "mode": "batch", "colour": 1},
     "Object contains unknown field `colour`"),
])
def test_other_decode_errors_keep_the_decoders_words(frame, text):
    assert bad_value(frame)[1] == text


def test_explain_keeps_a_text_without_a_key_path():
    assert frames.explain("JSON is malformed: trailing characters (byte 3)") == \
        "JSON is malformed: trailing characters (byte 3)"
