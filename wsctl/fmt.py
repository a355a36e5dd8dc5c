"""Numbers, units and outside text as operators read them: one module for every wsctl view and `wsctl top`.

Units: counts ``1.2k``, rates ``1.2k msg/s``, sizes in binary units ``54.0 MiB``, durations ``3m12s``,
latencies ``4.2 ms``, ratios ``1.5%``. ``plain`` makes text that came from outside the daemon (client
filter types, message types, close reasons, ids, claims, event fields) safe to draw: control
characters are shown escaped (``\\x1b``, ``\\n``), and callers put the result in a ``rich.text.Text``
so markup such as ``[bold]`` or ``[/x]`` is shown literally, never interpreted.
"""

from __future__ import annotations

import datetime as _dt
import json
import unicodedata
from typing import Any

from rich.text import Text

# -------------------------------------------------------------------------------------------- outside text

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# bidirectional overrides and isolates reorder what follows them on screen
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def plain(value: Any) -> str:
    """Any value as one line of inert text: control and bidi characters escaped (ESC -> ``\\x1b``)."""
    s = value if isinstance(value, str) else str(value)
    if s.isprintable():
        return s
    return "".join(
        _escape_char(ch)
        if (unicodedata.category(ch) == "Cc" or ch in _BIDI or ch in ("\u2028", "\u2029"))
        else ch
        for ch in s
    )


def text(value: Any, style: str = "") -> Text:
    """``plain(value)`` as a rich ``Text``: drawn literally, markup never parsed."""
    return Text(plain(value), style=style)


def words(value: Any) -> str:
    """A value a person reads: yes/no for booleans, ``a, b`` for lists, ``-`` for nothing; escaped."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(plain(x) for x in value) if value else "none"
    if isinstance(value, dict):
        return plain(compact_json(value)) if value else "-"
    if isinstance(value, float):
        return str(value).removesuffix(".0")
    return plain(value)


def compact_json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=str)


# ------------------------------------------------------------------------------------------------ numbers


def number(x: Any) -> float | None:
    """``x`` as a float, or None for nothing (None, a bool, text that is no number): shown as ``-``."""
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def count(n: Any) -> str:
    """1234 -> 1.2k, 1234567 -> 1.2M; small numbers as they are; ``-`` for nothing."""
    v = number(n)
    if v is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            x = v / div
            out = f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"
            return out.removesuffix(".0") + suffix
    if v == int(v):
        return str(int(v))
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def rate(per_s: Any, unit: str = "msg/s") -> str:
    """1234.5 -> '1.2k msg/s' (``unit=""``: the number only)."""
    if per_s is None:
        return "-"
    return f"{count(per_s)} {unit}" if unit else count(per_s)


def size(n: Any) -> str:
    """Bytes in binary units with one decimal: 512 -> '512 B', 1536 -> '1.5 KiB', 56623104 -> '54.0 MiB'."""
    v = number(n)
    if v is None:
        return "-"
    if abs(v) < 1024:
        return f"{int(v)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        v /= 1024
        if abs(v) < 1024 or unit == "TiB":
            break
    return f"{v:.1f} {unit}"


def duration(s: Any) -> str:
    """Seconds as the two largest units: 4.2 -> '4.2s', 192 -> '3m12s', 7500 -> '2h05m', 266400 -> '3d02h'."""
    v = number(s)
    if v is None:
        return "-"
    f = max(0.0, v)
    if f < 10 and f != int(f):
        return f"{f:.1f}s"
    n = int(f)
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


def ms(x: Any) -> str:
    """A latency in milliseconds: 0.42 -> '0.4 ms', 42 -> '42 ms', 1500 -> '1.50 s'."""
    v = number(x)
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    if v >= 10:
        return f"{v:.0f} ms"
    return f"{v:.1f} ms"


def percent(x: Any) -> str:
    """A ratio (0..1) as a percentage: 0.015 -> '1.5%'."""
    v = number(x)
    return "-" if v is None else f"{v * 100:.1f}%"


def cpu(x: Any) -> str:
    """A CPU percentage as the daemon reports it (already 0..100 per core)."""
    try:
        return f"{float(x or 0):.1f}%"
    except (TypeError, ValueError):
        return "-"


def local_time(ts: Any, with_date: bool = True, millis: bool = True, tz: _dt.tzinfo | None = None) -> str:
    """A Unix time as local (or ``tz``) wall-clock text."""
    if not ts or isinstance(ts, bool):
        return "-"
    try:
        t = _dt.datetime.fromtimestamp(float(ts), tz)
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"
    out = t.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")
    return f"{out}.{t.microsecond // 1000:03d}" if millis else out


# field names in events and replies -> the words shown to operators
LABELS = {
    "age_s": "age",
    "msgs_in": "in",
    "msgs_out": "out",
    "user_id": "user",
    "company_id": "company",
    "latency_ms": "latency",
    "bytes_out": "bytes out",
    "bytes_in": "bytes in",
    "remote_address": "address",
    "connection_id": "connection",
    "restart_required": "restart required",
    "ttl_s": "ttl",
}


def label(key: str) -> str:
    """A field name as words: ``age_s`` -> ``age``, ``close_reason`` -> ``close reason``."""
    return LABELS.get(key) or key.replace("_", " ")
