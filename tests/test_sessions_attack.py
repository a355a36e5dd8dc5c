"""Hostile clients against resumable sessions: positions out of range, takeovers racing each other.

Real daemons, real clients.
"""

from __future__ import annotations

import json

import pytest

from tests.harness import handshake, make_token
from tests.test_sessions_durable import CH, since_param


@pytest.mark.parametrize("offset", [2**53, 2**63, 2**70])
def test_a_since_offset_beyond_what_a_frame_takes_is_refused_with_400(wsd, offset):
    """Offsets in `since` are bounded as in `history.since` frames: a larger one (which the Redis engine
    cannot even address) is a clear 400, not a resume that fails later."""
    token = make_token("alice", "acme")
    status, _, body = handshake(wsd.port, f"/ws/frontend?token={token}&session=x"
                                          f"&since={since_param({CH: (offset, 'e')})}")
    assert status == 400, (status, body)
    reply = json.loads(body)
    assert reply["error"] == "bad_request" and "since" in reply["message"] and "<=" in reply["message"]
