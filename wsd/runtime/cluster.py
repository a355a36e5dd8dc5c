"""Merging the nodes' replies to a cluster-wide control request into one reply (pure functions).

Each node serves its own part (runtime/control.py, through ``Engine.control``); what comes back is a map
node id -> ``{"result": ...}`` or ``{"error": {"code", "message"}}``. Rows get a ``node`` field; counts are
summed; every merged reply says which nodes answered (``nodes``) and which did not in time (``missing``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: the most connection rows one cluster-wide ``connections.list`` asks of each node (offset + limit)
MAX_CLUSTER_ROWS = 10000


def split(replies: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The nodes' results and the nodes' errors, each by node id (in node order)."""
    ok: dict[str, Any] = {}
    failed: dict[str, dict[str, str]] = {}
    for node in sorted(replies):
        r = replies[node]
        if "error" in r:
            err = r.get("error") or {}
            failed[node] = {"code": str(err.get("code", "failed")), "message": str(err.get("message", ""))}
        else:
            ok[node] = r.get("result")
    return ok, failed


def failures(failed: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    return [{"node": n, **e} for n, e in failed.items()]


# how connections.list orders the rows of a page, by sort field (the daemon sorts Conn objects the same way)
ROW_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "queue": lambda r: (r.get("queue") or {}).get("depth", 0),
    "breaker": lambda r: (r.get("breaker") or {}).get("state", ""),
}


def row_key(field: str) -> Callable[[dict[str, Any]], Any]:
    return ROW_KEYS.get(field) or (lambda r: r.get(field))


def merge_connections(ok: dict[str, Any], sort: str, offset: int, limit: int) -> dict[str, Any]:
    desc = sort.startswith("-")
    key = row_key(sort.removeprefix("-"))
    rows = [dict(row, node=node) for node, res in ok.items() for row in res.get("items", [])]
    rows.sort(key=key, reverse=desc)
    return {"total": sum(int(res.get("total", 0)) for res in ok.values()), "offset": offset, "limit": limit,
            "items": rows[offset:offset + limit], "by_node": {n: int(res.get("total", 0)) for n, res in ok.items()}}


def merge_subscriptions(ok: dict[str, Any], limit: int) -> dict[str, Any]:
    by_mode: dict[str, int] = {}
    for res in ok.values():
        for mode, n in (res.get("by_mode") or {}).items():
            by_mode[mode] = by_mode.get(mode, 0) + int(n)
    rows = [dict(row, node=node) for node, res in ok.items() for row in res.get("items", [])]
    return {"total": sum(int(res.get("total", 0)) for res in ok.values()), "by_mode": by_mode,
            "items": rows[:limit]}


def merge_presence(ok: dict[str, Any], channel: str) -> dict[str, Any]:
    users: set[str] = set()
    for res in ok.values():
        users.update(res.get("users") or ())
    return {"channel": channel, "connections": sum(int(res.get("connections", 0)) for res in ok.values()),
            "users": sorted(users), "by_node": {n: int(res.get("connections", 0)) for n, res in ok.items()}}


def merge_channels(ok: dict[str, Any]) -> dict[str, Any]:
    instances: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    for res in ok.values():
        for inst in res.get("instances", []):
            have = instances.get(inst["channel"])
            if have is None:
                instances[inst["channel"]] = dict(inst)
                continue
            have["subscribers"] += inst.get("subscribers", 0)
            have["users"] += inst.get("users", 0)  # per node: a user on two nodes counts twice
            if inst.get("offset", 0) > have.get("offset", 0):  # the history is shared: the newest view wins
                have.update(history_depth=inst.get("history_depth", 0), offset=inst["offset"],
                            epoch=inst.get("epoch", ""))
        for g in res.get("groups", []):
            groups.setdefault(g["group_id"], dict(g))
    for g in groups.values():
        mine = [v for v in instances.values() if v["group"] == g["group_id"]]
        g["instances"] = len(mine)
        g["subscribers"] = sum(v["subscribers"] for v in mine)
    return {"groups": list(groups.values()), "instances": sorted(instances.values(), key=lambda v: v["channel"])}


def _sum_ints(mine: Any, others: list[Any]) -> Any:
    """``mine`` with every integer (not bool) replaced by its sum over ``mine`` and ``others`` (same paths)."""
    if isinstance(mine, dict):
        return {k: _sum_ints(v, [o.get(k) for o in others if isinstance(o, dict)]) for k, v in mine.items()}
    if isinstance(mine, int) and not isinstance(mine, bool):
        return mine + sum(o for o in others if isinstance(o, int) and not isinstance(o, bool))
    return mine


def merge_metrics(ok: dict[str, Any], me: str) -> dict[str, Any]:
    """Integers (counts, counters, histogram buckets) summed over the nodes; the rest (rates, latencies, CPU,
    uptime) is one node's: this one's when it answered."""
    if not ok:
        return {}
    first = me if me in ok else next(iter(ok))
    merged = _sum_ints(ok[first], [v for n, v in ok.items() if n != first])
    merged["by_node"] = {n: {"connections": v.get("manager", {}).get("connections", 0),
                             "rss_bytes": v.get("manager", {}).get("rss_bytes", 0),
                             "cpu_percent": v.get("manager", {}).get("cpu_percent", 0.0),
                             "uptime_s": v.get("manager", {}).get("uptime_s", 0.0)} for n, v in ok.items()}
    return merged


#: what ``status`` shows of each node (its header figures in ``wsctl top``)
NODE_FIGURES = ("connections", "max_connections", "rate_in", "rate_out", "rate_publish", "latency", "cpu_percent",
                "rss_bytes", "uptime_s", "version", "draining", "pid", "manager_id")


def merge_status(ok: dict[str, Any], me: str) -> dict[str, Any]:
    first = me if me in ok else next(iter(ok))
    out = dict(ok[first])
    by_pool: dict[str, int] = {}
    by_state: dict[str, int] = {}
    for res in ok.values():
        for k, n in (res.get("by_pool") or {}).items():
            by_pool[k] = by_pool.get(k, 0) + int(n)
        for k, n in (res.get("by_state") or {}).items():
            by_state[k] = by_state.get(k, 0) + int(n)
    out.update(by_pool=by_pool, by_state=by_state,
               connections=sum(int(r.get("connections", 0)) for r in ok.values()),
               max_connections=sum(int(r.get("max_connections", 0)) for r in ok.values()),
               draining=any(r.get("draining") for r in ok.values()))
    for rate in ("rate_in", "rate_out", "rate_publish"):
        out[rate] = round(sum(float(r.get(rate, 0.0)) for r in ok.values()), 2)
    out["node_stats"] = [{"node": n, **{k: r.get(k) for k in NODE_FIGURES}} for n, r in ok.items()]
    return out


def merge_events(ok: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    evs = [dict(ev, node=node) for node, res in ok.items() for ev in res.get("events", [])]
    evs.sort(key=lambda e: (e.get("ts", 0), e.get("seq", 0)))
    return evs[-limit:] if limit else []
