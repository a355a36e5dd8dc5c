"""Rendering for the dashboard as pure functions of the daemon's replies: no I/O, no clock reads.

Every function takes the data (and, where a time is shown, the timezone) and returns text or a
Rich renderable, so the same inputs always draw the same screen — which is what makes snapshot
tests from a committed recording deterministic. Numbers use ``wsctl.fmt`` (the units of every wsctl
view); text that came from outside the daemon goes through ``fmt.plain`` into ``rich.text.Text``, so
control characters are shown escaped and markup is shown literally.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from wsctl import fmt

#: keys that could carry a credential; never drawn even if a daemon sent one
SECRET_KEYS = frozenset({"token", "jwt", "bearer", "access_token", "authorization", "secret", "password"})

WARN_EVENTS = frozenset({"refused", "rate_limited", "slow_consumer", "heartbeat_timeout", "idle_timeout",
                         "reload_failed", "kick", "control_refused", "token_expired", "unhealthy",
                         "draining"})


# -- numbers ---------------------------------------------------------------------------------------------
# the same units as every other wsctl view (wsctl.fmt): `wsctl status` and this dashboard agree
count = fmt.count
ms = fmt.ms
size = fmt.size
duration = fmt.duration
percent = fmt.percent
plain = fmt.plain


def rate(x: Any) -> str:
    """Messages per second, narrow: 1234.5 -> '1.2k/s'."""
    return "-" if x is None else f"{fmt.count(x)}/s"


def bar(frac: float, width: int) -> Text:
    """A fill bar: green, yellow above 70 %, red above 90 %."""
    frac = min(1.0, max(0.0, frac))
    full = round(frac * width)
    if frac > 0 and full == 0:
        full = 1
    style = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "bold red"
    return Text.assemble(("█" * full, style), ("░" * (width - full), "grey37"))


def clock(ts: Any, tz: dt.tzinfo | None, *, date: bool = False) -> str:
    """A Unix time as local (or ``tz``) wall-clock text, to the second."""
    return fmt.local_time(ts, with_date=date, millis=False, tz=tz)


# -- header ----------------------------------------------------------------------------------------------
def header(status: dict[str, Any], *, narrow: bool = False) -> Text:
    """The manager summary, two lines, from a ``status`` reply (shorter labels when ``narrow``)."""
    eng = status.get("engine") or {}
    engine = eng.get("engine", "?") if isinstance(eng, dict) else str(eng)
    nodes = status.get("nodes") or []
    lat = status.get("latency") or {}
    conns, cap = status.get("connections", 0), status.get("max_connections", 0)
    frac = conns / cap if cap else 0.0
    sep = (" " if narrow else "  ", "")
    ident: list[tuple[str, str]] = [
        ("wsd ", "bold cyan"), (plain(status.get("manager_id", "?")), "bold"), sep,
        (f"v{status.get('version', '?')}", "dim"), sep,
        ("up ", "dim"), (duration(status.get("uptime_s")), ""), sep,
        ("engine ", "dim"), (plain(engine), ""), sep, ("nodes ", "dim"), (str(len(nodes)), ""),
    ]
    proc: list[tuple[str, str]] = [
        ("cpu ", "dim"), (fmt.cpu(status.get("cpu_percent")), ""), sep,
        ("rss ", "dim"), (size(status.get("rss_bytes")), ""),
    ]
    flags: list[tuple[str, str]] = []
    if status.get("draining"):
        flags += [(" DRAINING ", "bold white on red"), sep]
    if status.get("ephemeral_secret"):
        flags += [("ephemeral secret", "yellow"), sep]
    traffic: list[tuple[str, str]] = [
        ("conns ", "dim"), (f"{count(conns)}/{count(cap)}", "bold" if frac < 0.9 else "bold red"), sep,
        ("in ", "dim"), (rate(status.get("rate_in")), "green"), sep,
        ("out ", "dim"), (rate(status.get("rate_out")), "green"), sep,
    ]
    if not narrow:
        traffic += [("pub ", "dim"), (rate(status.get("rate_publish")), ""), sep]
    traffic += [("p50 ", "dim"), (ms(lat.get("p50_ms")), ""),
                (" p99 ", "dim"), (ms(lat.get("p99_ms")), _lat_style(lat))]
    # flags (draining, ephemeral secret) lead line two, where they cannot be cut off
    if narrow:  # 80 columns: identity + process on line one, traffic on line two
        out = Text.assemble(*ident, sep, *proc, "\n", *flags, *traffic, no_wrap=True, overflow="ellipsis")
    else:
        out = Text.assemble(*ident, "\n", *flags, *traffic, sep, *proc, no_wrap=True, overflow="ellipsis")
    per_node = node_lines(status, sep)
    if per_node:
        out.append("\n")
        out.append(per_node)
    return out


#: the cluster's nodes the header lists one line each (the rest are counted)
MAX_NODE_LINES = 8


def node_lines(status: dict[str, Any], sep: tuple[str, str]) -> Text | None:
    """With several nodes: one line per node (its connections, rates, p99, CPU, RSS) and the missing ones."""
    stats = status.get("node_stats") or []
    missing = status.get("missing") or []
    if len(stats) + len(missing) < 2:
        return None
    lines: list[Text] = []
    for ns in stats[:MAX_NODE_LINES]:
        lat = ns.get("latency") or {}
        lines.append(Text.assemble(
            ("node ", "dim"), (fit(plain(ns.get("node", "?")), 10), "cyan"), sep,
            ("conns ", "dim"), (f"{count(ns.get('connections', 0))}/{count(ns.get('max_connections', 0))}", ""), sep,
            ("in ", "dim"), (rate(ns.get("rate_in")), "green"), sep, ("out ", "dim"), (rate(ns.get("rate_out")), "green"),
            sep, ("p99 ", "dim"), (ms(lat.get("p99_ms")), _lat_style(lat)), sep,
            ("cpu ", "dim"), (fmt.cpu(ns.get("cpu_percent")), ""), sep, ("rss ", "dim"), (size(ns.get("rss_bytes")), ""),
            *([sep, (" DRAINING ", "bold white on red")] if ns.get("draining") else []),
            no_wrap=True, overflow="ellipsis"))
    for n in missing:
        lines.append(Text.assemble(("node ", "dim"), (fit(plain(n), 10), "cyan"), sep,
                                   ("no answer within the deadline", "bold yellow")))
    if len(stats) > MAX_NODE_LINES:
        lines.append(Text(f"… {len(stats) - MAX_NODE_LINES} more nodes (wsctl status)", style="dim"))
    return Text("\n").join(lines)


def _lat_style(lat: dict[str, Any]) -> str:
    p99 = float(lat.get("p99_ms") or 0)
    return "bold red" if p99 >= 100 else "yellow" if p99 >= 20 else ""


# -- pools -----------------------------------------------------------------------------------------------
def pools_table(pools: Sequence[dict[str, Any]], rates: dict[str, float | None], *, narrow: bool = False
                ) -> Table:
    """One row per pool: its reservation, connections / ceiling with a bar, msgs/s, totals, drops, queued,
    error rate."""
    t = Table(box=None, padding=(0, 1), expand=True, show_edge=False, header_style="bold")
    t.add_column("pool", no_wrap=True)
    if not narrow:
        t.add_column("rsv", justify="right", no_wrap=True)
    t.add_column("conns", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True, width=6 if narrow else 12)
    t.add_column("msgs/s", justify="right", no_wrap=True)
    if not narrow:
        t.add_column("in", justify="right", no_wrap=True)
        t.add_column("out", justify="right", no_wrap=True)
        t.add_column("queued", justify="right", no_wrap=True)
    t.add_column("drops", justify="right", no_wrap=True)
    t.add_column("err", justify="right", no_wrap=True)
    for p in pools:
        cap = int(p.get("max_connections") or 0)
        n = int(p.get("connections") or 0)
        drops = int(p.get("drops") or 0)
        err = float(p.get("error_rate") or 0)
        rsv = int(p.get("min_connections") or 0)
        row: list[RenderableType] = [fmt.text(p.get("id", "?"), style="bold")]
        if not narrow:
            row.append(Text(count(rsv) if rsv else "-", style="" if rsv else "dim"))
        row += [
            Text(f"{count(n)}/{count(cap)}" if not narrow else count(n)),
            bar(n / cap if cap else 0.0, 6 if narrow else 12),
            Text(rate(rates.get(str(p.get("id"))))),
        ]
        if not narrow:
            row += [Text(count(p.get(k))) for k in ("msgs_in", "msgs_out", "queued")]
        row += [Text(count(drops), style="yellow" if drops else ""),
                Text(percent(err), style="red" if err >= 0.01 else "")]
        t.add_row(*row)
    return t


def shared_capacity(cap: Any) -> Text:
    """The pools panel's subtitle: the shared capacity free (``capacity`` of pools.list; '' from older
    daemons)."""
    if not isinstance(cap, dict):
        return Text("")
    free, shared = int(cap.get("shared_free") or 0), int(cap.get("shared") or 0)
    return Text.assemble(("shared free ", "dim"), (f"{count(free)}/{count(shared)}",
                                                   "bold red" if shared and free < shared * 0.1 else ""),
                         (" reserved ", "dim"), (count(cap.get("reserved")), ""))


def pool_rates(prev: dict[str, int] | None, cur: dict[str, int], seconds: float) -> dict[str, float | None]:
    """Per-pool msgs/s (in + out) from two polls' totals; None until there are two polls."""
    if prev is None or seconds <= 0:
        return {k: None for k in cur}
    return {k: max(0.0, (v - prev.get(k, v)) / seconds) for k, v in cur.items()}


def pool_totals(pools: Iterable[dict[str, Any]]) -> dict[str, int]:
    return {str(p.get("id")): int(p.get("msgs_in") or 0) + int(p.get("msgs_out") or 0) for p in pools}


# -- connections table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Col:
    key: str  # the daemon's sort key
    label: str
    width: int
    right: bool = False


WIDE_COLUMNS = (
    Col("id", "id", 16), Col("pool", "pool", 10), Col("user_id", "user", 18),
    Col("company_id", "company", 14),
    Col("state", "state", 10), Col("age_s", "age", 7, True), Col("msgs_in", "in", 7, True),
    Col("msgs_out", "out", 8, True), Col("queue", "queue", 6, True), Col("breaker", "breaker", 9),
    Col("latency_ms", "latency", 8, True),
)
#: the first column when the rows come from several nodes
NODE_COLUMN = Col("node", "node", 10)
NARROW_NODE_COLUMN = Col("node", "node", 8)
NARROW_COLUMNS = (
    Col("id", "id", 8), Col("pool", "pool", 8), Col("user_id", "user", 9), Col("company_id", "company", 8),
    Col("age_s", "age", 6, True), Col("msgs_in", "in", 6, True), Col("msgs_out", "out", 6, True),
    Col("queue", "q", 3, True), Col("latency_ms", "lat", 6, True),
)


def column_label(col: Col, sort: str) -> Text:
    """The header, with ▲ / ▼ on the column the table is sorted by."""
    key = sort.lstrip("-")
    if col.key != key:
        return Text(col.label, justify="right" if col.right else "left")
    arrow = "▼" if sort.startswith("-") else "▲"
    return Text.assemble((col.label, "bold"), (arrow, "bold cyan"), justify="right" if col.right else "left")


def sort_label(sort: str) -> str:
    """The column label for a sort key (``-age_s`` -> ``age``): field names never reach the screen."""
    key = sort.lstrip("-")
    return next((c.label for c in WIDE_COLUMNS if c.key == key), fmt.label(key))


def fit(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(1, width - 1)] + "…"


def conn_cell(col: Col, row: dict[str, Any]) -> Text:
    v = row.get(col.key)
    style = ""
    if col.key == "age_s":
        s = duration(v)
    elif col.key in ("msgs_in", "msgs_out"):
        s = count(v)
    elif col.key == "queue":
        v = v.get("depth") if isinstance(v, dict) else v
        s = count(v)
        style = "yellow" if v else "dim"
    elif col.key == "latency_ms":
        s = ms(v)
        style = "yellow" if (v or 0) >= 20 else ""
    elif col.key == "breaker":
        v = v.get("state") if isinstance(v, dict) else v
        s = plain(v or "-")
        style = {"open": "bold red", "half_open": "yellow"}.get(s, "dim")
    elif col.key == "state":
        s = plain(v or "-")
        style = "" if s == "connected" else "yellow"
    elif col.key == "id":
        s = plain(v or "")[: col.width]
        style = "cyan"
    else:
        s = fit(plain(v or "-"), col.width)
    return Text(s, style=style, justify="right" if col.right else "left", no_wrap=True, overflow="ellipsis")


def page_caption(total: int, offset: int, shown: int, sort: str, filt: str, page_size: int,
                 paused: bool) -> Text:
    if total == 0:
        span = "no connections" if not filt else "no matches"
    else:
        span = f"{count(offset + 1)}\N{EN DASH}{count(offset + shown)} of {count(total)}"
    pages = max(1, -(-total // page_size))
    page = offset // page_size + 1
    parts: list[tuple[str, str]] = [("connections ", "bold"), (span, ""), ("  page ", "dim"),
                                    (f"{page}/{pages}", ""), ("  sort ", "dim"),
                                    (sort_label(sort) + (" ▼" if sort.startswith("-") else " ▲"), "")]
    if filt:
        parts += [("  filter ", "dim"), (plain(filt), "bold yellow")]
    if paused:
        parts += [("  PAUSED", "bold magenta")]
    return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")


# -- events ----------------------------------------------------------------------------------------------
def event_line(ev: dict[str, Any], tz: dt.tzinfo | None) -> Text:
    kind = plain(ev.get("event", "?"))
    style = "yellow" if kind in WARN_EVENTS else "green" if kind == "connect" else (
        "dim" if kind == "disconnect" else "cyan")
    fields = " ".join(f"{plain(k)}={_short(v)}" for k, v in ev.items()
                      if k not in ("seq", "ts", "event") and k.lower() not in SECRET_KEYS
                      and v not in ("", None))
    return Text.assemble((clock(ev.get("ts"), tz), "dim"), " ", (f"{kind:<13}", style), " ", fields,
                         no_wrap=True, overflow="ellipsis")


def _short(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return fit(",".join(plain(x) for x in v) or "none", 40)
    s = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=str)
    return fit(plain(s), 40)


# -- drill-down ------------------------------------------------------------------------------------------
def kv_table(rows: Iterable[tuple[str, Any]]) -> Table:
    t = Table(box=None, show_header=False, padding=(0, 1))
    t.add_column(style="dim", no_wrap=True, min_width=12)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(fmt.text(k), v if isinstance(v, Text) else Text(_plain(v)))
    return t


def _plain(v: Any) -> str:
    """A value as inert text a person reads (lists joined, yes/no, ``-`` for nothing)."""
    if isinstance(v, (list, tuple)):
        return ", ".join(plain(x) for x in v) if v else "-"
    if isinstance(v, dict):
        return plain(json.dumps(v, separators=(", ", ": "), ensure_ascii=False, default=str)) if v else "-"
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return plain(v)


def conn_info(c: dict[str, Any], tz: dt.tzinfo | None) -> Table:
    info = c.get("info") or {}
    return kv_table([
        ("id", fmt.text(c.get("id", ""), style="bold cyan")),
        ("pool", f"{c.get('pool')} ({c.get('pool_type')})"), ("state", c.get("state")),
        ("remote", c.get("remote_address")), ("user agent", info.get("user_agent")),
        ("subprotocol", info.get("subprotocol")), ("extensions", info.get("extensions")),
        ("token from", info.get("token_source")), ("session", info.get("session_id")),
        ("connected", clock(info.get("created_at"), tz, date=True)), ("age", duration(c.get("age_s"))),
        ("resumed", bool(info.get("resumed"))),
    ])


def claims(c: dict[str, Any], tz: dt.tzinfo | None) -> Table:
    """The token's claims as the daemon reports them (it never returns the token itself)."""
    auth = dict(c.get("auth") or {})
    extra = {k: v for k, v in dict(auth.pop("claims", None) or {}).items() if k.lower() not in SECRET_KEYS}
    rows: list[tuple[str, Any]] = [
        ("user (sub)", fmt.text(auth.pop("user_id", "") or "-", style="bold")),
        ("company", auth.pop("company_id", "")), ("roles", auth.pop("roles", [])),
        ("pool claim", auth.pop("pool", "") or "any"),
    ]
    exp = auth.pop("exp", c.get("exp"))
    rows.append(("expires", clock(exp, tz, date=True) if exp else "never"))
    for k, v in sorted(auth.items()):
        if k.lower() not in SECRET_KEYS:
            rows.append((k, v))
    for k, v in sorted(extra.items()):
        is_time = k in ("iat", "nbf", "auth_time") and isinstance(v, (int, float))
        rows.append((k, clock(v, tz, date=True) if is_time else v))
    return kv_table(rows)


def queue_breaker(c: dict[str, Any]) -> Table:
    q = c.get("queue") or {}
    b = c.get("breaker") or {}
    bp = q.get("by_priority") or {}
    rel = c.get("reliable")
    state = str(b.get("state", "-"))
    rows: list[tuple[str, Any]] = [
        ("queue", f"{count(q.get('depth'))} / {count(q.get('capacity'))}"),
        ("by priority", "  ".join(f"{k} {count(v)}" for k, v in bp.items()) or "-"),
        ("dropped", (f"overflow {count(q.get('dropped_overflow'))}  "
                     f"expired {count(q.get('dropped_expired'))}")),
        ("breaker", Text(state, style={"open": "bold red", "half_open": "yellow"}.get(state, "green"))),
        ("failures", f"{count(b.get('failures'))} (opened {count(b.get('opened_count'))}x)"),
    ]
    if rel:
        rows.append(("reliable", (f"next seq {rel.get('next_seq')}  unacked {rel.get('unacked')}  "
                                  f"resent {rel.get('resent')}  given up {rel.get('given_up')}")))
    return kv_table(rows)


def conn_metrics(c: dict[str, Any]) -> Table:
    m = c.get("metrics") or {}
    h = c.get("health") or {}
    return kv_table([
        ("messages", f"in {count(m.get('messages_received'))}  out {count(m.get('messages_sent'))}"),
        ("bytes", f"in {size(m.get('bytes_received'))}  out {size(m.get('bytes_sent'))}"),
        ("latency", ms(m.get("avg_latency_ms"))), ("throughput", rate(h.get("throughput_msgs_s"))),
        ("error rate", percent(h.get("error_rate"))), ("errors", count(m.get("errors"))),
        ("pings missed", count(m.get("pings_missed"))), ("reconnections", count(m.get("reconnection_count"))),
    ])


def subscriptions(c: dict[str, Any]) -> RenderableType:
    subs = c.get("subscriptions") or []
    if not subs:
        return Text("no subscriptions", style="dim")
    t = Table(box=None, padding=(0, 1), header_style="bold")
    for name in ("channel", "mode", "types", "position", "held"):
        t.add_column(name, no_wrap=name != "types", overflow="ellipsis")
    for s in subs:
        pos = s.get("position") or {}
        t.add_row(fmt.text(s.get("channel"), style="bold"), fmt.text(s.get("mode", "-")),
                  Text(_plain(s.get("types"))), fmt.text(f"{pos.get('offset', 0)}@{pos.get('epoch') or '-'}"),
                  Text(count(s.get("held"))))
    return t


def recent_events(evs: Sequence[dict[str, Any]], tz: dt.tzinfo | None) -> RenderableType:
    if not evs:
        return Text("no events", style="dim")
    return Group(*(event_line(e, tz) for e in evs))


# -- channels and rules ----------------------------------------------------------------------------------
def group_row(g: dict[str, Any]) -> tuple[Text, ...]:
    return _texts(g.get("group_id"), g.get("type"), count(g.get("instances")), count(g.get("subscribers")),
                  f"{count(g.get('history_size'))}/{duration(g.get('history_ttl_s'))}",
                  _plain(g.get("publishers") or []), g.get("name", ""))


def instance_row(i: dict[str, Any]) -> tuple[Text, ...]:
    return _texts(i.get("channel"), i.get("group"), count(i.get("subscribers")), count(i.get("users")),
                  count(i.get("history_depth")), f"{i.get('offset', 0)}@{i.get('epoch') or '-'}")


def _texts(*cells: Any) -> tuple[Text, ...]:
    """Table cells as inert text (a DataTable would parse a plain string as markup)."""
    return tuple(c if isinstance(c, Text) else fmt.text(c) for c in cells)


def rule_filter(r: dict[str, Any]) -> str:
    f = r.get("filter") or {}
    parts = [f"{k}={','.join(str(x) for x in v)}" for k, v in f.items() if isinstance(v, list) and v]
    if f.get("expression"):
        parts.append(f"expr: {f['expression']}")
    return "; ".join(parts) or "any"


def rule_row(r: dict[str, Any]) -> tuple[Text | str, ...]:
    tgt = r.get("target") or {}
    target = str(tgt.get("type", "?")) + (" reliable" if tgt.get("reliable_delivery") else "")
    on = bool(r.get("enabled"))
    return _texts(r.get("id"), r.get("priority"),
                  Text("enabled" if on else "disabled", style="green" if on else "red"),
                  "stop" if r.get("stop") else "", count(r.get("hits")), target,
                  fit(plain(rule_filter(r)), 80))
