"""Tests for wsd.core.router: routing rules, filters, targets and transforms."""

from __future__ import annotations

import enum
from types import SimpleNamespace
from typing import Any

import pytest

from wsd.core.expr import ExpressionError
from wsd.core.router import Route, RoutedMessage, RuleTable, Transform, priority_name


def tcfg(include: list[str] | None = None, exclude: list[str] | None = None,
         rename: dict[str, str] | None = None, set: dict[str, Any] | None = None) -> SimpleNamespace:
    """A TransformConfig."""
    return SimpleNamespace(include_fields=include or [], exclude_fields=exclude or [],
                           rename=rename or {}, set=set or {})


def rule(
    id: str,
    *,
    priority: int = 0,
    enabled: bool = True,
    stop: bool = False,
    types: list[str] | None = None,
    channels: list[str] | None = None,
    user_ids: list[str] | None = None,
    company_ids: list[str] | None = None,
    expression: str = "",
    target: str = "broadcast",
    transform: SimpleNamespace | None = None,
    pool_transforms: dict[str, SimpleNamespace] | None = None,
    **target_fields: Any,
) -> SimpleNamespace:
    """A RuleConfig with its FilterConfig and TargetConfig, defaults everywhere."""
    target_cfg = SimpleNamespace(type=target, connection_ids=[], group_id="", pools=[], company_ids=[],
                                 reliable_delivery=False, max_retries=0, ack_timeout_ms=2000)
    for key, value in target_fields.items():
        setattr(target_cfg, key, value)
    return SimpleNamespace(
        id=id, priority=priority, enabled=enabled, stop=stop,
        filter=SimpleNamespace(message_types=types or [], channels=channels or [], user_ids=user_ids or [],
                               company_ids=company_ids or [], expression=expression),
        target=target_cfg,
        transform=transform or tcfg(),
        pool_transforms=pool_transforms or {},
    )


def message(**fields: Any) -> RoutedMessage:
    """A trading signal on trading-signals/acme unless told otherwise."""
    base: dict[str, Any] = {"type": "trading_signal", "channel": "trading-signals/acme",
                            "data": {"px": 1.25, "sym": "EURUSD", "internal": "x"}, "priority": "high"}
    base.update(fields)
    return RoutedMessage(**base)


def ids(routes: list[Route]) -> list[str]:
    """The rule ids of a list of routes."""
    return [r.rule_id for r in routes]


def matches(cfg: SimpleNamespace, msg: RoutedMessage) -> bool:
    """Whether a table holding only ``cfg`` routes ``msg``."""
    return ids(RuleTable([cfg]).route(msg)) == [cfg.id]


CONN = {"id": "c1", "pool": "mt5", "pool_type": "mt5_client", "user_id": "alice", "company_id": "acme",
        "roles": ["trader"], "state": "connected", "remote_address": "10.0.0.7"}


# --------------------------------------------------------------------------- RoutedMessage


@pytest.mark.parametrize(
    ("channel", "group", "company_id", "user_id"),
    [
        ("notifications/acme/alice", "notifications", "acme", "alice"),
        ("trading-signals/acme", "trading-signals", "acme", ""),
        ("system-status", "system-status", "", ""),
        ("", "", "", ""),
    ],
)
def test_message_tenant_comes_from_the_channel_instance(channel: str, group: str, company_id: str,
                                                        user_id: str) -> None:
    """group, company_id and user_id are read from the channel instance when not given."""
    msg = RoutedMessage(type="t", channel=channel)
    assert (msg.group, msg.company_id, msg.user_id) == (group, company_id, user_id)


def test_message_tenant_given_by_publisher_wins() -> None:
    """Explicit user_id / company_id (including "" for none) override the channel instance."""
    msg = RoutedMessage(type="t", channel="notifications/acme/alice", user_id="bob", company_id="")
    assert (msg.user_id, msg.company_id) == ("bob", "")


def test_message_as_mapping() -> None:
    """as_mapping exposes the fields expressions see, with the priority as a lower-case name."""
    msg = RoutedMessage(type="t", channel="notifications/acme/alice", priority="HIGH", data={"a": 1},
                        source="wsctl", id="m1", ttl_s=5.0)
    assert msg.as_mapping() == {
        "type": "t", "channel": "notifications/acme/alice", "group": "notifications", "priority": "high",
        "data": {"a": 1}, "user_id": "alice", "company_id": "acme", "source": "wsctl",
    }
    assert not hasattr(msg, "__dict__")


class Priority(enum.IntEnum):
    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


@pytest.mark.parametrize(("given", "name"), [(Priority.CRITICAL, "critical"), ("Low", "low"), (1, "high"),
                                             (2, "normal")])
def test_priority_name(given: Any, name: str) -> None:
    """Priorities given as an enum member, a name or its number all read as a lower-case name."""
    assert priority_name(given) == name


# --------------------------------------------------------------------------- filters


def test_empty_table_routes_nothing_and_counts_unrouted() -> None:
    """With no rules route() returns [] and counts the message as unrouted."""
    table = RuleTable([])
    assert table.route(message()) == []
    assert (table.messages_routed, table.messages_unrouted) == (0, 1)


def test_empty_filter_matches_everything() -> None:
    """A rule with an empty filter matches any message."""
    cfg = rule("all")
    assert matches(cfg, message())
    assert matches(cfg, RoutedMessage(type="other"))


@pytest.mark.parametrize(("types", "hit"), [(["trading_signal"], True), (["a", "trading_signal"], True),
                                            (["system_alert"], False)])
def test_message_types_filter(types: list[str], hit: bool) -> None:
    """message_types matches the message type."""
    assert matches(rule("r", types=types), message()) is hit


@pytest.mark.parametrize(
    ("channels", "channel", "hit"),
    [
        (["trading-signals/acme"], "trading-signals/acme", True),
        (["trading-signals"], "trading-signals/acme", True),
        (["trading-signals"], "trading-signals/globex", True),
        (["trading-signals/globex"], "trading-signals/acme", False),
        (["notifications"], "trading-signals/acme", False),
        (["system-status"], "system-status", True),
        (["system-status"], "", False),
    ],
)
def test_channels_filter_matches_instance_or_group(channels: list[str], channel: str, hit: bool) -> None:
    """channels matches the full channel instance or its group name."""
    assert matches(rule("r", channels=channels), message(channel=channel)) is hit


@pytest.mark.parametrize(("user_ids", "hit"), [(["alice"], True), (["bob", "alice"], True), (["bob"], False)])
def test_user_ids_filter(user_ids: list[str], hit: bool) -> None:
    """user_ids matches the user the message belongs to."""
    assert matches(rule("r", user_ids=user_ids), message(channel="notifications/acme/alice")) is hit


@pytest.mark.parametrize(("company_ids", "hit"), [(["acme"], True), (["globex"], False)])
def test_company_ids_filter(company_ids: list[str], hit: bool) -> None:
    """company_ids matches the company the message belongs to."""
    assert matches(rule("r", company_ids=company_ids), message()) is hit


def test_tenant_filters_use_publisher_given_tenant() -> None:
    """A tenant given by the publisher (no tenant in the channel) is what the filters see."""
    msg = message(channel="system-status", company_id="acme", user_id="alice")
    assert matches(rule("r", company_ids=["acme"], user_ids=["alice"]), msg)


def test_all_filter_fields_must_match() -> None:
    """Filter fields combine with AND."""
    cfg = rule("r", types=["trading_signal"], channels=["trading-signals"], company_ids=["globex"])
    assert not matches(cfg, message())


@pytest.mark.parametrize(
    ("expression", "hit"),
    [
        ("msg.data.px > 1", True),
        ("msg.data.px > 2", False),
        ("msg.priority == 'high' and msg.group == 'trading-signals'", True),
        ("msg.company_id == 'acme' and msg.source == ''", True),
        ("false", False),
        ("true", True),
    ],
)
def test_message_expression_is_part_of_the_match(expression: str, hit: bool) -> None:
    """An expression over msg only (or over nothing) is evaluated once per message as part of the match."""
    table = RuleTable([rule("r", expression=expression)])
    routes = table.route(message())
    assert ids(routes) == (["r"] if hit else [])
    if hit:
        assert routes[0].conn_predicate is None


def test_connection_expression_becomes_a_receiver_predicate() -> None:
    """An expression over conn matches at message level and travels as the route's conn_predicate."""
    cfg = rule("r", target="filtered", expression="conn.pool == 'mt5' and 'trader' in conn.roles")
    (route,) = RuleTable([cfg]).route(message())
    assert route.conn_predicate is not None
    assert route.conn_predicate.source == cfg.filter.expression
    assert route.conn_predicate(None, CONN) is True
    assert route.conn_predicate(None, {**CONN, "pool": "frontend"}) is False


def test_mixed_expression_is_a_receiver_predicate_over_both() -> None:
    """An expression over msg and conn is applied per receiver with the message mapping."""
    cfg = rule("r", expression="msg.company_id == conn.company_id")
    msg = message()
    (route,) = RuleTable([cfg]).route(msg)
    assert route.conn_predicate(msg.as_mapping(), CONN) is True
    assert route.conn_predicate(msg.as_mapping(), {**CONN, "company_id": "globex"}) is False


def test_connection_expression_rule_still_needs_the_other_fields() -> None:
    """A conn expression does not bypass the rule's list filters."""
    assert not matches(rule("r", types=["other"], expression="conn.pool == 'mt5'"), message())


def test_route_without_expression_has_no_receiver_predicate() -> None:
    """A route without a conn expression has no conn_predicate: every receiver it targets gets the message."""
    (route,) = RuleTable([rule("r")]).route(message())
    assert route.conn_predicate is None


def test_bad_expression_names_the_rule_and_column() -> None:
    """A rule with an invalid expression fails table construction with its id and the column."""
    with pytest.raises(ExpressionError) as info:
        RuleTable([rule("ok"), rule("broken", expression="msg.type == __import__('os')")])
    assert "'broken'" in info.value.message
    assert info.value.position == 13


def test_duplicate_rule_ids_are_refused() -> None:
    """Two rules with the same id are a ValueError."""
    with pytest.raises(ValueError, match="duplicate"):
        RuleTable([rule("a"), rule("a")])


# --------------------------------------------------------------------------- the walk


def test_rules_are_tried_highest_priority_first() -> None:
    """Matching rules contribute their routes in descending priority."""
    table = RuleTable([rule("low", priority=1), rule("high", priority=100), rule("mid", priority=50)])
    assert ids(table.route(message())) == ["high", "mid", "low"]


def test_priority_ties_keep_config_order() -> None:
    """Rules with equal priority keep the order they were configured in."""
    table = RuleTable([rule("b", priority=5), rule("a", priority=5), rule("c", priority=9),
                       rule("d", priority=5)])
    assert ids(table.route(message())) == ["c", "b", "a", "d"]


def test_disabled_rule_is_skipped() -> None:
    """A disabled rule neither matches nor counts a hit."""
    table = RuleTable([rule("off", enabled=False), rule("on")])
    assert ids(table.route(message())) == ["on"]
    assert table.hits() == {"off": 0, "on": 1}


def test_stop_ends_the_walk() -> None:
    """A matching rule with stop=True ends the walk; lower rules are not consulted."""
    table = RuleTable([rule("first", priority=10, stop=True), rule("second", priority=1)])
    assert ids(table.route(message())) == ["first"]
    assert table.hits() == {"first": 1, "second": 0}


def test_stop_on_a_rule_that_does_not_match_does_not_stop() -> None:
    """stop only takes effect when its rule matches."""
    table = RuleTable([rule("first", priority=10, stop=True, types=["other"]), rule("second")])
    assert ids(table.route(message())) == ["second"]


def test_hits_and_routing_metrics_are_counted() -> None:
    """Each match counts a rule hit; messages are counted as routed or unrouted."""
    table = RuleTable([rule("signals", types=["trading_signal"]), rule("alerts", types=["system_alert"])])
    table.route(message())
    table.route(message())
    table.route(message(type="system_alert"))
    table.route(message(type="chatter"))
    assert table.hits() == {"signals": 2, "alerts": 1}
    assert table.metrics() == {"messages_routed": 3, "messages_unrouted": 1,
                               "rule_hits": {"signals": 2, "alerts": 1}}


def test_set_enabled_at_run_time() -> None:
    """set_enabled switches a rule off and back on between messages."""
    table = RuleTable([rule("r")])
    table.set_enabled("r", False)
    assert table.route(message()) == []
    table.set_enabled("r", True)
    assert ids(table.route(message())) == ["r"]


def test_unknown_rule_id_is_a_key_error() -> None:
    """set_enabled and get raise KeyError for an id that is not in the table."""
    table = RuleTable([rule("r")])
    with pytest.raises(KeyError):
        table.set_enabled("nope", True)
    with pytest.raises(KeyError):
        table.get("nope")


def test_routes_are_prebuilt_and_reused() -> None:
    """route() hands out the same prebuilt Route object for every message a rule matches."""
    table = RuleTable([rule("r")])
    assert table.route(message())[0] is table.route(message(type="x"))[0]


def test_route_carries_the_target_and_delivery_settings() -> None:
    """A Route exposes the rule's target config and its reliable-delivery settings."""
    cfg = rule("r", target="individual", connection_ids=["c1"], reliable_delivery=True, max_retries=3,
               ack_timeout_ms=1500)
    (route,) = RuleTable([cfg]).route(message())
    assert route.target is cfg.target
    assert (route.reliable, route.max_retries, route.ack_timeout_s) == (True, 3, 1.5)
    assert route.transform is None and route.pool_transforms == {}


# --------------------------------------------------------------------------- transforms


DATA = {"px": 1.25, "sym": "EURUSD", "internal": "x", "qty": 3}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (tcfg(include=["px", "sym"]), {"px": 1.25, "sym": "EURUSD"}),
        (tcfg(include=["px", "absent"]), {"px": 1.25}),
        (tcfg(exclude=["internal", "absent"]), {"px": 1.25, "sym": "EURUSD", "qty": 3}),
        (tcfg(rename={"px": "price", "absent": "x"}),
         {"price": 1.25, "sym": "EURUSD", "internal": "x", "qty": 3}),
        (tcfg(rename={"px": "sym", "sym": "px"}), {"px": "EURUSD", "sym": 1.25, "internal": "x", "qty": 3}),
        (tcfg(set={"source": "gw", "qty": 0}),
         {"px": 1.25, "sym": "EURUSD", "internal": "x", "qty": 0, "source": "gw"}),
    ],
)
def test_transform_steps(config: SimpleNamespace, expected: dict[str, Any]) -> None:
    """include keeps, exclude drops, rename moves (all at once) and set assigns top-level keys."""
    assert Transform.from_config(config).apply(dict(DATA)) == expected


def test_transform_step_order() -> None:
    """Steps run include -> exclude -> rename -> set."""
    t = Transform.from_config(tcfg(include=["px", "sym", "internal"], exclude=["internal"],
                                   rename={"px": "price", "internal": "leak"}, set={"price": 9, "v": 1}))
    assert t.apply(DATA) == {"sym": "EURUSD", "price": 9, "v": 1}


def test_transform_never_mutates_its_input() -> None:
    """apply returns a new dict and leaves the input as it was."""
    data = dict(DATA)
    out = Transform.from_config(tcfg(exclude=["internal"], rename={"px": "price"}, set={"s": 1})).apply(data)
    assert data == DATA and out is not data


@pytest.mark.parametrize("data", [[1, 2], "text", None, 42])
def test_transform_passes_non_dict_data_through(data: Any) -> None:
    """Only dict data is transformed; other data is returned as it is."""
    assert Transform.from_config(tcfg(include=["a"], set={"b": 1})).apply(data) is data


def test_identity_transform() -> None:
    """An empty transform is the identity, and a rule with one gets route.transform None."""
    assert Transform.from_config(tcfg()).is_identity
    assert Transform.from_config(None).is_identity
    assert not Transform.from_config(tcfg(exclude=["x"])).is_identity
    (route,) = RuleTable([rule("r")]).route(message())
    assert route.transform is None
    assert route.apply(DATA) is DATA


def test_rule_transform_is_compiled_into_the_route() -> None:
    """A rule's transform reaches its Route and applies to message data."""
    cfg = rule("r", transform=tcfg(exclude=["internal"], rename={"px": "price"}, set={"source": "gw"}))
    (route,) = RuleTable([cfg]).route(message())
    assert route.transform is not None
    assert route.apply(DATA) == {"price": 1.25, "sym": "EURUSD", "qty": 3, "source": "gw"}


def test_pool_transforms_apply_on_top_of_the_rule_transform() -> None:
    """A receiver's pool transform runs after the rule transform; other pools get the rule transform only."""
    cfg = rule(
        "r",
        transform=tcfg(exclude=["internal"]),
        pool_transforms={"mt5": tcfg(include=["px", "sym"], rename={"px": "price"}), "api": tcfg()},
    )
    (route,) = RuleTable([cfg]).route(message())
    assert set(route.pool_transforms) == {"mt5"}  # identity pool transforms are dropped
    assert route.apply(DATA, "mt5") == {"price": 1.25, "sym": "EURUSD"}
    assert route.apply(DATA, "frontend") == {"px": 1.25, "sym": "EURUSD", "qty": 3}
    assert route.apply(DATA) == {"px": 1.25, "sym": "EURUSD", "qty": 3}


# --------------------------------------------------------------------------- describe


def test_describe_lists_rules_in_evaluation_order_with_hits() -> None:
    """describe() gives each rule's id, priority, state, hits, filter, target and transform."""
    table = RuleTable([
        rule("alerts", priority=100, types=["system_alert"], expression="msg.priority == 'critical'",
             transform=tcfg(exclude=["internal"], rename={"px": "price"}, set={"source": "gw"}),
             pool_transforms={"mt5": tcfg(include=["price"])}),
        rule("all", priority=200, stop=True, target="group", group_id="desk-1"),
    ])
    table.set_enabled("alerts", False)
    table.route(message())
    described = table.describe()
    assert [d["id"] for d in described] == ["all", "alerts"]
    alerts = table.get("alerts")
    assert alerts == described[1]
    assert alerts == {
        "id": "alerts", "priority": 100, "enabled": False, "stop": False, "hits": 0,
        "filter": {"message_types": ["system_alert"], "channels": [], "user_ids": [], "company_ids": [],
                   "expression": "msg.priority == 'critical'"},
        "target": {"type": "broadcast", "connection_ids": [], "group_id": "", "pools": [], "company_ids": [],
                   "reliable_delivery": False, "max_retries": 0, "ack_timeout_ms": 2000},
        "transform": {"include_fields": [], "exclude_fields": ["internal"], "rename": {"px": "price"},
                      "set": {"source": "gw"}},
        "pool_transforms": {
            "mt5": {"include_fields": ["price"], "exclude_fields": [], "rename": {}, "set": {}},
        },
    }
    assert described[0]["hits"] == 1 and described[0]["stop"] is True
    assert described[0]["target"]["group_id"] == "desk-1"


def test_explain_is_the_walk_route_makes_without_counting() -> None:
    """explain() names why each rule was skipped, marks rules after a stop as not tried, counts nothing."""
    table = RuleTable([
        rule("off", priority=100, enabled=False, types=["trading_signal"]),
        rule("other-type", priority=90, types=["quote"]),
        rule("other-company", priority=80, company_ids=["globex"]),
        rule("big", priority=70, expression="msg.data.px > 10"),
        rule("first", priority=60, types=["trading_signal"]),
        rule("stopper", priority=50, channels=["trading-signals"], stop=True),
        rule("after", priority=10),
    ])
    msg = message()
    steps, routes = table.explain(msg)
    assert [(s["id"], s["result"], s["why"].split(" ")[0] if s["why"] else "") for s in steps] == [
        ("off", "skipped", "disabled"), ("other-type", "skipped", "message_types"),
        ("other-company", "skipped", "company_ids"), ("big", "skipped", "expression"),
        ("first", "matched", ""), ("stopper", "matched", ""), ("after", "not_tried", "rule")]
    assert table.hits() == {r: 0 for r in table.hits()} and table.messages_routed == 0
    assert [r.rule_id for r in routes] == [r.rule_id for r in table.route(msg)] == ["first", "stopper"]
    assert table.hits()["first"] == 1 and table.messages_routed == 1
