"""Human views of control-socket results: rich tables that fit 80 columns, in human units.

Pure functions of the data: each ``render_*`` takes a method's ``result`` and returns a rich
renderable (or a string), so views can be tested without a daemon and reused by the TUI.
Units come from ``wsctl.fmt`` (shared with ``wsctl top``): ``1.2k msg/s``, ``54.0 MiB``, ``3m12s``.
Every cell is a ``rich.text.Text`` made with ``fmt.plain``: text that came from clients (types, ids,
claims, reasons) is drawn literally with control characters escaped, never as markup. Connection ids
are shown as their first 8 characters (every command that takes an id accepts such a prefix).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from wsctl import fmt

ID_WIDTH = 8

#: subscription modes (their wire names) as words
MODE_WORDS = {"on_demand": "on demand"}


# ------------------------------------------------------------------------------------------------ units
# one set of formatters for every view and the dashboard (wsctl.fmt)

fmt_count = fmt.count
fmt_rate = fmt.rate
fmt_bytes = fmt.size
fmt_duration = fmt.duration
fmt_ms = fmt.ms
fmt_pct = fmt.percent
fmt_time = fmt.local_time
compact_json = fmt.compact_json
plain = fmt.plain


def short_id(cid: str | None, n: int = ID_WIDTH) -> str:
    return plain((cid or "")[:n])


def clip(text: Any, n: int) -> str:
    """Outside text made inert (``fmt.plain``) and cut to ``n`` characters with an ellipsis."""
    s = plain(text if text is not None else "")
    return s if len(s) <= n else s[: max(0, n - 1)] + "…"


safe = plain  # outside text for a terminal: control and bidi characters shown as escapes


def _join(items: Iterable[Any]) -> str:
    out = ",".join(plain(x) for x in items)
    return out or "-"


# ------------------------------------------------------------------------------------------------ tables


class PlainTable(Table):
    """A table whose string cells are drawn as literal text (``fmt.plain``), never parsed as markup."""

    def add_row(self, *renderables: RenderableType | None, **kw: Any) -> None:
        cells = [fmt.text(c) if isinstance(c, str) else c for c in renderables]
        super().add_row(*cells, **kw)


def table(*columns: str, title: str | None = None, right: Iterable[str] = ()) -> Table:
    """A borderless table whose rows never wrap: long cells end in an ellipsis instead."""
    # two spaces between columns (one box divider + one padding): widths below are budgeted for 80 columns
    t = PlainTable(
        box=box.SIMPLE_HEAD,
        title=title,
        title_justify="left",
        pad_edge=False,
        show_edge=False,
        expand=False,
        padding=(0, 1, 0, 0),
        title_style="bold",
    )
    rset = set(right)
    for c in columns:
        t.add_column(c, no_wrap=True, overflow="ellipsis", justify="right" if c in rset else "left")
    return t


def kv(rows: Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    """Two columns: a label and a value."""
    t = PlainTable.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    if title:
        t.title = title
        t.title_justify = "left"
        t.title_style = "bold underline"
    for k, v in rows:
        cell = v if isinstance(v, Text) else fmt.text(v if isinstance(v, str) else fmt.words(v))
        t.add_row(Text(k), cell)
    return t


def _by(d: dict[str, Any]) -> str:
    return "  ".join(f"{plain(k)} {fmt.words(v)}" for k, v in d.items()) or "-"


# ------------------------------------------------------------------------------------------------ views


def clustered(r: dict[str, Any]) -> bool:
    """The reply covers more than one node (rows then show a NODE column)."""
    return len(set(r.get("nodes") or ()) | set(r.get("missing") or ())) > 1


def cluster_warning(r: dict[str, Any]) -> str | None:
    """One line naming the nodes that did not answer in time, or answered with an error; None when all did."""
    parts = []
    missing = r.get("missing") or []
    if missing:
        parts.append(f"no answer from node{'s' if len(missing) != 1 else ''} {', '.join(plain(str(n)) for n in missing)} "
                     "within the deadline: their part is missing")
    for f in r.get("failed") or []:
        if isinstance(f, dict):
            parts.append(f"node {plain(str(f.get('node')))} failed: {plain(str(f.get('message', '')))}")
    return "; ".join(parts) or None


def render_status(r: dict[str, Any]) -> RenderableType:
    listen = r.get("listen") or {}
    scheme = "wss" if listen.get("tls") else "ws"
    eng = r.get("engine") or {}
    lat = r.get("latency") or {}
    rows: list[tuple[str, Any]] = [
        ("manager", f"{r.get('manager_id', '')}  (wsd {r.get('version', '?')})"),
        ("uptime", fmt_duration(r.get("uptime_s"))),
        ("listen", f"{scheme}://{listen.get('host', '?')}:{listen.get('port', '?')}"),
        ("engine", eng.get("engine", "?") if isinstance(eng, dict) else str(eng)),
        ("nodes", ", ".join(str(n) for n in r.get("nodes") or ())),
        (
            "connections",
            f"{r.get('connections', 0)} / {r.get('max_connections', '?')}"
            + ("  (draining)" if r.get("draining") else ""),
        ),
        ("  by pool", _by(r.get("by_pool") or {})),
        ("  by state", _by(r.get("by_state") or {})),
        (
            "messages",
            f"in {fmt_rate(r.get('rate_in'))}  out {fmt_rate(r.get('rate_out'))}  "
            f"published {fmt_rate(r.get('rate_publish'))}",
        ),
        ("latency", f"p50 {fmt_ms(lat.get('p50_ms'))}  p99 {fmt_ms(lat.get('p99_ms'))}"),
        (
            "process",
            (f"pid {r['pid']}  " if r.get("pid") else "")
            + f"RSS {fmt_bytes(r.get('rss_bytes'))}  CPU {fmt.cpu(r.get('cpu_percent'))}",
        ),
        ("config", (r.get("config_path") or "built-in defaults") + f"  (reloads: {r.get('reloads', 0)})"),
        ("socket", r.get("socket", "")),
    ]
    per_node = r.get("node_stats") or []
    if len(per_node) > 1 or r.get("missing"):
        node_rows: list[tuple[str, Any]] = [("  this node", plain(str(r.get("node", ""))))]
        for ns in per_node:
            nl = ns.get("latency") or {}
            node_rows.append((f"  {clip(str(ns.get('node', '')), 10)}",
                              f"conns {ns.get('connections', 0)}/{ns.get('max_connections', '?')}  "
                              f"in {fmt_rate(ns.get('rate_in'))}  out {fmt_rate(ns.get('rate_out'))}  "
                              f"p99 {fmt_ms(nl.get('p99_ms'))}  CPU {fmt.cpu(ns.get('cpu_percent'))}  "
                              f"RSS {fmt_bytes(ns.get('rss_bytes'))}" + ("  draining" if ns.get("draining") else "")))
        for n in r.get("missing") or []:
            node_rows.append((f"  {clip(str(n), 10)}", Text("no answer (missing)", style="yellow")))
        rows[5:5] = node_rows
    if r.get("ephemeral_secret"):
        rows.append(
            (
                "auth",
                Text("ephemeral secret: tokens from `wsctl token` die with this process", style="yellow"),
            )
        )
    return kv(rows)


def render_pools(r: dict[str, Any]) -> RenderableType:
    # CONNS is open / ceiling (max_connections); RSV the pool's reservation (min_connections)
    t = table(
        "POOL",
        "TYPE",
        "PATH",
        "RSV",
        "CONNS",
        "IN",
        "OUT",
        "DROPS",
        "ERR%",
        right=("RSV", "CONNS", "IN", "OUT", "DROPS", "ERR%"),
    )
    for p in r.get("pools", []):
        t.add_row(
            clip(p.get("id", ""), 10),
            clip(p.get("type", ""), 10),
            clip(p.get("path", ""), 14),
            fmt_count(p.get("min_connections")) if p.get("min_connections") else "-",
            f"{fmt_count(p.get('connections'))}/{fmt_count(p.get('max_connections'))}",
            fmt_count(p.get("msgs_in")),
            fmt_count(p.get("msgs_out")),
            fmt_count(p.get("drops")),
            fmt_pct(p.get("error_rate")),
        )
    cap = r.get("capacity")
    if not isinstance(cap, dict):  # an older daemon
        return t
    return Group(t, Text(capacity_line(cap), style="dim"))


def capacity_line(cap: dict[str, Any]) -> str:
    """The shared capacity in one line: free of shared, and what the limit and the reservations are."""
    return (f"shared free {fmt_count(cap.get('shared_free'))} of {fmt_count(cap.get('shared'))} "
            f"(manager limit {fmt_count(cap.get('max_connections'))}, "
            f"reserved {fmt_count(cap.get('reserved'))}, open {fmt_count(cap.get('connections'))})")


def render_connections(r: dict[str, Any], filtered: bool = False) -> RenderableType:
    # latency, bytes and breaker state are in `wsctl connection ID` and --json; --sort works on them
    multi = clustered(r)
    t = table(
        *(("NODE",) if multi else ()),
        "ID", "POOL", "USER", "COMPANY", "STATE", "AGE", "IN", "OUT", "Q", right=("AGE", "IN", "OUT", "Q")
    )
    items = r.get("items", [])
    for c in items:
        t.add_row(
            *((clip(str(c.get("node", "")), 8),) if multi else ()),
            short_id(c.get("id")),
            clip(c.get("pool", ""), 8),
            clip(c.get("user_id", ""), 9),
            clip(c.get("company_id", "") or "-", 9),
            clip(c.get("state", ""), 10),
            fmt_duration(c.get("age_s")),
            fmt_count(c.get("msgs_in")),
            fmt_count(c.get("msgs_out")),
            fmt_count(_depth(c.get("queue"))),
        )
    total = r.get("total", len(items))
    if not total:
        return Text("no connections match" if filtered else "no connections", style="dim")
    shown = len(items)
    foot = f"{total} connection{'s' if total != 1 else ''}"
    if shown < total:
        foot = f"showing {shown} of {total} connections (use --limit)"
    return Group(t, Text(foot, style="dim"))


def _depth(q: Any) -> Any:
    """A row's queue depth: ``queue`` is ``{"depth", ...}`` (older daemons sent the number)."""
    return q.get("depth") if isinstance(q, dict) else q


_TIME_CLAIMS = ("iat", "nbf", "auth_time")


def _other_claims(claims: dict[str, Any]) -> list[tuple[str, Any]]:
    """The token's other claims, one row each (times as local times); its text is the client's, escaped."""
    if not claims:
        return [("other claims", "-")]
    rows: list[tuple[str, Any]] = []
    for k, v in sorted(claims.items()):
        is_time = k in _TIME_CLAIMS and isinstance(v, (int, float)) and not isinstance(v, bool)
        rows.append((clip(k, 12), fmt_time(v) if is_time else fmt.words(v)))
    return rows


def render_connection(r: dict[str, Any]) -> RenderableType:
    info = r.get("info") or {}
    auth = r.get("auth") or {}
    q = r.get("queue") or {}
    br = r.get("breaker") or {}
    health = r.get("health") or {}
    m = r.get("metrics") or {}
    main = kv(
        [
            ("id", r.get("id", "")),
            ("pool", f"{r.get('pool', '')} ({r.get('pool_type', '')})"),
            ("state", r.get("state", "")),
            ("remote", info.get("remote_address", r.get("remote_address", ""))),
            ("user agent", info.get("user_agent", "") or "-"),
            ("session", info.get("session_id", "") + ("  (resumed)" if info.get("resumed") else "")),
            ("connected", f"{fmt_time(info.get('created_at'))}  ({fmt_duration(r.get('age_s'))} ago)"),
            ("subprotocol", info.get("subprotocol") or "-"),
            ("token from", info.get("token_source") or "-"),
        ],
        title="connection",
    )
    claims = kv(
        [
            ("user", auth.get("user_id", "")),
            ("company", auth.get("company_id", "") or "-"),
            ("roles", _join(auth.get("roles") or [])),
            ("pool claim", auth.get("pool") or "-"),
            ("expires", fmt_time(auth.get("exp") or r.get("exp"))),
            *_other_claims(auth.get("claims") or {}),
        ],
        title="auth claims",
    )
    bp = q.get("by_priority") or {}
    queue = kv(
        [
            (
                "queue",
                f"{q.get('depth', 0)} / {q.get('capacity', '?')}  "
                + "  ".join(f"{k} {v}" for k, v in bp.items()),
            ),
            ("dropped", f"overflow {q.get('dropped_overflow', 0)}  expired {q.get('dropped_expired', 0)}"),
            (
                "breaker",
                f"{br.get('state', '?')}  failures {br.get('failures', 0)}  "
                f"opened {br.get('opened_count', 0)}x",
            ),
            (
                "messages",
                f"in {fmt_count(m.get('messages_received'))} ({fmt_bytes(m.get('bytes_received'))})  "
                f"out {fmt_count(m.get('messages_sent'))} ({fmt_bytes(m.get('bytes_sent'))})",
            ),
            ("latency", fmt_ms(health.get("latency_ms"))),
            ("throughput", fmt_rate(health.get("throughput_msgs_s"))),
            ("error rate", fmt_pct(health.get("error_rate"))),
            ("pings missed", m.get("pings_missed", 0)),
        ],
        title="delivery",
    )
    parts: list[RenderableType] = [main, Text(""), claims, Text(""), queue]
    rel = r.get("reliable")
    if rel:
        parts += [
            Text(""),
            kv(
                [
                    ("next seq", rel.get("next_seq")),
                    ("unacked", rel.get("unacked")),
                    ("resent", rel.get("resent")),
                    ("given up", rel.get("given_up")),
                ],
                title="reliable delivery",
            ),
        ]
    subs = r.get("subscriptions") or []
    parts += [Text(""), render_subscription_rows(subs, with_conn=False, title="subscriptions")]
    events = r.get("events") or []
    if events:
        parts += [Text(""), Text("recent events", style="bold underline")]
        parts += [Text(event_line(e), no_wrap=True, overflow="ellipsis") for e in events[-10:]]
    return Group(*parts)


def render_subscription_rows(
    items: list[dict[str, Any]], with_conn: bool = True, title: str | None = None, with_node: bool = False
) -> RenderableType:
    cols = (["NODE"] if with_node else []) + (["CONN", "USER"] if with_conn else []) + [
        "CHANNEL", "MODE", "TYPES", "OFFSET"]
    t = table(*cols, title=title, right=("OFFSET",))
    for s in items:
        pos = s.get("position") or {}
        row = [clip(str(s.get("node", "")), 8)] if with_node else []
        row += [short_id(s.get("connection_id")), clip(s.get("user_id", ""), 10)] if with_conn else []
        row += [
            clip(s.get("channel", ""), 25 if with_conn else 40),
            MODE_WORDS.get(s.get("mode", ""), s.get("mode", "")),
            clip(_join(s.get("types") or []) if s.get("types") else "all", 10),
            str(pos.get("offset", "-")),
        ]
        t.add_row(*row)
    return t


def render_subscriptions(r: dict[str, Any]) -> RenderableType:
    items = r.get("items", [])
    total = r.get("total", len(items))
    if not total:
        return Text("no subscriptions", style="dim")
    by = {MODE_WORDS.get(k, k): v for k, v in (r.get("by_mode") or {}).items()}
    foot = f"{total} subscription{'s' if total != 1 else ''}" + (f"  ({_by(by)})" if by else "")
    if len(items) < total:
        foot += f"; showing {len(items)}"
    return Group(render_subscription_rows(items, with_node=clustered(r)), Text(foot, style="dim"))


def render_channels(r: dict[str, Any]) -> RenderableType:
    g = table(
        "GROUP",
        "TYPE",
        "INSTANCES",
        "SUBS",
        "HISTORY",
        "PUBLISHERS",
        title="channel groups",
        right=("INSTANCES", "SUBS", "HISTORY"),
    )
    for x in r.get("groups", []):
        g.add_row(
            clip(x.get("group_id", ""), 20),
            x.get("type", ""),
            fmt_count(x.get("instances")),
            fmt_count(x.get("subscribers")),
            f"{x.get('history_size', 0)}/{fmt_duration(x.get('history_ttl_s'))}",
            clip(_join(x.get("publishers") or []), 18),
        )
    inst = table(
        "CHANNEL",
        "SUBS",
        "USERS",
        "HISTORY",
        "OFFSET",
        "EPOCH",
        title="instances",
        right=("SUBS", "USERS", "HISTORY", "OFFSET"),
    )
    for x in r.get("instances", []):
        inst.add_row(
            clip(x.get("channel", ""), 36),
            fmt_count(x.get("subscribers")),
            fmt_count(x.get("users")),
            fmt_count(x.get("history_depth")),
            str(x.get("offset", 0)),
            x.get("epoch") or "-",
        )
    parts: list[RenderableType] = [g, Text("")]
    parts.append(inst if r.get("instances") else Text("no channel instances yet", style="dim"))
    return Group(*parts)


def render_history(r: dict[str, Any]) -> RenderableType:
    pos = r.get("position") or {}
    t = table("OFFSET", "TIME", "TYPE", "PRIO", "DATA", right=("OFFSET",))
    msgs = r.get("messages", [])
    for m in msgs:
        t.add_row(
            str(m.get("offset")),
            fmt_time(m.get("ts"), with_date=False),
            clip(m.get("type", ""), 14),
            m.get("priority", ""),
            clip(compact_json(m.get("data")), 32),
        )
    head = Text(
        f"{r.get('channel', '')}  offset {pos.get('offset', 0)}  epoch {pos.get('epoch') or '-'}  "
        f"({len(msgs)} message{'s' if len(msgs) != 1 else ''})",
        style="bold",
    )
    return Group(head, t)


def render_metrics(r: dict[str, Any]) -> RenderableType:
    m = r.get("manager") or {}
    lat = m.get("latency") or {}
    mgr = kv(
        [
            (
                "connections",
                f"{m.get('connections', 0)} / {m.get('max_connections', '?')}  "
                f"(total since start {fmt_count(m.get('connections_total'))})",
            ),
            (
                "messages",
                f"published {fmt_count(m.get('published'))}  delivered {fmt_count(m.get('delivered'))}  "
                f"received {fmt_count(m.get('received'))}  batches {fmt_count(m.get('batches'))}",
            ),
            (
                "rates",
                f"in {fmt_rate(m.get('rate_in'))}  out {fmt_rate(m.get('rate_out'))}  "
                f"published {fmt_rate(m.get('rate_publish'))}",
            ),
            ("latency", f"p50 {fmt_ms(lat.get('p50_ms'))}  p99 {fmt_ms(lat.get('p99_ms'))}"),
            (
                "memory",
                f"RSS {fmt_bytes(m.get('rss_bytes'))}  "
                f"({fmt_bytes(m.get('rss_per_connection_bytes'))}/connection)  "
                f"CPU {fmt.cpu(m.get('cpu_percent'))}",
            ),
            ("refused", _by(m.get("refused") or {})),
            ("closed by code", _by(m.get("closed_by_code") or {})),
        ],
        title="manager",
    )
    pools = table(
        "POOL",
        "TYPE",
        "CONNS",
        "SENT",
        "RECV",
        "BYTES OUT",
        "DROPS",
        "BRK",
        "ERR%",
        title="pools",
        right=("CONNS", "SENT", "RECV", "BYTES OUT", "DROPS", "BRK", "ERR%"),
    )
    for pid, p in (r.get("pools") or {}).items():
        pools.add_row(
            clip(pid, 12),
            p.get("type", ""),
            f"{p.get('connections', 0)}",
            fmt_count(p.get("messages_sent")),
            fmt_count(p.get("messages_received")),
            fmt_bytes(p.get("bytes_sent")),
            fmt_count(p.get("drops")),
            str(p.get("breakers_open", 0)),
            fmt_pct(p.get("error_rate")),
        )
    ro = r.get("routing") or {}
    routing = kv(
        [
            ("routed", fmt_count(ro.get("messages_routed"))),
            ("unrouted", fmt_count(ro.get("messages_unrouted"))),
            ("rule hits", _by(ro.get("rule_hits") or {})),
        ],
        title="routing",
    )
    s = r.get("subscriptions") or {}
    subs = kv(
        [
            ("total", f"{s.get('total', 0)} on {s.get('channels', 0)} channels"),
            ("by mode", _by({MODE_WORDS.get(k, k): v for k, v in (s.get("by_mode") or {}).items()})),
            (
                "subscribes",
                f"{fmt_count(s.get('subscribes'))}  unsubscribes {fmt_count(s.get('unsubscribes'))}",
            ),
        ],
        title="subscriptions",
    )
    q = r.get("queues") or {}
    queues = kv(
        [
            ("queued", f"{fmt_count(q.get('queued'))}  (congested connections {q.get('congested', 0)})"),
            (
                "dropped",
                f"overflow {fmt_count(q.get('dropped_overflow'))}  "
                f"expired {fmt_count(q.get('dropped_expired'))}  "
                f"on close {fmt_count(q.get('dropped_on_close'))}",
            ),
            ("slow consumers", fmt_count(q.get("slow_consumers"))),
            (
                "reliable",
                f"resent {fmt_count(q.get('reliable_resent'))}  "
                f"given up {fmt_count(q.get('reliable_given_up'))}",
            ),
        ],
        title="queues",
    )
    h = r.get("memory") or {}
    lk = h.get("limiter_keys") or {}
    held = kv(
        [
            (
                "sessions",
                f"{fmt_count(h.get('sessions'))} ({fmt_bytes(h.get('session_bytes'))})  "
                f"evicted {fmt_count(h.get('sessions_evicted'))}  expired {fmt_count(h.get('sessions_expired'))}  "
                f"too large {fmt_count(h.get('sessions_refused'))}",
            ),
            (
                "channel history",
                f"{fmt_count(h.get('channels'))} instances  evicted {fmt_count(h.get('channels_evicted'))}  "
                f"expired {fmt_count(h.get('channels_expired'))}",
            ),
            ("limiter keys", f"ip {fmt_count(lk.get('ip'))}  user {fmt_count(lk.get('user'))}"),
        ],
        title="held",
    )
    parts = [mgr, Text(""), pools, Text(""), routing, Text(""), subs, Text(""), queues, Text(""), held]
    b = r.get("bus") or {}
    if b:  # a shared engine: what this node received from its bus
        parts += [Text(""), kv(
            [
                (
                    "messages",
                    f"channel buses {fmt_count(b.get('messages_channel'))}  "
                    f"shared {fmt_count(b.get('messages_shared'))}",
                ),
                (
                    "channel buses",
                    f"{fmt_count(b.get('channels'))} subscribed  subscribes {fmt_count(b.get('subscribes'))}  "
                    f"unsubscribes {fmt_count(b.get('unsubscribes'))}",
                ),
                ("holes", f"fills {fmt_count(b.get('fills'))}  gaps {fmt_count(b.get('gaps'))}"),
            ],
            title="bus",
        )]
    return Group(*parts)


def _rule_filter(rule: dict[str, Any], with_expression: bool = True) -> str:
    f = rule.get("filter") or {}
    parts = []
    for key, label in (
        ("message_types", "types"),
        ("channels", "channels"),
        ("user_ids", "users"),
        ("company_ids", "companies"),
    ):
        if f.get(key):
            parts.append(f"{label}={_join(f[key])}")
    if with_expression and f.get("expression"):
        parts.append(f"expr={f['expression']}")
    return " ".join(parts) or "any"


def _rule_target(rule: dict[str, Any]) -> str:
    t = rule.get("target") or {}
    kind = t.get("type", "?")
    extra = ""
    if t.get("group_id"):
        extra = f":{t['group_id']}"
    elif t.get("connection_ids"):
        extra = f":{len(t['connection_ids'])} conns"
    if t.get("reliable_delivery"):
        extra += " reliable"
    return kind + extra


def render_rules(r: dict[str, Any]) -> RenderableType:
    t = table("ID", "PRIO", "ON", "STOP", "HITS", "FILTER", "TARGET", right=("PRIO", "HITS"))
    rules = r.get("rules", [])
    for rule in rules:
        t.add_row(
            clip(rule.get("id", ""), 16),
            str(rule.get("priority", 0)),
            "yes" if rule.get("enabled") else "no",
            "yes" if rule.get("stop") else "",
            fmt_count(rule.get("hits")),
            clip(_rule_filter(rule), 20),
            clip(_rule_target(rule), 14),
        )
    m = r.get("metrics") or {}
    foot = (
        f"{len(rules)} rule{'s' if len(rules) != 1 else ''}; routed {fmt_count(m.get('messages_routed'))}, "
        f"unrouted {fmt_count(m.get('messages_unrouted'))}"
    )
    if not rules:
        foot = "no routing rules: messages go to their channel's subscribers"
    return Group(t, Text(foot, style="dim")) if rules else Text(foot, style="dim")


def render_rule(rule: dict[str, Any]) -> RenderableType:
    f = rule.get("filter") or {}
    t = rule.get("target") or {}
    rows: list[tuple[str, Any]] = [
        ("id", rule.get("id", "")),
        ("priority", rule.get("priority", 0)),
        ("enabled", "yes" if rule.get("enabled") else "no"),
        ("stop", "yes" if rule.get("stop") else "no"),
        ("hits", rule.get("hits", 0)),
        ("filter", _rule_filter(rule, with_expression=False)),
    ]
    if f.get("expression"):
        rows.append(("expression", f["expression"]))
    rows += [("target", _rule_target(rule))]
    for k in ("pools", "company_ids", "connection_ids"):
        if t.get(k):
            rows.append((f"  {k}", _join(t[k])))
    if t.get("reliable_delivery"):
        rows.append(
            (
                "  reliable",
                f"max_retries {t.get('max_retries', 0)}  ack_timeout {t.get('ack_timeout_ms', 0)} ms",
            )
        )
    tr = {k: v for k, v in (rule.get("transform") or {}).items() if v}
    if tr:
        rows.append(("transform", compact_json(tr)))
    return kv(rows)


def _value(v: Any) -> str:
    if isinstance(v, str):
        v = plain(v)
        return v if v and not any(ch.isspace() for ch in v) else json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(plain(x) for x in v) or "none"
    if isinstance(v, dict):
        return plain(compact_json(v))
    if v is None:
        return "-"
    return plain(v)


def event_line(ev: dict[str, Any]) -> str:
    """One event as one line: ``TIME KIND key=value ...`` (values with spaces are quoted).

    Every key and value is inert text (``fmt.plain``): what a client sent cannot reach the terminal raw.
    """
    fields = " ".join(f"{plain(k)}={_value(v)}" for k, v in ev.items() if k not in ("seq", "ts", "event"))
    return f"{fmt_time(ev.get('ts'))} {plain(ev.get('event', '?')):<14} {fields}".rstrip()

# ------------------------------------------------------------------------------- rules test, publish --trace


def render_rules_test(r: dict[str, Any]) -> RenderableType:
    """``wsctl rules test``: the message, the rule walk, and what each target reaches per pool."""
    m = r.get("message") or {}
    tenant = "/".join(x for x in (m.get("company_id"), m.get("user_id")) if x) or "-"
    head = Text(safe(f"message {m.get('channel') or '-'}  type {m.get('type')}  priority {m.get('priority')}  "
                     f"tenant {tenant}"))
    parts: list[RenderableType] = [head]
    schema = r.get("data_schema")
    if isinstance(schema, dict):
        parts.append(Text(safe(f"data_schema: refused at {schema.get('path')}: {schema.get('reason')} "
                               "(a real publish gets invalid_data)")))
    elif schema == "valid":
        parts.append(Text("data_schema: valid"))
    steps = r.get("rules") or []
    if steps:
        t = table("#", "RULE", "PRIO", "RESULT", "WHY", title="rules, in evaluation order", right=("#", "PRIO"))
        for i, s in enumerate(steps, 1):
            result = s.get("result", "")
            why = s.get("why", "")
            if result == "matched" and s.get("stop"):
                why = "stop = true: the walk ends here"
            elif result == "skipped":
                why = why if why == "disabled" else f"filter.{why} does not match"
            t.add_row(Text(str(i)), Text(clip(safe(s.get("id", "")), 24)), Text(str(s.get("priority", 0))),
                      Text(safe(result.replace("_", " "))), Text(safe(why)))
        parts.append(t)
    if not r.get("routed"):
        ch = r.get("channel") or {}
        n = ch.get("connections", 0)
        line = (f"{'no rule matched' if steps else 'no routing rules'}: the message goes to the {n} "
                f"subscriber{'s' if n != 1 else ''} of {plain(ch.get('channel') or '-')}")
        if ch.get("filtered_by_type"):
            line += f" ({ch['filtered_by_type']} more filter this type out)"
        parts.append(Text(safe(line)))
        by_pool = ch.get("by_pool") or {}
        if by_pool:
            t = table("POOL", "CONNS", "DATA", right=("CONNS",))
            for pid, v in by_pool.items():
                t.add_row(Text(safe(pid)), Text(str(v.get("connections", 0))),
                          Text(clip(safe(compact_json(v.get("data"))), 60)))
            parts.append(t)
        return Group(*parts)
    t = table("RULE", "TARGET", "POOL", "CONNS", "DATA", title="targets", right=("CONNS",))
    total = 0
    for tg in r.get("targets") or []:
        total += tg.get("connections", 0)
        kind = tg.get("type", "") + (" reliable" if tg.get("reliable") else "")
        rows = list((tg.get("by_pool") or {}).items()) or [("-", {"connections": 0, "data": tg.get("data")})]
        for i, (pid, v) in enumerate(rows):
            t.add_row(Text(clip(safe(tg.get("rule_id", "")), 20) if i == 0 else ""),
                      Text(safe(kind) if i == 0 else ""), Text(safe(pid)), Text(str(v.get("connections", 0))),
                      Text(clip(safe(compact_json(v.get("data"))), 50)))
        notes = []
        if tg.get("already_reached"):
            notes.append(f"{tg['already_reached']} already reached by an earlier rule")
        if tg.get("refused_by_expression"):
            notes.append(f"{tg['refused_by_expression']} left out by the rule's conn expression")
        if notes:
            t.add_row(Text(""), Text(""), Text(""), Text(""), Text("; ".join(notes), style="dim"))
    parts.append(t)
    parts.append(Text(f"{len(r.get('targets') or [])} matching rule(s) reach {total} connection(s); "
                      "nothing was sent", style="dim"))
    return Group(*parts)


TRACE_ORDER = ("written", "coalesced", "queued", "batched", "held", "dropped", "filtered", "not_reached",
               "not_subscribed")


def render_trace(r: dict[str, Any]) -> RenderableType:
    """``wsctl publish --trace``: counts per outcome, then the receivers that were not written at once."""
    tr = r.get("trace") or {}
    n = r.get("delivered") or 0
    head = Text(safe(f"published to {r.get('channel')} at offset {r.get('offset')} "
                     f"(epoch {r.get('epoch') or '-'}): delivered to {n} connection{'s' if n != 1 else ''}"
                     + (" (routed by rules)" if tr.get("routed") else "")))
    counts = tr.get("counts") or {}
    t = table("OUTCOME", "CONNS", right=("CONNS",))
    for k in (*TRACE_ORDER, *sorted(set(counts) - set(TRACE_ORDER))):
        if counts.get(k):
            t.add_row(Text(safe(k.replace("_", " "))), Text(str(counts[k])))
    parts: list[RenderableType] = [head, t] if counts else [head]
    other = [x for x in tr.get("receivers") or [] if x.get("outcome") not in ("written", "coalesced")]
    if other:
        d = table("CONNECTION", "USER", "POOL", "OUTCOME", "DETAIL")
        for x in other[:20]:
            detail = x.get("reason", "")
            if "queue_depth" in x:
                detail = f"queue depth {x['queue_depth']}" + (f", breaker {x['breaker']}" if x.get("breaker") else "") \
                         + (f"; {detail}" if detail else "")
            d.add_row(Text(safe(short_id(x.get("connection_id")))), Text(clip(safe(x.get("user_id", "")), 10)),
                      Text(clip(safe(x.get("pool", "")), 8)), Text(safe(x.get("outcome", "")).replace("_", " ")),
                      Text(clip(safe(detail), 36)))
        parts.append(d)
        if len(other) > 20:
            parts.append(Text(f"… {len(other) - 20} more (--json lists them)", style="dim"))
    total = tr.get("receivers_total", 0)
    if total > len(tr.get("receivers") or []):
        parts.append(Text(f"{total} receivers in all; the reply lists {len(tr.get('receivers') or [])} "
                          "(the unusual outcomes first)", style="dim"))
    if not counts:
        parts.append(Text("no connection in scope", style="dim"))
    return Group(*parts)
