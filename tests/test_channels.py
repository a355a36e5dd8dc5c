"""Channels through real clients: tenant isolation, admin-only groups, user channels, defaults, publishers."""

from __future__ import annotations

import itertools
from typing import Any

from tests.harness import frames_before, make_token, recv_until, request, wait_for, welcome

_ids = itertools.count(1)

# Every spelling of acme's trading-signals instance a globex client might try.
ACME_SPELLINGS = [
    "trading-signals/acme", "trading-signals/acme/", "trading-signals//acme", "trading-signals/./acme",
    "trading-signals/../acme", "Trading-Signals/acme", "trading-signals/ACME", " trading-signals/acme",
    "trading-signals/acme ", "trading-signals/acme\u0000", "trading-signals%2Facme", "trading-signals%2facme",
    "trading-signals/acme/alice", "trading-signals/\u0430cme", "trading-signals/\uff41\uff43\uff4d\uff45",
    "trading-signals/acme\u200b", "trading-signals\u2215acme", "trading-signals\\acme",
    "/trading-signals/acme",
    "trading-signals/globex/../acme", "trading-signals/*", "trading-signals/acme\n", "trading-signals/ac%6De",
]
# Every spelling of alice's notifications instance that bob (same company) might try.
ALICE_SPELLINGS = [
    "notifications/acme/alice", "notifications/acme/alice/", "notifications/acme//alice",
    "notifications/acme/./alice", "notifications/acme/bob/../alice", "notifications/acme/ALICE",
    "notifications/acme/\u0430lice", "notifications/acme/alice\u0000", "notifications%2Facme%2Falice",
    "notifications/acme/*", "Notifications/acme/alice", "notifications/acme",
]
REFUSED = ("forbidden", "bad_request", "unknown_channel")


def rid() -> int:
    return next(_ids)


def messages_in(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The channel messages in a list of frames, batches unpacked."""
    out: list[dict[str, Any]] = []
    for f in frames:
        if f.get("type") == "message":
            out.append(f)
        elif f.get("type") == "batch":
            out.extend(f["messages"])
    return out


async def subscribe(ws: Any, channel: str, **extra: Any) -> dict[str, Any]:
    reply = await request(ws, {"op": "subscribe", "id": rid(), "channel": channel, **extra})
    assert reply["ok"], reply
    return reply["result"]


async def refused(ws: Any, frame: dict[str, Any]) -> str:
    """Send ``frame`` and return its error code, asserting it was refused."""
    reply = await request(ws, dict(frame, id=rid()))
    assert reply["ok"] is False, (frame, reply)
    return reply["error"]["code"]


async def test_company_publishes_reach_only_that_company(wsd):
    """acme and globex each subscribe to trading-signals; each company's publish reaches only its own."""
    async with wsd.connect(token=make_token("alice", "acme")) as acme, \
            wsd.connect(token=make_token("bob", "globex")) as globex:
        await welcome(acme)
        await welcome(globex)
        assert (await subscribe(acme, "trading-signals"))["channel"] == "trading-signals/acme"
        assert (await subscribe(globex, "trading-signals"))["channel"] == "trading-signals/globex"
        r1 = await wsd.ctl("publish", channel="trading-signals/acme", type="sig", data={"for": "acme"})
        r2 = await wsd.ctl("publish", channel="trading-signals/globex", type="sig", data={"for": "globex"})
        assert r1["delivered"] == 1 and r2["delivered"] == 1
        await wsd.ctl("publish", channel="trading-signals/acme", data={"sentinel": "a"})
        await wsd.ctl("publish", channel="trading-signals/globex", data={"sentinel": "g"})
        got_acme = messages_in(await frames_before(acme, "a"))
        got_globex = messages_in(await frames_before(globex, "g"))
        assert [m["data"] for m in got_acme] == [{"for": "acme"}]
        assert [m["data"] for m in got_globex] == [{"for": "globex"}]
        assert got_acme[0]["channel"] == "trading-signals/acme"


async def test_every_spelling_of_another_tenant_is_refused(wsd):
    """A globex client trying every spelling of acme's instances (subscribe, history, publish) is refused."""
    await wsd.ctl("publish", channel="trading-signals/acme", type="sig", data={"secret": "acme-history"})
    async with wsd.connect(token=make_token("alice", "acme")) as alice, \
            wsd.connect("api", token=make_token("bob", "globex")) as bob:
        await welcome(alice)
        wb = await welcome(bob)
        await subscribe(alice, "trading-signals")
        await subscribe(bob, "trading-signals")
        await subscribe(bob, "notifications")
        for name in ACME_SPELLINGS + ALICE_SPELLINGS:
            for op in ("subscribe", "history", "publish"):
                code = await refused(bob, {"op": op, "channel": name, "data": {"x": 1}} if op == "publish"
                                     else {"op": op, "channel": name})
                assert code in REFUSED, (op, name, code)
        # The plain spelling of another tenant's instance is an explicit `forbidden`, for every op.
        for op in ("subscribe", "history", "publish"):
            assert await refused(bob, {"op": op, "channel": "trading-signals/acme"}) == "forbidden"
            assert await refused(bob, {"op": op, "channel": "notifications/acme/alice"}) == "forbidden"
        # Nothing leaked: bob holds only his own instances, and acme's instance has only alice.
        subs = await wsd.ctl("subscriptions.list", connection=wb["connection_id"])
        assert sorted(s["channel"] for s in subs["items"]) == ["notifications/globex/bob",
                                                               "trading-signals/globex"]
        pres = await wsd.ctl("presence.get", channel="trading-signals/acme")
        assert pres["connections"] == 1 and pres["users"] == ["alice"]
        res = await wsd.ctl("publish", channel="trading-signals/acme", type="sig",
                            data={"secret": "acme-live"})
        assert res["delivered"] == 1
        await wsd.ctl("publish", channel="trading-signals/globex", data={"sentinel": "bob"})
        assert await frames_before(bob, "bob") == []
        got = await recv_until(alice, lambda m: m.get("type") == "message")
        assert got["data"] == {"secret": "acme-live"}


async def test_user_channel_spellings_refused_within_company(wsd):
    """bob (acme) cannot subscribe, read or publish alice's notifications under any spelling."""
    async with wsd.connect("api", token=make_token("bob", "acme")) as bob:
        await welcome(bob)
        for name in ALICE_SPELLINGS:
            for op in ("subscribe", "history", "publish"):
                code = await refused(bob, {"op": op, "channel": name})
                assert code in REFUSED, (op, name, code)
        assert await refused(bob, {"op": "subscribe", "channel": "notifications/acme/alice"}) == "forbidden"


async def test_user_channel_reaches_only_its_user(wsd):
    """notifications resolves to notifications/<company>/<user>; alice's messages skip bob (same company)."""
    async with wsd.connect(token=make_token("alice", "acme")) as alice, \
            wsd.connect(token=make_token("bob", "acme")) as bob:
        await welcome(alice)
        await welcome(bob)
        assert (await subscribe(alice, "notifications"))["channel"] == "notifications/acme/alice"
        assert (await subscribe(bob, "notifications"))["channel"] == "notifications/acme/bob"
        res = await wsd.ctl("publish", channel="notifications/acme/alice", type="note", data={"to": "alice"})
        assert res["delivered"] == 1
        msg = await recv_until(alice, lambda m: m.get("type") == "message")
        assert msg["data"] == {"to": "alice"} and msg["channel"] == "notifications/acme/alice"
        await wsd.ctl("publish", channel="notifications/acme/bob", data={"sentinel": "b"})
        assert messages_in(await frames_before(bob, "b")) == []


async def test_admin_only_group(wsd):
    """A non-admin subscribing to admin-events is forbidden; an admin subscribes and receives."""
    async with wsd.connect(token=make_token("alice", "acme")) as user, \
            wsd.connect("admin", token=make_token("root", "ops", roles=["admin"])) as admin:
        await welcome(user)
        await welcome(admin)
        assert await refused(user, {"op": "subscribe", "channel": "admin-events"}) == "forbidden"
        assert await refused(user, {"op": "history", "channel": "admin-events"}) == "forbidden"
        assert (await subscribe(admin, "admin-events"))["channel"] == "admin-events"
        res = await wsd.ctl("publish", channel="admin-events", type="audit", data={"n": 1})
        assert res["delivered"] == 1
        msg = await recv_until(admin, lambda m: m.get("type") == "message")
        assert msg["channel"] == "admin-events" and msg["data"] == {"n": 1}


async def test_admin_may_name_any_tenant_instance(wsd):
    """An admin subscribes to trading-signals/acme and notifications/acme/alice by full name and receives."""
    async with wsd.connect("admin", token=make_token("root", "ops", roles=["admin"])) as admin:
        await welcome(admin)
        assert (await subscribe(admin, "trading-signals/acme"))["channel"] == "trading-signals/acme"
        assert (await subscribe(admin, "notifications/acme/alice"))["channel"] == "notifications/acme/alice"
        await wsd.ctl("publish", channel="trading-signals/acme", data={"c": 1})
        await wsd.ctl("publish", channel="notifications/acme/alice", data={"u": 1})
        a = await recv_until(admin, lambda m: m.get("type") == "message")
        b = await recv_until(admin, lambda m: m.get("type") == "message")
        assert (a["channel"], b["channel"]) == ("trading-signals/acme", "notifications/acme/alice")
        reply = await request(admin, {"op": "history", "id": rid(), "channel": "trading-signals/acme"})
        assert reply["ok"] and [m["data"] for m in reply["result"]["messages"]] == [{"c": 1}]


async def test_default_subscription_on_connect(wsd):
    """A frontend client is subscribed to system-status on connect and receives it without subscribing."""
    async with wsd.connect(token=make_token("alice", "acme")) as fe, \
            wsd.connect("api", token=make_token("carol", "acme")) as api:
        w = await welcome(fe)
        assert w["subscriptions"] == ["system-status"]
        assert (await welcome(api))["subscriptions"] == []
        await wait_for(lambda: _presence_is(wsd, "system-status", 1))
        res = await wsd.ctl("publish", channel="system-status", type="status", data={"ok": True})
        assert res["delivered"] == 1
        msg = await recv_until(fe, lambda m: m.get("type") == "message")
        assert msg["channel"] == "system-status" and msg["data"] == {"ok": True}


async def _presence_is(wsd: Any, channel: str, n: int) -> bool:
    return bool((await wsd.ctl("presence.get", channel=channel))["connections"] == n)


async def test_publisher_permissions(wsd):
    """api and mt5 clients may publish to their trading-signals, frontend may not; admin publishes status."""
    async with wsd.connect(token=make_token("alice", "acme")) as fe, \
            wsd.connect("api", token=make_token("svc", "acme")) as api, \
            wsd.connect("mt5", token=make_token("term", "acme")) as mt5, \
            wsd.connect("admin", token=make_token("root", "ops", roles=["admin"])) as admin:
        for ws in (fe, api, mt5, admin):
            await welcome(ws)
        await subscribe(fe, "trading-signals")
        reply = await request(api, {"op": "publish", "id": rid(), "channel": "trading-signals", "type": "sig",
                                    "data": {"from": "api"}})
        assert reply["ok"] and reply["result"]["channel"] == "trading-signals/acme"
        assert reply["result"]["delivered"] == 1 and reply["result"]["offset"] == 1
        reply = await request(mt5, {"op": "publish", "id": rid(), "channel": "trading-signals/acme",
                                    "data": {"from": "mt5"}})
        assert reply["ok"] and reply["result"]["offset"] == 2
        got = [await recv_until(fe, lambda m: m.get("type") == "message") for _ in range(2)]
        assert [m["data"] for m in got] == [{"from": "api"}, {"from": "mt5"}]
        assert await refused(fe, {"op": "publish", "channel": "trading-signals", "data": {}}) == "forbidden"
        assert await refused(api, {"op": "publish", "channel": "system-status", "data": {}}) == "forbidden"
        reply = await request(admin, {"op": "publish", "id": rid(), "channel": "system-status",
                                      "type": "status", "data": {"maintenance": False}})
        assert reply["ok"] and reply["result"]["delivered"] == 1
        msg = await recv_until(fe, lambda m: m.get("type") == "message")
        assert msg["channel"] == "system-status" and msg["data"] == {"maintenance": False}


async def test_publish_errors(wsd):
    """A publish with a bad priority or ttl, or to an unknown group, is refused with its code."""
    async with wsd.connect("api", token=make_token("svc", "acme")) as api:
        await welcome(api)
        assert await refused(api, {"op": "publish", "channel": "nope", "data": {}}) == "unknown_channel"
        assert await refused(api, {"op": "publish", "channel": "trading-signals", "priority": "urgent"}) \
            == "bad_request"
        assert await refused(api, {"op": "publish", "channel": "trading-signals", "ttl": 0}) == "bad_request"


async def test_presence_shows_connections_and_users(wsd):
    """presence.get counts a channel instance's connections and lists its user ids."""
    async with wsd.connect(token=make_token("alice", "acme")) as a1, \
            wsd.connect(token=make_token("alice", "acme")) as a2, \
            wsd.connect(token=make_token("bob", "acme")) as b, \
            wsd.connect(token=make_token("eve", "globex")) as e:
        for ws in (a1, a2, b, e):
            await welcome(ws)
            await subscribe(ws, "trading-signals")
        pres = await wsd.ctl("presence.get", channel="trading-signals/acme")
        assert {k: pres[k] for k in ("channel", "connections", "users")} == \
            {"channel": "trading-signals/acme", "connections": 3, "users": ["alice", "bob"]}
        assert pres["missing"] == [] and pres["by_node"] == {pres["node"]: 3}  # one node: all of it
        await request(b, {"op": "unsubscribe", "id": rid(), "channel": "trading-signals"})
        pres = await wsd.ctl("presence.get", channel="trading-signals/acme")
        assert pres["connections"] == 2 and pres["users"] == ["alice"]
        pres = await wsd.ctl("presence.get", channel="trading-signals/globex")
        assert pres["connections"] == 1 and pres["users"] == ["eve"]


async def test_presence_is_gone_after_disconnect(wsd):
    """A connection that closes leaves the presence of its channels."""
    async with wsd.connect(token=make_token("alice", "acme")) as ws:
        await welcome(ws)
        await subscribe(ws, "trading-signals")
        assert await _presence_is(wsd, "trading-signals/acme", 1)
    await wait_for(lambda: _presence_is(wsd, "trading-signals/acme", 0))


async def test_presence_op_for_admin_pool_only(wsd):
    """An admin-pool client asks presence of any instance; other clients get forbidden."""
    async with wsd.connect(token=make_token("alice", "acme")) as alice, \
            wsd.connect("api", token=make_token("svc", "acme")) as api, \
            wsd.connect("admin", token=make_token("root", "ops", roles=["admin"])) as admin:
        for ws in (alice, api, admin):
            await welcome(ws)
        await subscribe(alice, "trading-signals")
        reply = await request(admin, {"op": "presence", "id": rid(), "channel": "trading-signals/acme"})
        assert reply["ok"] and reply["result"] == {"channel": "trading-signals/acme", "connections": 1,
                                                   "users": ["alice"]}
        assert await refused(alice, {"op": "presence", "channel": "trading-signals"}) == "forbidden"
        assert await refused(api, {"op": "presence", "channel": "trading-signals/acme"}) == "forbidden"
