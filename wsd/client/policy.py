"""Pure reconnect policy: the close-code table and exponential backoff with full jitter."""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CloseAction:
    """What the client does when the server closes its connection with a given code."""

    reconnect: bool  # False: stop; the subscriptions' iterators end or raise
    why: str  # a short human text, used in errors and docs
    fresh_token: bool = False  # fetch a new token from the callable before reconnecting
    failover: bool = False  # try the next URL first (this node is going away or full)
    penalty: bool = False  # keep growing the backoff across reconnects (the server asked us to slow down)
    error: str = ""  # when stopping: "kicked", "not_admitted", "taken_over", "closed" or "protocol"


#: The server's close codes (docs/protocol.md, "Close codes") and what the client does about each.
CLOSE_ACTIONS: dict[int, CloseAction] = {
    1000: CloseAction(False, "the server ended the session", error="closed"),
    1001: CloseAction(True, "server shutting down", failover=True),
    1002: CloseAction(False, "protocol error", error="protocol"),
    1006: CloseAction(True, "connection dropped"),
    1007: CloseAction(True, "invalid data"),
    1008: CloseAction(False, "policy violation", error="protocol"),
    1009: CloseAction(True, "message too big"),
    1011: CloseAction(True, "internal error or heartbeat timeout"),
    1013: CloseAction(True, "server full, try again later", failover=True, penalty=True),
    4000: CloseAction(False, "kicked by an operator", error="kicked"),
    4001: CloseAction(True, "token expired", fresh_token=True),
    4003: CloseAction(False, "token no longer admitted by this pool", error="not_admitted"),
    4008: CloseAction(True, "message rate limit exceeded", penalty=True),
    4009: CloseAction(True, "slow consumer"),
    4010: CloseAction(True, "idle timeout"),
    4011: CloseAction(False, "session taken over by another connection", error="taken_over"),
}

#: A code the table does not know: reconnect with backoff (new codes may be added by the server).
UNKNOWN_CLOSE = CloseAction(True, "unknown close code")


def close_action(code: int | None) -> CloseAction:
    """The action for a close code; ``None`` (no close frame: the network dropped) counts as 1006."""
    return CLOSE_ACTIONS.get(1006 if code is None else code, UNKNOWN_CLOSE)


class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits ``random() * min(cap, base * 2**n)``."""

    def __init__(self, base: float = 0.5, cap: float = 30.0,
                 random: Callable[[], float] = _random.random) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap (got base={base}, cap={cap})")
        self.base = base
        self.cap = cap
        self.random = random

    def ceiling(self, attempt: int) -> float:
        """The upper bound of attempt ``attempt``'s delay (0-based)."""
        if attempt >= 64:
            return self.cap
        return min(self.cap, self.base * (2 ** max(0, attempt)))

    def delay(self, attempt: int) -> float:
        return self.random() * self.ceiling(attempt)
