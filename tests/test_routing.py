"""Routing rules end to end: real daemons with `[[routing.rules]]`, real clients, control-socket publishes.

Absence is proven with a sentinel: after a publish, the test sends the client a direct message over the
control socket; a connection's pushes are written in order, so anything the publish was going to deliver
to it arrives before the sentinel.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from tests.harness import Wsd, make_token, recv_json, request, welcome

CHANNELS = """
[channels.system-status]
type = "global"
publishers = ["admin"]

[channels.trading-signals]
type = "company"
publishers = ["mt5", "api", "admin"]

[channels.alerts]
type = "company"
publishers = ["admin"]

[channels.notifications]
type = "user"
publishers = ["api", "admin"]
"""

RULES = """
[[routing.rules]]
id = "promo"
priority = 100
filter = { message_types = ["promo"] }
target = { type = "broadcast" }
transform.include_fields = ["px", "qty", "internal", "note"]
transform.exclude_fields = ["internal"]
transform.rename = { px = "price" }
transform.set = { source = "gw" }
pool_transforms = { mt5 = { exclude_fields = ["note"], set = { venue = "mt5" } } }

[[routing.rules]]
id = "dormant"
priority = 90
enabled = false
filter = { message_types = ["dormant"] }
target = { type = "broadcast" }

[[routing.rules]]
id = "acme-frontend"
priority = 80
filter = { message_types = ["fx"], expression = 'conn.company_id == "acme" and conn.pool == "frontend"' }
target = { type = "filtered" }

[[routing.rules]]
id = "admins"
priority = 80
filter = { message_types = ["adm"], expression = '"admin" in conn.roles' }
target = { type = "filtered" }

[[routing.rules]]
id = "vip-alice"
priority = 50
stop = true
filter = { message_types = ["vip"], expression = 'conn.user_id == "alice"' }
target = { type = "filtered" }

[[routing.rules]]
id = "vip-all"
priority = 10
filter = { message_types = ["vip"] }
target = { type = "broadcast" }

[[routing.rules]]
id = "to-alerts"
priority = 5
filter = { message_types = ["grp"] }
target = { type = "group", group_id = "alerts" }

[[routing.rules]]
id = "big-trades"
priority = 5
filter = { message_types = ["trade"], expression = "msg.data.qty >= 100" }
target = { type = "broadcast", pools = ["mt5"] }
"""


async def hello(
    w: Wsd, user: str, company: str, pool: str = "frontend", roles: list[str] | None = None
) -> tuple[Any, str]:
    """Connect a client and read its welcome: (ws, connection id)."""
    ws = await w.connect(pool, make_token(user, company, roles=roles))
    return ws, (await welcome(ws))["connection_id"]


async def before_sentinel(w: Wsd, ws: Any, conn_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every push the client gets before a sentinel sent to it now; the sentinel itself must arrive."""
    mark = secrets.token_hex(4)
    await w.ctl("send", connection_id=conn_id, type="sentinel", data={"mark": mark})
    got: list[dict[str, Any]] = []
    while True:
        m = await recv_json(ws, timeout)
        if m.get("msg_type") == "sentinel" and m["data"] == {"mark": mark}:
            return got
        got.append(m)


def of_type(frames: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == "message" and f.get("msg_type") == msg_type]


def hits(listing: dict[str, Any]) -> dict[str, int]:
    return {r["id"]: r["hits"] for r in listing["rules"]}


async def test_broadcast_rule_transforms_reach_unsubscribed_clients(wsd_factory):
    """A broadcast rule reaches unsubscribed clients, transformed; the mt5 pool transform only on mt5."""
    w = wsd_factory(CHANNELS + RULES)
    front, front_id = await hello(w, "alice", "acme")
    mt5, mt5_id = await hello(w, "bob", "globex", pool="mt5")
    try:
        data = {"px": 1.5, "qty": 2, "internal": "secret", "note": "n", "extra": 9}
        res = await w.ctl("publish", channel="trading-signals/acme", type="promo", data=data)
        assert res["delivered"] == 2
        f = of_type(await before_sentinel(w, front, front_id), "promo")
        m = of_type(await before_sentinel(w, mt5, mt5_id), "promo")
        assert len(f) == 1 and len(m) == 1
        assert f[0]["data"] == {"price": 1.5, "qty": 2, "note": "n", "source": "gw"}
        assert m[0]["data"] == {"price": 1.5, "qty": 2, "source": "gw", "venue": "mt5"}
        assert f[0]["channel"] == m[0]["channel"] == "trading-signals/acme"
        assert f[0]["offset"] == m[0]["offset"] == res["offset"]
        # The stored message is the original: transforms shape deliveries, not history.
        hist = await w.ctl("history.get", channel="trading-signals/acme")
        assert hist["messages"][-1]["data"] == data
    finally:
        await front.close()
        await mt5.close()


async def test_message_expression_filters_by_data(wsd_factory):
    """A rule whose expression reads msg.data routes only the messages it matches, narrowed to its pools."""
    w = wsd_factory(CHANNELS + RULES)
    front, front_id = await hello(w, "alice", "acme")
    mt5, mt5_id = await hello(w, "bob", "acme", pool="mt5")
    try:
        small = await w.ctl("publish", channel="trading-signals/acme", type="trade", data={"qty": 5})
        big = await w.ctl("publish", channel="trading-signals/acme", type="trade", data={"qty": 500})
        assert small["delivered"] == 0 and big["delivered"] == 1
        assert [x["data"] for x in of_type(await before_sentinel(w, mt5, mt5_id), "trade")] == [{"qty": 500}]
        assert of_type(await before_sentinel(w, front, front_id), "trade") == []
        listing = await w.ctl("rules.list")
        assert hits(listing)["big-trades"] == 1
        assert listing["metrics"]["messages_unrouted"] >= 1
    finally:
        await front.close()
        await mt5.close()


async def test_disabled_rules_do_not_route_and_hits_are_counted(wsd_factory):
    """Rules disabled in config or by rules.set_enabled do not route; rules.list counts hits."""
    w = wsd_factory(CHANNELS + RULES)
    sub, sub_id = await hello(w, "alice", "acme")
    loner, loner_id = await hello(w, "bob", "acme", pool="mt5")
    try:
        assert (await request(sub, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
        before = await w.ctl("rules.list")
        dormant = next(r for r in before["rules"] if r["id"] == "dormant")
        assert dormant["enabled"] is False

        # enabled = false in config: the message falls through to the channel's subscribers only.
        res = await w.ctl("publish", channel="trading-signals/acme", type="dormant", data={"a": 1})
        assert res["delivered"] == 1
        assert [x["data"] for x in of_type(await before_sentinel(w, sub, sub_id), "dormant")] == [{"a": 1}]
        assert of_type(await before_sentinel(w, loner, loner_id), "dormant") == []

        data = {"px": 2.0, "internal": "x"}
        await w.ctl("publish", channel="trading-signals/acme", type="promo", data=data)
        assert len(of_type(await before_sentinel(w, loner, loner_id), "promo")) == 1
        assert hits(await w.ctl("rules.list"))["promo"] == 1

        # Disabled at run time: the unsubscribed client gets nothing, the subscriber the original.
        got = await w.ctl("rules.set_enabled", id="promo", enabled=False)
        assert got["enabled"] is False
        res = await w.ctl("publish", channel="trading-signals/acme", type="promo", data=data)
        assert res["delivered"] == 1
        assert of_type(await before_sentinel(w, loner, loner_id), "promo") == []
        assert [x["data"] for x in of_type(await before_sentinel(w, sub, sub_id), "promo")] == [
            {"price": 2.0, "source": "gw"},
            data,
        ]
        listing = await w.ctl("rules.list")
        assert hits(listing)["promo"] == 1 and hits(listing)["dormant"] == 0
        assert (await w.ctl("rules.get", id="promo"))["enabled"] is False

        # Enabled again: routing resumes and the hit is counted.
        await w.ctl("rules.set_enabled", id="promo", enabled=True)
        await w.ctl("publish", channel="trading-signals/acme", type="promo", data=data)
        assert [x["data"] for x in of_type(await before_sentinel(w, loner, loner_id), "promo")] == [
            {"price": 2.0, "source": "gw", "venue": "mt5"}
        ]
        assert hits(await w.ctl("rules.list"))["promo"] == 2
        events = (await w.ctl("events.recent", limit=50))["events"]
        assert [e["enabled"] for e in events if e["event"] == "rule_changed"] == [False, True]
    finally:
        await sub.close()
        await loner.close()


async def test_filtered_target_reaches_exactly_matching_connections(wsd_factory):
    """A filtered target reaches exactly the connections its expression matches; others get nothing."""
    w = wsd_factory(CHANNELS + RULES)
    clients = {
        "alice": await hello(w, "alice", "acme"),
        "dave": await hello(w, "dave", "acme"),
        "bob": await hello(w, "bob", "acme", pool="mt5"),
        "carol": await hello(w, "carol", "globex"),
        "erin": await hello(w, "erin", "globex", roles=["admin"]),
    }
    try:
        res = await w.ctl("publish", channel="trading-signals/acme", type="fx", data={"pair": "EURUSD"})
        assert res["delivered"] == 2
        res = await w.ctl("publish", channel="system-status", type="adm", data={"op": "maint"})
        assert res["delivered"] == 1
        got = {name: await before_sentinel(w, ws, cid) for name, (ws, cid) in clients.items()}
        assert {n for n, fr in got.items() if of_type(fr, "fx")} == {"alice", "dave"}
        assert all(len(of_type(fr, "fx")) <= 1 for fr in got.values())
        assert {n for n, fr in got.items() if of_type(fr, "adm")} == {"erin"}
        assert of_type(got["alice"], "fx")[0]["data"] == {"pair": "EURUSD"}
        assert hits(await w.ctl("rules.list"))["acme-frontend"] == 1
    finally:
        for ws, _ in clients.values():
            await ws.close()


async def test_group_stop_and_unrouted_messages(wsd_factory):
    """Group targets stay in the message's tenant; stop=true ends the walk; unrouted goes to subscribers."""
    w = wsd_factory(CHANNELS + RULES)
    alice, alice_id = await hello(w, "alice", "acme")
    dave, dave_id = await hello(w, "dave", "acme")
    carol, carol_id = await hello(w, "carol", "globex")
    everyone = [("alice", alice, alice_id), ("dave", dave, dave_id), ("carol", carol, carol_id)]
    try:
        for i, ws in enumerate((alice, carol), 1):
            assert (await request(ws, {"op": "subscribe", "id": i, "channel": "alerts"}))["ok"]
            assert (await request(ws, {"op": "subscribe", "id": 10 + i, "channel": "trading-signals"}))["ok"]

        async def who(msg_type: str) -> set[str]:
            return {
                name for name, ws, cid in everyone if of_type(await before_sentinel(w, ws, cid), msg_type)
            }

        # group: the publication's tenant picks alerts/acme, never alerts/globex.
        assert (await w.ctl("publish", channel="trading-signals/acme", type="grp", data={}))["delivered"] == 1
        assert await who("grp") == {"alice"}
        assert (await w.ctl("publish", channel="trading-signals/globex", type="grp", data={}))[
            "delivered"
        ] == 1
        assert await who("grp") == {"carol"}

        # stop = true on the higher-priority rule: the broadcast rule below it is never tried.
        assert (await w.ctl("publish", channel="system-status", type="vip", data={}))["delivered"] == 1
        assert await who("vip") == {"alice"}
        h = hits(await w.ctl("rules.list"))
        assert h["vip-alice"] == 1 and h["vip-all"] == 0
        await w.ctl("rules.set_enabled", id="vip-alice", enabled=False)
        assert (await w.ctl("publish", channel="system-status", type="vip", data={}))["delivered"] == 3
        assert await who("vip") == {"alice", "dave", "carol"}

        # No rule matches: the channel's subscribers only (dave is acme but not subscribed).
        unrouted = (await w.ctl("metrics.get"))["routing"]["messages_unrouted"]
        assert (await w.ctl("publish", channel="trading-signals/acme", type="plain", data={}))[
            "delivered"
        ] == 1
        assert await who("plain") == {"alice"}
        assert (await w.ctl("metrics.get"))["routing"]["messages_unrouted"] == unrouted + 1
    finally:
        for _, ws, _ in everyone:
            await ws.close()


async def test_individual_target_after_reload(wsd_factory):
    """An individual target (connection_ids, set by a reload) reaches exactly those connections."""
    w = wsd_factory(CHANNELS + RULES)
    alice, alice_id = await hello(w, "alice", "acme")
    bob, bob_id = await hello(w, "bob", "acme", pool="mt5")
    carol, carol_id = await hello(w, "carol", "globex")
    try:
        w.config_path.write_text(
            w.config_path.read_text()
            + f"""
[[routing.rules]]
id = "direct"
priority = 1
filter = {{ message_types = ["dm"] }}
target = {{ type = "individual", connection_ids = {json.dumps([bob_id, carol_id, "0000000000000000"])} }}
"""
        )
        assert (await w.ctl("reload"))["ok"]
        assert (await w.ctl("rules.get", id="direct"))["target"]["connection_ids"][:2] == [bob_id, carol_id]
        res = await w.ctl("publish", channel="trading-signals/acme", type="dm", data={"hi": 1})
        assert res["delivered"] == 2
        got = {
            n: of_type(await before_sentinel(w, ws, cid), "dm")
            for n, ws, cid in (("alice", alice, alice_id), ("bob", bob, bob_id), ("carol", carol, carol_id))
        }
        assert {n for n, fr in got.items() if fr} == {"bob", "carol"}
        assert got["carol"][0]["data"] == {"hi": 1}
    finally:
        for ws in (alice, bob, carol):
            await ws.close()
