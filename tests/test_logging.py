"""Tokens never reach the daemon's log, even at --log-level debug where websockets logs request lines,
headers and subprotocols: grep the real log file for every token sent, in text and JSON formats."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.harness import make_token, wait_for, welcome


async def _connect_three_ways(w, tokens: list[str]) -> list[str]:
    """Connect with tokens[0] in the query, [1] in Authorization, [2] in the subprotocol; connection ids."""
    ids = []
    url = f"ws://127.0.0.1:{w.port}/ws/frontend"
    for ws_cm in (connect(f"{url}?token={tokens[0]}", open_timeout=5),
                  connect(url, additional_headers={"Authorization": f"Bearer {tokens[1]}"}, open_timeout=5),
                  connect(url, subprotocols=["wsd.v1", f"bearer.{tokens[2]}"], open_timeout=5)):
        async with ws_cm as ws:
            ids.append((await welcome(ws))["connection_id"])
    return ids


def _assert_no_secret(log: str, token: str) -> None:
    assert token not in log
    for part in token.split(".")[1:]:  # the claims and the signature, not just the whole string
        assert part not in log


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_debug_log_never_contains_tokens(wsd_factory, fmt):
    """At debug level, tokens sent in query, header and subprotocol never appear in the log; connects do."""
    w = wsd_factory(args=["--log-level", "debug", "--log-format", fmt])
    tokens = [make_token(f"logger{i}", "acme") for i in range(3)]
    ids = await _connect_three_ways(w, tokens)

    async def all_disconnects_logged() -> bool:
        log = w.log()
        return all(log.count(cid) >= 2 for cid in ids)  # the connect and the disconnect line

    await wait_for(all_disconnects_logged, timeout=5)
    log = w.log()
    assert "GET /ws/frontend" in log  # websockets' own debug lines are there, redacted
    assert "redacted" in log
    for token in tokens:
        _assert_no_secret(log, token)


async def test_refused_opaque_tokens_are_not_logged(wsd_factory):
    """A non-JWT token refused at the handshake is not logged either, wherever it was sent."""
    # Repeated refusals from one address are logged once, then summarised: summarise every second.
    w = wsd_factory("repeat_summary_interval_s = 1", args=["--log-level", "debug"])  # lands in [log]
    opaque = "opaque-credential-7f3a9c1e5b"
    url = f"ws://127.0.0.1:{w.port}/ws/frontend"
    for kw in ({"uri": f"{url}?token={opaque}"},
               {"uri": url, "additional_headers": {"Authorization": f"Bearer {opaque}"}},
               {"uri": url, "subprotocols": ["wsd.v1", f"bearer.{opaque}"]}):
        with pytest.raises(InvalidStatus) as exc:
            async with connect(open_timeout=5, **kw):
                pass
        assert exc.value.response.status_code == 401

    async def three_refusals_logged() -> bool:
        log = w.log()
        return "refused" in log and "repeated=2" in log

    await wait_for(three_refusals_logged, timeout=5)
    assert opaque not in w.log()


def test_event_fields_in_the_text_log_are_words_not_python_reprs():
    """`resumed=False`, `restart_required=[]`, `roles=['admin']` read as words in the text log."""
    from wsd.runtime.events import log_value

    assert log_value(False) == "no" and log_value(True) == "yes"
    assert log_value([]) == "none" and log_value(["admin", "ops"]) == "admin,ops"
    assert log_value(None) == "-" and log_value({"a": 1}) == '{"a":1}' and log_value(3) == "3"
