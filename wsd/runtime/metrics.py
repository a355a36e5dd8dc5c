"""The daemon's metrics (manager, pools, routing, subscriptions, queues) and their Prometheus exposition.

Collected at scrape time from the counters the hot path already keeps: exposing metrics costs
the fan-out nothing. Per-pool counters are the pool's closed connections' totals (kept when a
connection closes, ``Stats.retire``) plus its open connections': they never go down.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wsd.core.capacity import shared_free

if TYPE_CHECKING:
    from wsd.runtime.daemon import Daemon


def pool_totals(d: Daemon) -> dict[str, dict[str, Any]]:
    """Per pool: open connections summed in one pass, plus the totals the pool's closed connections left."""
    def empty(pool_type: str, max_connections: int) -> dict[str, Any]:
        return {"type": pool_type, "connections": 0, "max_connections": max_connections, "messages_sent": 0,
                "messages_received": 0, "bytes_sent": 0, "bytes_received": 0, "drops": 0, "errors": 0,
                "queued": 0, "breakers_open": 0, "avg_latency_ms": 0.0}

    pools = {pid: empty(pool.type, pool.max_connections) for pid, pool in d.pools.items()}
    for pid, retired in d.hub.stats.retired.items():
        p = pools.get(pid)
        if p is None:  # a pool removed by a reload: its counts stay exported
            p = pools[pid] = empty("removed", 0)
        for k, v in retired.items():
            p[k] += v
    lat_sum: dict[str, float] = {}
    for c in d.hub.conns.values():
        p = pools.get(c.pool.id)
        if p is None:  # a pool removed by a reload still has connections
            p = pools[c.pool.id] = empty(c.pool.type, 0)
        elif p["type"] == "removed":
            p["type"] = c.pool.type
        p["connections"] += 1
        p["messages_sent"] += c.msgs_out
        p["messages_received"] += c.msgs_in
        p["bytes_sent"] += c.bytes_out
        p["bytes_received"] += c.bytes_in
        p["drops"] += c.drops_overflow + c.drops_expired
        p["errors"] += c.errors
        p["queued"] += c.queue_depth()
        p["breakers_open"] += 1 if c.breaker is not None and c.breaker_state() != "closed" else 0
        lat_sum[c.pool.id] = lat_sum.get(c.pool.id, 0.0) + c.latency_ms
    for pid, p in pools.items():
        if p["connections"]:
            p["avg_latency_ms"] = round(lat_sum.get(pid, 0.0) / p["connections"], 3)
        p["error_rate"] = round(p["errors"] / p["messages_received"], 4) if p["messages_received"] else 0.0
    return pools


def pool_capacity(d: Daemon) -> dict[str, Any]:
    """The shared connection capacity (``capacity`` in pools.list; see wsd.core.capacity): the daemon-wide
    limit, what the pools reserve, the connections open and what is left for pools past their reservation."""
    used = d.hub.pool_counts
    limit = d.config.manager.max_connections
    reserved = sum(s.reserved for s in d.shares.values())
    return {"max_connections": limit, "reserved": reserved, "shared": max(0, limit - reserved),
            "connections": len(d.hub.conns), "shared_free": shared_free(limit, d.shares, used)}


def memory_metrics(d: Daemon) -> dict[str, Any]:
    """What clients can make the daemon keep, and what the sweep freed: sessions, channel instances
    (the engine's), fan-out timestamps and limiter keys (the hub's)."""
    eng = {"sessions": 0, "session_bytes": 0, "sessions_evicted": 0, "sessions_expired": 0, "sessions_refused": 0,
           "channels": 0, "channels_evicted": 0, "channels_expired": 0}
    eng.update(d.engine.memory_stats())
    ip = getattr(d, "ip_limiter", None)
    user = getattr(d, "user_limiter", None)
    return {**eng, "fanout_channels": len(d.hub.last_fanout),
            "limiter_keys": {"ip": len(ip) if ip is not None else 0, "user": len(user) if user is not None else 0}}


def metrics_snapshot(d: Daemon) -> dict[str, Any]:
    hub = d.hub
    st = hub.stats
    now = d.loop.time()
    pools = pool_totals(d)
    subs_by_mode: dict[str, int] = {}
    for c in hub.conns.values():
        for s in c.subs.values():
            subs_by_mode[s.mode] = subs_by_mode.get(s.mode, 0) + 1
    proc = d.process_stats()
    return {
        "manager": {"manager_id": d.config.manager.manager_id, "connections": len(hub.conns),
                    "max_connections": d.config.manager.max_connections,
                    "uptime_s": round(time.monotonic() - d.started_mono, 1), "last_updated": time.time(),
                    "rss_bytes": proc["rss_bytes"], "cpu_percent": proc["cpu_percent"],
                    "rss_per_connection_bytes": int(proc["rss_bytes"] / len(hub.conns)) if hub.conns else 0,
                    **st.as_dict()},
        "pools": pools,
        "routing": hub.rules.metrics(),
        "subscriptions": {"total": sum(subs_by_mode.values()), "by_mode": subs_by_mode,
                          "channels": len(hub.by_channel), "subscribes": st.subscribes,
                          "unsubscribes": st.unsubscribes},
        "memory": memory_metrics(d),
        "bus": d.engine.bus_metrics() or {},
        "queues": {"queued": sum(c.queue_depth() for c in hub.conns.values()),
                   "congested": sum(1 for c in hub.conns.values() if c.congested_since is not None),
                   "dropped_overflow": st.dropped_overflow,
                   "dropped_expired": st.dropped_expired + sum(c.drops_expired for c in hub.conns.values()),
                   "dropped_on_close": st.dropped_on_close, "slow_consumers": st.slow_consumers,
                   "reliable_resent": st.reliable_resent, "reliable_given_up": st.reliable_given_up,
                   "now": now},
    }


class _Collector:
    def __init__(self, d: Daemon) -> None:
        self.d = d

    def collect(self) -> Any:
        m = metrics_snapshot(self.d)
        mgr = m["manager"]
        g = GaugeMetricFamily("wsd_connections", "Open connections by pool", labels=["pool"])
        for pid, p in m["pools"].items():
            g.add_metric([pid], p["connections"])
        yield g
        for name, key, help_ in (("wsd_messages_sent", "messages_sent", "Messages written to clients"),
                                 ("wsd_messages_received", "messages_received", "Frames received from clients"),
                                 ("wsd_bytes_sent", "bytes_sent", "Bytes written to clients"),
                                 ("wsd_bytes_received", "bytes_received", "Bytes received from clients"),
                                 ("wsd_dropped", "drops", "Messages dropped (overflow, expiry)")):
            c = CounterMetricFamily(name, help_ + " by pool (open and closed connections)", labels=["pool"])
            for pid, p in m["pools"].items():
                c.add_metric([pid], p[key])
            yield c
        for key in ("published", "delivered", "connections_total", "dropped_overflow", "dropped_on_close",
                    "slow_consumers", "reliable_resent", "reliable_given_up", "batches", "subscribes"):
            # wsd_connections is the open-connections gauge: the counter of accepted ones is "opened".
            name = "connections_opened" if key == "connections_total" else key
            c = CounterMetricFamily(f"wsd_{name}", f"Total {name.replace('_', ' ')}")
            c.add_metric([], mgr[key])
            yield c
        c = CounterMetricFamily("wsd_publish_invalid_data", "Publications refused: data failed the channel's schema")
        c.add_metric([], mgr["invalid_data"])
        yield c
        c = CounterMetricFamily("wsd_input_discarded_bytes",
                                "Bytes received from connections closing for their message rate, dropped unparsed")
        c.add_metric([], mgr["input_discarded_bytes"])
        yield c
        c = CounterMetricFamily("wsd_handshakes_refused", "Refused handshakes by code", labels=["code"])
        for code, n in mgr["refused"].items():
            c.add_metric([code], n)
        yield c
        c = CounterMetricFamily("wsd_closes", "Closed connections by close code", labels=["code"])
        for code, n in mgr["closed_by_code"].items():
            c.add_metric([code], n)
        yield c
        for key, help_ in (("messages_routed", "Published messages at least one routing rule matched"),
                           ("messages_unrouted", "Published messages no routing rule matched (delivered to "
                                                 "their channel's subscribers)")):
            c = CounterMetricFamily(f"wsd_{key}", help_ + "; broadcasts and sends skip the rules")
            c.add_metric([], m["routing"].get(key, 0))
            yield c
        r = CounterMetricFamily("wsd_rule_hits", "Routing rule hits", labels=["rule"])
        for rid, n in m["routing"].get("rule_hits", {}).items():
            r.add_metric([rid], n)
        yield r
        mem = m["memory"]
        for name, key, help_ in (("wsd_sessions_evicted", "sessions_evicted", "Disconnected sessions evicted by "
                                  "limits.max_sessions_per_user / max_sessions"),
                                 ("wsd_sessions_expired", "sessions_expired", "Disconnected sessions freed at expiry"),
                                 ("wsd_sessions_refused", "sessions_refused", "Disconnected sessions not kept: "
                                  "larger than limits.max_session_bytes"),
                                 ("wsd_history_channels_evicted", "channels_evicted", "Channel instances freed by "
                                  "limits.max_history_channels"),
                                 ("wsd_history_channels_expired", "channels_expired", "Unused channel instances "
                                  "freed after their history expired")):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], mem[key])
            yield c
        for name, val, help_ in (("wsd_sessions", mem["sessions"], "Disconnected sessions kept for resume"),
                                 ("wsd_history_channels", mem["channels"], "Channel instances whose history is held")):
            gg = GaugeMetricFamily(name, help_)
            gg.add_metric([], val)
            yield gg
        gg = GaugeMetricFamily("wsd_limiter_keys", "Keys held by the handshake rate limiters", labels=["limiter"])
        for lname, n in mem["limiter_keys"].items():
            gg.add_metric([lname], n)
        yield gg
        bus = m["bus"]
        if bus:
            c = CounterMetricFamily("wsd_bus_messages", "Messages received from the shared engine's bus, by bus: "
                                    "the channels' own (only those with subscribers here) or the shared one",
                                    labels=["bus"])
            c.add_metric(["channel"], bus["messages_channel"])
            c.add_metric(["shared"], bus["messages_shared"])
            yield c
            for key, help_ in (("subscribes", "Channel buses subscribed to (first subscriber here)"),
                               ("unsubscribes", "Channel buses left (no subscriber here for the grace period)"),
                               ("fills", "Holes in the bus filled from history (or reported)"),
                               ("gaps", "Holes in the bus history no longer held: reported to subscribers")):
                c = CounterMetricFamily(f"wsd_bus_{key}", help_)
                c.add_metric([], bus[key])
                yield c
            gg = GaugeMetricFamily("wsd_bus_channels", "Channel buses this node subscribes to")
            gg.add_metric([], bus["channels"])
            yield gg
        st = self.d.hub.stats
        st.move_samples()  # what the sweep has not moved yet
        yield from st.delivery_hist.collect()
        yield from st.handshake_hist.collect()
        for name, val, help_ in (("wsd_queued_messages", m["queues"]["queued"], "Messages waiting in outboxes"),
                                 ("wsd_subscriptions", m["subscriptions"]["total"], "Active subscriptions"),
                                 ("wsd_process_rss_bytes", mgr["rss_bytes"], "Daemon RSS"),
                                 ("wsd_process_cpu_percent", mgr["cpu_percent"], "Daemon CPU percent")):
            gg = GaugeMetricFamily(name, help_)
            gg.add_metric([], val)
            yield gg


def prometheus_text(d: Daemon) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(d))  # type: ignore[arg-type]
    return generate_latest(reg).decode()
