"""Routing rules: which receivers a published message goes to, and how its data is reshaped.

Owns ``RoutedMessage`` (a published message as routing sees it), ``Transform`` (a compiled
``transform`` table), ``Route`` (what one matching rule contributes) and ``RuleTable`` (the message
router: the compiled rules, each with its filter, targets and transform).

Everything is compiled once, when the table is built: list filters become frozensets, expressions
become ``Expression`` closures, transforms are precomputed and every rule's ``Route`` is built up
front, so ``route()`` per message is a short walk of set look-ups that allocates only its result.

A rule's filter expression that mentions only ``msg`` is part of the message-level match. One that
mentions ``conn`` cannot be decided per message: the rule matches on its other fields and the
expression travels with the route as ``conn_predicate``, which the caller applies to each receiver
(``route.conn_predicate(msg.as_mapping(), conn_mapping)``, as ``Hub._deliver_routes`` does).

Config structs (``RuleConfig``, ``FilterConfig``, ``TargetConfig``, ``TransformConfig`` from
``wsd.config``) are read by attribute only, so this module does not import them.

Pure: no asyncio, sockets, time or logging.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from wsd.core.expr import Expression, ExpressionError, compile_expression
from wsd.core.outbox import PRIORITY_NAMES  # re-exported: the priority names by number

if TYPE_CHECKING:  # only for readers and type checkers; duck typing at run time
    from wsd.config import RuleConfig, TargetConfig, TransformConfig

__all__ = ["PRIORITY_NAMES", "Route", "RoutedMessage", "RuleTable", "Transform", "priority_name"]



_PRIORITY_LOOKUP: dict[Any, str] = {
    **{name: name for name in PRIORITY_NAMES},
    **{name.upper(): name for name in PRIORITY_NAMES},
    **dict(enumerate(PRIORITY_NAMES)),
}


def priority_name(priority: Any) -> str:
    """The lower-case name of a priority given as an enum member, a name or its number."""
    kind = type(priority)
    if kind is str or kind is int:  # the common cases, without allocating
        name = _PRIORITY_LOOKUP.get(priority)
        if name is not None:
            return name
    if isinstance(priority, enum.Enum):  # by name: an enum may number its members differently
        return str(priority.name).lower()
    if isinstance(priority, str):
        return priority.lower()
    if isinstance(priority, int) and 0 <= priority < len(PRIORITY_NAMES):
        return PRIORITY_NAMES[priority]
    return str(priority).lower()


class RoutedMessage:
    """A published message as the router sees it.

    ``channel`` is the full channel instance (``trading-signals/acme``, ``notifications/acme/alice``,
    ``system-status``) or ``""``; ``group`` is its group part. ``user_id`` / ``company_id`` are the
    tenant the message belongs to; left as None they are read from the instance (user groups are
    ``group/company/user``, company groups ``group/company``), and ``""`` means none.
    """

    __slots__ = ("channel", "company_id", "data", "group", "id", "priority", "source", "ttl_s", "type",
                 "user_id")

    def __init__(
        self,
        *,
        type: str = "",
        data: Any = None,
        channel: str = "",
        group: str | None = None,
        priority: Any = "normal",
        user_id: str | None = None,
        company_id: str | None = None,
        ttl_s: float | None = None,
        source: str = "",
        id: str = "",
    ) -> None:
        parts = channel.split("/") if channel else []
        self.channel = channel
        self.group = group if group is not None else (parts[0] if parts else "")
        self.type = type
        self.priority = priority
        self.data = data
        if company_id is None:
            company_id = parts[1] if len(parts) >= 2 else ""
        if user_id is None:
            user_id = parts[2] if len(parts) >= 3 else ""
        self.user_id = user_id
        self.company_id = company_id
        self.ttl_s = ttl_s
        self.source = source
        self.id = id

    def as_mapping(self) -> dict[str, Any]:
        """What ``msg`` is inside filter expressions."""
        return {
            "type": self.type,
            "channel": self.channel,
            "group": self.group,
            "priority": priority_name(self.priority),
            "data": self.data,
            "user_id": self.user_id,
            "company_id": self.company_id,
            "source": self.source,
        }

    def __repr__(self) -> str:
        return (f"RoutedMessage(type={self.type!r}, channel={self.channel!r}, "
                f"priority={priority_name(self.priority)!r}, id={self.id!r})")


def _attr(obj: Any, name: str, default: Any) -> Any:
    """A config attribute, with a default for absent or None values (hand-built configs)."""
    value = getattr(obj, name, None)
    return default if value is None else value


class Transform:
    """A compiled ``transform`` table applied to message data.

    Only dict data is transformed; anything else passes through unchanged. The steps run in order
    include (when non-empty, keep only those top-level keys) -> exclude -> rename (all at once, so
    ``{a = "b", b = "a"}`` swaps) -> set. The input is never mutated: the result is a new dict
    (sharing nested values with the input and ``set`` values with the config).
    """

    __slots__ = ("exclude", "include", "is_identity", "rename", "set")

    def __init__(
        self,
        include_fields: Iterable[str] = (),
        exclude_fields: Iterable[str] = (),
        rename: Mapping[str, str] | None = None,
        set: Mapping[str, Any] | None = None,
    ) -> None:
        self.include: tuple[str, ...] = tuple(dict.fromkeys(include_fields))
        self.exclude: tuple[str, ...] = tuple(dict.fromkeys(exclude_fields))
        self.rename: tuple[tuple[str, str], ...] = tuple((rename or {}).items())
        self.set: dict[str, Any] = dict(set or {})
        self.is_identity = not (self.include or self.exclude or self.rename or self.set)

    @classmethod
    def from_config(cls, config: TransformConfig | None) -> Transform:
        """Compile a ``TransformConfig`` (None is the identity)."""
        if config is None:
            return cls()
        return cls(
            _attr(config, "include_fields", ()),
            _attr(config, "exclude_fields", ()),
            _attr(config, "rename", {}),
            _attr(config, "set", {}),
        )

    def apply(self, data: Any) -> Any:
        """The transformed copy of dict ``data``; other data as it is."""
        if self.is_identity or not isinstance(data, dict):
            return data
        if self.include:
            out = {k: data[k] for k in self.include if k in data}
        else:
            out = dict(data)
        for k in self.exclude:
            out.pop(k, None)
        if self.rename:
            moved = [(new, out.pop(old)) for old, new in self.rename if old in out]
            out.update(moved)
        if self.set:
            out.update(self.set)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "include_fields": list(self.include),
            "exclude_fields": list(self.exclude),
            "rename": dict(self.rename),
            "set": dict(self.set),
        }

    def __repr__(self) -> str:
        return f"Transform({self.as_dict()!r})"


class Route:
    """What one matching rule contributes: a target, how to reshape the data, and for whom.

    ``transform`` (None when the rule's transform is the identity) applies to every receiver; a
    receiver in a pool named in ``pool_transforms`` gets that pool's transform on top of it (see
    ``apply``). ``conn_predicate``, when set, must accept a receiver for it to get the message.
    """

    __slots__ = ("ack_timeout_s", "conn_predicate", "max_retries", "pool_transforms", "reliable",
                 "rule_id", "target", "transform")

    def __init__(
        self,
        rule_id: str,
        target: TargetConfig,
        transform: Transform | None = None,
        pool_transforms: dict[str, Transform] | None = None,
        conn_predicate: Expression | None = None,
    ) -> None:
        self.rule_id = rule_id
        self.target = target
        self.transform = transform
        self.pool_transforms = pool_transforms or {}
        self.conn_predicate = conn_predicate
        self.reliable = bool(_attr(target, "reliable_delivery", False))
        self.max_retries = int(_attr(target, "max_retries", 0))
        self.ack_timeout_s = float(_attr(target, "ack_timeout_ms", 0)) / 1000.0

    def apply(self, data: Any, pool: str = "") -> Any:
        """The data a receiver in ``pool`` gets: the rule's transform, then the pool's (if any).

        Call it once per pool, not once per receiver.
        """
        if self.transform is not None:
            data = self.transform.apply(data)
        if self.pool_transforms:
            pool_transform = self.pool_transforms.get(pool)
            if pool_transform is not None:
                data = pool_transform.apply(data)
        return data

    def __repr__(self) -> str:
        return f"Route(rule_id={self.rule_id!r}, target={_attr(self.target, 'type', '?')!r})"


def _members(values: Any) -> frozenset[str] | None:
    """A list filter as a frozenset; None for an empty list ("any")."""
    members = frozenset(values or ())
    return members or None


class _Rule:
    """One compiled rule: the precomputed filter, its prebuilt Route and its counters."""

    __slots__ = ("channels", "company_ids", "config", "enabled", "hits", "id", "msg_predicate",
                 "msg_predicate_reads_msg", "priority", "route", "stop", "transform", "types", "user_ids")

    def __init__(self, config: RuleConfig) -> None:
        self.config = config
        self.id = str(config.id)
        self.priority = int(_attr(config, "priority", 0))
        enabled = getattr(config, "enabled", True)
        self.enabled = True if enabled is None else bool(enabled)
        self.stop = bool(_attr(config, "stop", False))
        self.hits = 0
        flt = getattr(config, "filter", None)
        self.types = _members(_attr(flt, "message_types", ()))
        self.channels = _members(_attr(flt, "channels", ()))
        self.user_ids = _members(_attr(flt, "user_ids", ()))
        self.company_ids = _members(_attr(flt, "company_ids", ()))
        source = _attr(flt, "expression", "")
        expression: Expression | None = None
        if source.strip():
            try:
                expression = compile_expression(source)
            except ExpressionError as e:
                message = f"rule {self.id!r} filter.expression: {e.message}"
                raise ExpressionError(message, e.position) from None
        conn_predicate = expression if expression is not None and expression.uses_conn else None
        self.msg_predicate = expression if conn_predicate is None else None
        self.msg_predicate_reads_msg = expression is not None and expression.uses_msg
        self.transform = Transform.from_config(getattr(config, "transform", None))
        pool_transforms = {
            str(pool): Transform.from_config(cfg)
            for pool, cfg in _attr(config, "pool_transforms", {}).items()
        }
        self.route = Route(
            self.id,
            config.target,
            None if self.transform.is_identity else self.transform,
            {pool: t for pool, t in pool_transforms.items() if not t.is_identity},
            conn_predicate,
        )

    def miss(self, msg: RoutedMessage, mapping: dict[str, Any] | None) -> str | None:
        """Why this rule does not match ``msg`` (the filter field that failed), or None when it matches.

        The one definition of a match: ``RuleTable.route`` (delivery) and ``RuleTable.explain``
        (``wsctl rules test``) both call it. ``mapping`` is ``msg.as_mapping()`` when some rule's
        expression reads ``msg`` (built once per message by the caller), else None.
        """
        if not self.enabled:
            return "disabled"
        if self.types is not None and msg.type not in self.types:
            return "message_types"
        channels = self.channels
        if channels is not None and msg.channel not in channels and msg.group not in channels:
            return "channels"
        if self.user_ids is not None and msg.user_id not in self.user_ids:
            return "user_ids"
        if self.company_ids is not None and msg.company_id not in self.company_ids:
            return "company_ids"
        if self.msg_predicate is not None and not self.msg_predicate(mapping, None):
            return "expression"
        return None

    def describe(self) -> dict[str, Any]:
        flt = getattr(self.config, "filter", None)
        target = self.config.target
        return {
            "id": self.id,
            "priority": self.priority,
            "enabled": self.enabled,
            "stop": self.stop,
            "hits": self.hits,
            "filter": {
                "message_types": list(_attr(flt, "message_types", ())),
                "channels": list(_attr(flt, "channels", ())),
                "user_ids": list(_attr(flt, "user_ids", ())),
                "company_ids": list(_attr(flt, "company_ids", ())),
                "expression": _attr(flt, "expression", ""),
            },
            "target": {
                "type": _attr(target, "type", ""),
                "connection_ids": list(_attr(target, "connection_ids", ())),
                "group_id": _attr(target, "group_id", ""),
                "pools": list(_attr(target, "pools", ())),
                "company_ids": list(_attr(target, "company_ids", ())),
                "reliable_delivery": self.route.reliable,
                "max_retries": self.route.max_retries,
                "ack_timeout_ms": _attr(target, "ack_timeout_ms", 0),
            },
            "transform": self.transform.as_dict(),
            "pool_transforms": {pool: t.as_dict() for pool, t in self.route.pool_transforms.items()},
        }


class RuleTable:
    """The routing rules, compiled; ``route()`` decides which rules a message goes through.

    Counters: ``messages_routed`` (at least one rule matched), ``messages_unrouted`` (none did; the
    caller then delivers to the channel's subscribers) and per-rule hits (``hits()``).
    """

    __slots__ = ("_beyond", "_by_id", "_reads_msg", "_rules", "messages_routed", "messages_unrouted")

    def __init__(self, rules: Iterable[RuleConfig] = ()) -> None:
        compiled = [_Rule(config) for config in rules]
        by_id: dict[str, _Rule] = {}
        for rule in compiled:
            if rule.id in by_id:
                raise ValueError(f"duplicate routing rule id {rule.id!r}")
            by_id[rule.id] = rule
        # sorted() is stable: equal priorities keep their config order
        self._rules: tuple[_Rule, ...] = tuple(sorted(compiled, key=lambda r: -r.priority))
        self._by_id = by_id
        self._reads_msg = any(rule.msg_predicate_reads_msg for rule in compiled)
        # Rules whose target may reach connections that are not subscribers of the message's channel.
        self._beyond = tuple(r for r in self._rules if _attr(r.config.target, "type", "") != "channel")
        self.messages_routed = 0
        self.messages_unrouted = 0

    def __len__(self) -> int:
        return len(self._rules)

    def route(self, msg: RoutedMessage) -> list[Route]:
        """The routes of every matching enabled rule, highest priority first; [] if none matched."""
        routes: list[Route] = []
        mapping = msg.as_mapping() if self._reads_msg else None
        for rule in self._rules:
            if rule.miss(msg, mapping) is not None:
                continue
            rule.hits += 1
            routes.append(rule.route)
            if rule.stop:
                break
        if routes:
            self.messages_routed += 1
        else:
            self.messages_unrouted += 1
        return routes

    def may_reach_beyond(self, msg: Any) -> bool:
        """Whether a rule may send ``msg`` (a publication or a RoutedMessage: its type, channel, group, user_id,
        company_id) to connections that do not subscribe to its channel: one whose target is not ``channel`` and
        whose filter lists match. Enabled or not (rules are switched per node), and without its expression (it may
        match): a shared engine then carries ``msg`` to every node."""
        for rule in self._beyond:
            if rule.types is not None and msg.type not in rule.types:
                continue
            channels = rule.channels
            if channels is not None and msg.channel not in channels and msg.group not in channels:
                continue
            if rule.user_ids is not None and msg.user_id not in rule.user_ids:
                continue
            if rule.company_ids is not None and msg.company_id not in rule.company_ids:
                continue
            return True
        return False

    def matching(self, msg: RoutedMessage) -> list[Route]:
        """The routes ``route()`` would return for ``msg``, without counting anything (history reads)."""
        routes: list[Route] = []
        mapping = msg.as_mapping() if self._reads_msg else None
        for rule in self._rules:
            if rule.miss(msg, mapping) is not None:
                continue
            routes.append(rule.route)
            if rule.stop:
                break
        return routes

    def explain(self, msg: RoutedMessage) -> tuple[list[dict[str, Any]], list[Route]]:
        """The walk ``route()`` would make for ``msg``, without counting it: a dry run.

        Returns one step per rule in evaluation order — ``{"id", "priority", "stop", "result", "why"}``
        where ``result`` is ``matched``, ``skipped`` (``why`` names the filter field that failed, or
        ``disabled``) or ``not_tried`` (a ``stop`` rule above matched) — and the routes ``route()``
        would return. Built on ``_Rule.miss``, the same test ``route()`` uses.
        """
        steps: list[dict[str, Any]] = []
        routes: list[Route] = []
        mapping = msg.as_mapping() if self._reads_msg else None
        stopped_by = ""
        for rule in self._rules:
            step = {"id": rule.id, "priority": rule.priority, "stop": rule.stop, "result": "not_tried",
                    "why": f"rule {stopped_by!r} matched with stop = true" if stopped_by else ""}
            steps.append(step)
            if stopped_by:
                continue
            why = rule.miss(msg, mapping)
            if why is not None:
                step["result"], step["why"] = "skipped", why
                continue
            step["result"] = "matched"
            routes.append(rule.route)
            if rule.stop:
                stopped_by = rule.id
        return steps, routes

    def set_enabled(self, rule_id: str, enabled: bool) -> None:
        """Enable or disable a rule at run time; KeyError for an unknown id."""
        self._by_id[rule_id].enabled = bool(enabled)

    def describe(self) -> list[dict[str, Any]]:
        """Every rule, in evaluation order (priority, then config order), with its hit count."""
        return [rule.describe() for rule in self._rules]

    def get(self, rule_id: str) -> dict[str, Any]:
        """One rule as in ``describe()``; KeyError for an unknown id."""
        return self._by_id[rule_id].describe()

    def hits(self) -> dict[str, int]:
        """Hit count per rule id."""
        return {rule.id: rule.hits for rule in self._rules}

    def metrics(self) -> dict[str, Any]:
        """The routing metrics: messages routed / unrouted and per-rule hits."""
        return {
            "messages_routed": self.messages_routed,
            "messages_unrouted": self.messages_unrouted,
            "rule_hits": self.hits(),
        }
