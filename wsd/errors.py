"""Every close code and error code wsd uses, in one registry.

Clients deserve to know whether to reconnect: each close code says whether a
reconnect makes sense (``reconnect``) and carries the human reason sent with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str
    reconnect: bool


NORMAL = Close(1000, "normal closure", False)
SHUTDOWN = Close(1001, "server shutdown", True)
PROTOCOL_ERROR = Close(1002, "protocol error", False)  # sent by websockets: a malformed WebSocket frame
NOT_UTF8 = Close(1007, "invalid data", True)  # sent by websockets: a text frame that is not UTF-8
POLICY = Close(1008, "policy violation", False)
TOO_BIG = Close(1009, "message too big", True)
INTERNAL = Close(1011, "internal error", True)
TRY_AGAIN = Close(1013, "manager full, try again later", True)
KICKED = Close(4000, "kicked", False)
TOKEN_EXPIRED = Close(4001, "token expired", True)
NOT_ADMITTED = Close(4003, "the refreshed token is not admitted in this pool", False)
RATE_LIMITED = Close(4008, "message rate limit exceeded", True)
SLOW_CONSUMER = Close(4009, "slow consumer", True)
IDLE_TIMEOUT = Close(4010, "idle timeout", True)
#: another connection resumed this connection's session: it won, this one must not reconnect
TAKEN_OVER = Close(4011, "session taken over", False)
HEARTBEAT_TIMEOUT = Close(1011, "heartbeat timeout", True)
#: never sent: what a client (and the handler) sees when the connection dropped without a close frame
ABNORMAL = Close(1006, "connection dropped", True)

CLOSE_CODES: dict[int, Close] = {
    c.code: c
    for c in (NORMAL, SHUTDOWN, PROTOCOL_ERROR, NOT_UTF8, POLICY, TOO_BIG, INTERNAL, TRY_AGAIN, KICKED, TOKEN_EXPIRED, NOT_ADMITTED, RATE_LIMITED,
              SLOW_CONSUMER, IDLE_TIMEOUT, TAKEN_OVER)
}

# Error codes in ``{"ok": false, "error": {"code": ...}}`` replies and handshake bodies.
BAD_REQUEST = "bad_request"          # malformed frame, missing / wrong-typed field
UNKNOWN_OP = "unknown_op"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
UNKNOWN_CHANNEL = "unknown_channel"   # no such channel group
NOT_SUBSCRIBED = "not_subscribed"
TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
FILTER_TOO_LARGE = "filter_too_large"     # filter.types beyond limits.max_filter_types / _type_length
INVALID_TOKEN = "invalid_token"
INTERNAL_ERROR = "internal"
INVALID_DATA = "invalid_data"      # publish: data fails the channel group's data_schema

# Handshake refusal codes (HTTP status, error code).
H_BAD_REQUEST = (400, "bad_request")
H_MISSING_TOKEN = (401, "missing_token")
H_INVALID_TOKEN = (401, "invalid_token")
H_EXPIRED_TOKEN = (401, "token_expired")
H_IP_FORBIDDEN = (403, "ip_not_allowed")
H_ORIGIN_FORBIDDEN = (403, "origin_not_allowed")
H_ROLE_FORBIDDEN = (403, "role_not_allowed")
H_POOL_FORBIDDEN = (403, "pool_not_allowed")
H_NO_POOL = (404, "no_such_pool")
H_RATE_LIMITED = (429, "rate_limited")
H_POOL_FULL = (503, "pool_full")
H_MANAGER_FULL = (503, "manager_full")
H_USER_FULL = (429, "too_many_connections")
H_DRAINING = (503, "draining")
