"""The daemon's event sink: lifecycle and security events (``wsctl events``) and the audit log.

Owned by the daemon and handed to the runtime pieces that report what happened (the hub, the
endpoint): they call ``emit`` and ``audit`` and never reach back into the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import time
from collections import deque
from typing import Any

from wsd.control.protocol import EVENT_KINDS
from wsd.runtime.logs import redact

log = logging.getLogger("wsd")

#: Event kinds logged at WARNING (the others at INFO; connect and disconnect at DEBUG).
WARNING_KINDS = frozenset(("refused", "rate_limited", "slow_consumer", "heartbeat_timeout", "reload_failed",
                           "handshake_limit", "descriptors_exhausted"))


def log_value(v: Any) -> str:
    """A field of an event as a text log line shows it: words, not Python reprs (``resumed=no``,
    ``roles=admin,ops``, ``restart_required=none``); the log formatter escapes control characters."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "-"
    if isinstance(v, (list, tuple, set, frozenset)):
        return ",".join(log_value(x) for x in v) or "none"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"), default=str)
    return str(v)


class Events:
    """The last ``keep`` events, their followers, and the audit logger (None when no audit path is set)."""

    def __init__(self, keep: int = 2000) -> None:
        self.log: deque[dict[str, Any]] = deque(maxlen=keep)
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.seq = 0
        self.audit_logger: logging.Logger | None = None

    def emit(self, kind: str, *, log_line: bool = True, **fields: Any) -> None:
        """A lifecycle or security event: kept for `wsctl events`, streamed to followers, logged
        (unless the caller logs it itself: ``log_line=False``). ``kind`` is one of the protocol's EVENT_KINDS."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} is not in wsd/control/protocol.py EVENT_KINDS")
        self.seq += 1
        ev = {"seq": self.seq, "ts": round(time.time(), 3), "event": kind, **fields}
        self.log.append(ev)
        for q in list(self.subscribers):
            if q.full():
                continue  # a follower that does not read loses events, never slows the daemon
            q.put_nowait(ev)
        level = logging.WARNING if kind in WARNING_KINDS else logging.INFO
        if kind in ("connect", "disconnect"):
            level = logging.DEBUG
        if log_line and log.isEnabledFor(level):
            log.log(level, "%s %s", kind, " ".join(f"{k}={log_value(v)}" for k, v in fields.items()))

    def audit(self, kind: str, **fields: Any) -> None:
        lg = self.audit_logger
        if lg is not None:
            lg.info(redact(json.dumps({"ts": round(time.time(), 3), "event": kind, **fields}, default=str)))

    def set_audit(self, path: str, max_bytes: int, backups: int) -> None:
        """Write audit records to ``path`` (rotated), or nowhere when ``path`` is empty."""
        if self.audit_logger is not None:
            for h in list(self.audit_logger.handlers):
                self.audit_logger.removeHandler(h)
                h.close()
            self.audit_logger = None
        if not path:
            return
        lg = logging.getLogger("wsd.audit")
        lg.propagate = False
        lg.setLevel(logging.INFO)
        h = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)
        self.audit_logger = lg
