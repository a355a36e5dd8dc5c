"""Hostile clients against resumable sessions: positions out of range, takeovers racing each other.

Real daemons, real clients.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.harness import closed_with, handshake, make_token, wait_for, welcome
from tests.rawws import OP_CLOSE, OP_TEXT, RawWs, close_code
from tests.test_redis_engine import engine_toml, redis_url  # noqa: F401  # the redis_url fixture
from tests.test_sessions_durable import CH, gone, since_param, stored_session, subscribe


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


async def _resume(node: Any, token: str, sid: str) -> tuple[Any, dict[str, Any] | None]:
    """A resume, and its welcome (None: taken over before it was sent)."""
    ws = await node.connect(token=token, query={"session": sid}).__aenter__()
    try:
        return ws, await welcome(ws)
    except ConnectionClosed:
        assert ws.close_code == 4011
        return ws, None


async def test_two_resumes_at_once_keep_the_subscriptions(wsd_factory, redis_url):  # noqa: F811
    """Two reconnects of the same session at the same moment (a client retrying, or two tabs): one takes the
    session over from the other, which may still be restoring it. The one that wins has every subscription,
    and so has the session stored in Redis."""
    prefix = "t" + secrets.token_hex(3)
    node = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    async with node.connect(token=token) as ws:
        w1 = await welcome(ws)
        sid = w1["session_id"]
        await subscribe(ws)
        ws.transport.abort()
    await gone(node, w1["connection_id"])
    for _ in range(4):
        (a, wa), (b, wb) = await asyncio.gather(_resume(node, token, sid), _resume(node, token, sid))
        try:
            # The later one took the session over: the earlier one is closed with 4011.
            done, _ = await asyncio.wait([asyncio.ensure_future(a.wait_closed()),
                                          asyncio.ensure_future(b.wait_closed())],
                                         timeout=5, return_when=asyncio.FIRST_COMPLETED)
            assert done, "neither connection was taken over"
            loser, winner = (a, wb) if a.close_code is not None else (b, wa)
            assert (await closed_with(loser))[0] == 4011
            assert winner is not None and winner["resumed"], winner
            assert CH in winner["subscriptions"], winner

            async def restored(cid: str = winner["connection_id"]) -> bool:
                info = await node.ctl("connections.get", id=cid)
                return CH in [s["channel"] for s in info["subscriptions"]]
            await wait_for(restored)
        finally:
            a.transport.abort()
            b.transport.abort()
        await gone(node, winner["connection_id"])
    s = stored_session(redis_url, prefix, sid)
    assert s is not None and CH in [x["channel"] for x in s["subs"]], s


async def test_a_kicked_client_that_holds_back_the_close_cannot_resume_its_session(wsd_factory, redis_url):  # noqa: F811
    """A kick ends the session. A client that does not answer the close frame keeps its connection closing
    for the drain timeout; resuming meanwhile (on this node or another) must not bring the session back."""
    prefix = "t" + secrets.token_hex(3)
    a = wsd_factory(engine_toml(redis_url, prefix))
    b = wsd_factory(engine_toml(redis_url, prefix))
    token = make_token("alice", "acme")
    raw = await RawWs.open(a.port, f"/ws/frontend?token={token}")
    try:
        w1 = await raw.read_json()
        sid = w1["session_id"]
        await raw.send_frame(OP_TEXT, json.dumps({"op": "subscribe", "id": 1, "channel": "trading-signals"}).encode())

        async def stored() -> bool:
            s = stored_session(redis_url, prefix, sid)
            return s is not None and CH in [x["channel"] for x in s["subs"]]
        await wait_for(stored)
        await a.ctl("kick", ids=[w1["connection_id"]], reason="bye")
        while True:  # the close frame arrives; it is not answered
            op, payload = await raw.read_frame()
            if op == OP_CLOSE:
                assert close_code(payload) == 4000
                break
        for node in (a, b):
            async with node.connect(token=token, query={"session": sid}) as ws:
                w = await welcome(ws)
                assert w["resumed"] is False and w["session_id"] != sid and CH not in w["subscriptions"], w
    finally:
        raw.close()


async def test_a_takeover_storm_leaves_one_connection_and_one_subscription(wsd_factory, redis_url):  # noqa: F811
    """Clients resuming the same session over and over, several at once: each takeover replaces a connection,
    so in the end one connection holds the session, with one subscription to each of its channels."""
    from tests.harness import BASE_CONFIG

    prefix = "t" + secrets.token_hex(3)
    node = wsd_factory(engine_toml(redis_url, prefix),
                       base=BASE_CONFIG.replace("max_connections_per_user = 1000", "max_connections_per_user = 2"))
    token = make_token("alice", "acme")
    first = await node.connect(token=token).__aenter__()
    w1 = await welcome(first)
    sid = w1["session_id"]
    await subscribe(first)
    held = [first]
    try:
        for _ in range(6):
            got = await asyncio.gather(*[_resume(node, token, sid) for _ in range(3)])
            held += [ws for ws, _ in got]

        async def settled() -> bool:
            conns = await node.ctl("connections.list", user="alice")
            presence = await node.ctl("presence.get", channel=CH)
            return conns["total"] == 1 and presence["connections"] == 1
        await wait_for(settled)
        open_ = [ws for ws in held if ws.close_code is None]
        assert len(open_) == 1
    finally:
        for ws in held:
            ws.transport.abort()


async def test_the_same_user_id_in_another_company_does_not_share_the_connection_limit(wsd_factory):
    """User ids are per tenant: bob of acme holding his connections does not refuse (nor reveal to) bob of globex."""
    from tests.harness import BASE_CONFIG

    node = wsd_factory(base=BASE_CONFIG.replace("max_connections_per_user = 1000", "max_connections_per_user = 1"))
    async with node.connect(token=make_token("bob", "acme")) as ws:
        await welcome(ws)
        status, _, body = handshake(node.port, f"/ws/frontend?token={make_token('bob', 'acme')}")
        assert status == 429 or status == 503, (status, body)  # acme's bob is at his limit
        async with node.connect(token=make_token("bob", "globex")) as other:
            w = await welcome(other)
            assert w["company_id"] == "globex"
