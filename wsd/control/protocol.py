"""The control protocol shared by the daemon and wsctl: newline-delimited JSON over a Unix socket.

Request:  ``{"id": 1, "method": "connections.list", "params": {...}}``
Reply:    ``{"id": 1, "result": ...}`` or ``{"id": 1, "error": {"code": ..., "message": ...}}``
Stream:   ``events.subscribe`` replies once, then sends ``{"event": {...}}`` lines until the client closes.

Pure: this module is all wsctl imports from the daemon's package.
"""

from __future__ import annotations

import os

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20

# error codes in control replies
E_PARSE = "parse_error"
E_BAD_REQUEST = "bad_request"
E_UNKNOWN_METHOD = "unknown_method"
E_NOT_FOUND = "not_found"
E_AMBIGUOUS = "ambiguous"  # an id prefix that matches more than one connection
E_FAILED = "failed"
E_FORBIDDEN = "forbidden"

# the values of a connection's `state` (connections.list filters on them)
CONNECTION_STATES = ("connecting", "connected", "disconnecting")

# the kinds of event the daemon emits (events.recent / events.subscribe, `wsctl events --kind`)
EVENT_KINDS = (
    "started", "connect", "disconnect", "kick", "refused", "rate_limited", "slow_consumer",
    "heartbeat_timeout", "idle_timeout", "token_expired", "token_refreshed", "unhealthy", "recovery",
    "reload", "reload_failed", "rule_changed", "draining", "control_refused", "refresh_refused",
    "internal_error", "handshake_limit", "descriptors_exhausted",
)

# method -> one-line help (the daemon's table of handlers must match these names exactly)
METHODS: dict[str, str] = {
    "hello": "protocol version, daemon version and manager id",
    "help": "the method list with one line each",
    "status": "manager summary: uptime, connections by pool and state, rates, latency, RSS, CPU",
    "pools.list": "every pool with counts, rates, drops and error rate",
    "connections.list": "connections, filtered (pool, user, company, state), sorted, paged (offset, limit)",
    "connections.get": "one connection whole: info, claims (no token), subscriptions, queue, breaker, metrics",
    "channels.list": "channel groups and instances with subscriber counts and history depth",
    "subscriptions.list": "subscriptions of one connection or one channel",
    "presence.get": "who is subscribed to a channel instance",
    "history.get": "the history buffer of a channel instance",
    "metrics.get": "daemon metrics: manager, pools, routing, subscriptions, queues",
    "metrics.prometheus": "the Prometheus exposition text",
    "publish": "publish into one channel instance",
    "broadcast": "send to every connection, optionally narrowed by pool, company",
    "send": "send to one connection",
    "kick": "close connections (ids, user, company or pool) with 4000 and a reason",
    "rules.list": "routing rules with hit counts",
    "rules.get": "one routing rule",
    "rules.set_enabled": "enable or disable a routing rule at run time",
    "rules.test": "match a message against the live rules without sending it: the walk, receivers per pool, data",
    "publish.trace": "publish into one channel instance and report what happened at each receiver",
    "token": "mint a JWT with the daemon's signing key",
    "reload": "re-read the config file; an invalid file is refused and the old config stays",
    "config.get": "the running config, secrets redacted",
    "events.recent": "the most recent events",
    "events.subscribe": "stream lifecycle and security events until the client closes",
}


def default_socket_path() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "wsd", "wsd.sock")
    return f"/tmp/wsd-{os.getuid()}/wsd.sock"
