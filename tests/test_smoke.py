"""The first end-to-end path: connect, welcome, subscribe, publish through the control socket, receive."""

from __future__ import annotations

from tests.harness import make_token, recv_until, request, welcome


async def test_publish_reaches_subscriber(wsd):
    """A frontend client subscribed to its company channel receives a control-socket publish."""
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        w = await welcome(ws)
        assert w["pool"] == "frontend" and w["user_id"] == "alice"
        reply = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
        assert reply["ok"] and reply["result"]["channel"] == "trading-signals/acme"
        res = await wsd.ctl("publish", channel="trading-signals/acme", type="trading_signal", data={"px": 1.5})
        assert res["delivered"] == 1
        msg = await recv_until(ws, lambda m: m.get("type") == "message")
        assert msg["data"] == {"px": 1.5} and msg["offset"] == res["offset"] and msg["msg_type"] == "trading_signal"
