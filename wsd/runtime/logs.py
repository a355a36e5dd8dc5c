"""Logging: text or JSON lines, with every token redacted before any handler sees it.

websockets logs request lines, headers and subprotocols at debug level; those carry the
token (query string, Authorization, ``bearer.<jwt>``). A filter on every handler rewrites
the formatted message so that no line ever holds a token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
from typing import Any

from websockets.frames import Frame

REDACTED = "[redacted]"
_PATTERNS = [
    # JWT-shaped strings: base64url parts starting with eyJ ('{"'), also cut short (one or two parts).
    re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"),
    # The value of a "token" field in JSON text, also when the text was cut before its closing quote.
    re.compile(r"(\"token\"\s*:\s*\")[^\"]*"),
    # The tail of a token after an elision ("..."): payload tail and signature, or a long signature tail.
    re.compile(r"(\.\.\.)(?:[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{8,}|[A-Za-z0-9_-]{16,})"),
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


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(m: re.Match[str]) -> str:
    return repr(m.group())[1:-1]  # none of these is printable: repr spells each as \\n, \\x1b or \\u202e


def escape(text: str) -> str:
    """``text`` on one line with control characters escaped (``\\n``, ``\\x1b``, bidi controls as ``\\u202e``).

    What a client sent (a path, a user agent, an origin, a reason, an id) can then neither start a
    fake log line nor send terminal escape sequences to whoever reads the log.
    """
    return _CONTROL.sub(_escape_char, text)


def _redacted_frame(frame: Any) -> Any:
    """A copy of a websockets data frame with any token in its payload redacted.

    websockets logs frames at debug level cut to their start and end: redacting the whole payload
    before that cut leaves no tail of a token behind.
    """
    try:
        text = bytes(frame.data).decode("utf-8", "surrogateescape")
    except Exception:
        return frame
    clean = redact(text)
    if clean == text:
        return frame
    return dataclasses.replace(frame, data=clean.encode("utf-8", "surrogateescape"))


class RedactingFilter(logging.Filter):
    """Formats the record's message once and stores the redacted text back."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args and any(isinstance(a, Frame) for a in args):
            record.args = tuple(_redacted_frame(a) if isinstance(a, Frame) else a for a in args)
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

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: the message is escaped; a traceback (appended after) stays multi-line.
        record.message = escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = getattr(record, "fields", None)
        if extra:
            fields = " " + " ".join(f"{k}={v}" for k, v in extra.items())
            head, nl, tail = base.partition("\n")
            base = head + escape(fields) + nl + tail
        return base


class NodeTag(logging.Filter):
    """Names the worker a line comes from (``wsd[host-w1]``): the workers of `wsd serve --workers` share stderr."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.suffix = f"[{node}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def setup(level: str = "info", fmt: str = "text", stream: object = None, node: str = "") -> None:
    """Configure the root logger once: one stderr handler, redacting, text or JSON (``node``: a worker's tag)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_wsd", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._wsd = True  # type: ignore[attr-defined]
    handler.addFilter(RedactingFilter())
    if node:
        handler.addFilter(NodeTag(node))
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
