"""Logging: text or JSON lines, with every token redacted before any handler sees it.

websockets logs request lines, headers and subprotocols at debug level; those carry the
token (query string, Authorization, ``bearer.<jwt>``). A filter on every handler rewrites
the formatted message so that no line ever holds a token.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

REDACTED = "[redacted]"
_PATTERNS = [
    # JWT-shaped strings: three base64url parts, the first two starting with eyJ ('{"').
    re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"),
    re.compile(r"(?i)(token=)[^&\s'\"]+"),
    re.compile(r"(?i)(bearer[ .])[^\s,'\"]+"),
    re.compile(r"(?i)(authorization: )[^\r\n'\"]+"),
    re.compile(r"(?i)(\"secret\"\s*:\s*\")[^\"]*"),
]


def redact(text: str) -> str:
    """``text`` with anything that looks like a token replaced by ``[redacted]``."""
    for pat in _PATTERNS:
        if pat.groups:
            text = pat.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pat.sub(REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record's message once and stores the redacted text back."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not kill logging
            msg = str(record.msg)
        clean = redact(msg)
        record.msg = clean
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = getattr(record, "fields", None)
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


def setup(level: str = "info", fmt: str = "text", stream: object = None) -> None:
    """Configure the root logger once: one stderr handler, redacting, text or JSON."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_wsd", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._wsd = True  # type: ignore[attr-defined]
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # websockets' own per-connection noise stays at our level; its debug lines are redacted above.
    # websockets logs every open/close at INFO: with thousands of clients that is noise, so it speaks
    # only at warning and above unless we run at debug (where its lines are redacted above).
    logging.getLogger("websockets").setLevel(root.level if root.level <= logging.DEBUG else logging.WARNING)


def log(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    """Log ``msg`` with structured ``fields`` (shown as k=v in text, as keys in JSON)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})
