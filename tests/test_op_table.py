"""The endpoint's table of client ops: every frame type has exactly one handler, found by its type."""

from __future__ import annotations

import inspect

import pytest

from wsd.core import frames
from wsd.runtime import conn
from wsd.runtime.server import OP_HANDLERS, Endpoint


def test_every_client_frame_type_has_one_endpoint_handler():
    """The table built at import maps each frame type to Endpoint.op_<op>, and nothing else."""
    assert set(OP_HANDLERS) == set(frames.FRAME_TYPES)
    for frame_type, handler in OP_HANDLERS.items():
        assert handler is Endpoint.__dict__["op_" + frames.op_of(frame_type)]
        assert inspect.iscoroutinefunction(handler)
    ops = sorted(name[3:] for name in dir(Endpoint) if name.startswith("op_"))
    assert ops == sorted(frames.OPS)


def test_an_endpoint_missing_a_handler_fails_loudly():
    """Without op_presence (shadowed here), building the table raises and names the op."""
    broken = type("BrokenEndpoint", (Endpoint,), {"op_presence": None})
    with pytest.raises(TypeError, match=r"BrokenEndpoint: op 'presence' \(Presence\) has no handler op_presence"):
        frames.handler_table(broken)


def test_an_endpoint_with_a_handler_for_no_op_fails_loudly():
    async def op_teleport(self, conn, frame):
        return None

    broken = type("BrokenEndpoint", (Endpoint,), {"op_teleport": op_teleport})
    with pytest.raises(TypeError, match="op_teleport handles no frame type"):
        frames.handler_table(broken)



def test_the_modes_the_frames_accept_are_the_modes_the_runtime_serves():
    assert frames.MODES == conn.MODES
