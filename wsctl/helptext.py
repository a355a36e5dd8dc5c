"""`--help` in words: value placeholders like TEXT, N, PATH instead of Python type names.

Typer's rich help shows each option's Python type (``<str>``, ``<bool>`` on every flag,
``<list[str]>``, ``<int range> [x>=0]``). ``readable_help()`` replaces those with the placeholders
people expect from command-line tools: flags show nothing, ``TEXT``, ``N``, ``NUMBER``, ``PATH``,
``ID...`` for repeated arguments, choices as ``a|b|c``. Options and arguments that set a metavar keep
it. ``bad_value`` words a refused option value the same way (``--priority: one of critical, high,
normal, low``) instead of the validation library's message. Used by both ``wsctl`` and ``wsd``; it
only imports typer.
"""

from __future__ import annotations

import re
from typing import Any

import typer.core as _core

_WORDS = {
    "str": "TEXT",
    "int": "N",
    "int range": "N",
    "float": "NUMBER",
    "float range": "NUMBER",
    "path": "PATH",
    "file": "FILE",
    "directory": "DIR",
    "datetime": "TIME",
}


def placeholder(typer_label: str | None) -> str | None:
    """Typer's ``<type>`` label -> a placeholder (``None`` for a flag)."""
    if not typer_label:
        return typer_label
    label = typer_label.strip("<>")
    many = label.startswith("list[") and label.endswith("]")
    if many:
        label = label[5:-1]
    if label == "bool":
        return None
    word = _WORDS.get(label, label if "|" in label else label.upper())
    return word + ("..." if many else "")


def readable_help() -> None:
    """Make typer's help show placeholders instead of Python types (idempotent)."""
    if getattr(_core, "_readable_help", False):
        return
    base_display = _core._TyperParameter.display_type_rich
    opt_display = _core.TyperOption.display_type_rich

    def arg_display(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None:
            return None  # the metavar is already the argument's name in the first column
        return placeholder(base_display(self, ctx))

    def option_display(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None:
            return str(self.metavar)
        if self.is_flag:
            return None
        return placeholder(opt_display(self, ctx))

    _core._TyperParameter.display_type_rich = arg_display  # type: ignore[method-assign]
    _core.TyperOption.display_type_rich = option_display  # type: ignore[method-assign]
    # "[x>=0]" after a count: the help text says what the number is
    _core.TyperOption._get_number_range_help_str = lambda self: None  # type: ignore[method-assign]
    _core.TyperArgument._get_number_range_help_str = lambda self: None  # type: ignore[method-assign]
    _core._readable_help = True  # type: ignore[attr-defined]


def bad_value(exc: Any) -> str | None:
    """A refused value (typer's ``BadParameter``) in words: ``--limit: a whole number, at least 0``.

    ``None`` when the error is not about one parameter (the caller keeps typer's message).
    """
    p = getattr(exc, "param", None)
    if p is None:
        return None
    opts = [o for o in getattr(p, "opts", []) if o.startswith("-")]
    name = max(opts, key=len) if opts else str(p.metavar or p.name or "value").upper()
    if type(exc).__name__ == "MissingParameter":  # typer may vendor click: match by name; it has no message
        return f"{name}: required"
    desc = getattr(p, "type_descriptor", None)
    choices = getattr(desc, "choices", None)
    if choices:
        return f"{name}: one of {', '.join(str(getattr(c, 'value', c)) for c in choices)}"
    if getattr(exc, "__cause__", None) is None:  # our own parser's message (durations, ...)
        return f"{name}: {exc.message}"
    kind = getattr(desc, "annotation", None)
    what = {int: "a whole number", float: "a number"}.get(kind)
    if what is None:
        return f"{name}: " + re.sub(r"^(Value error|Assertion failed), ", "", str(exc.message))
    lo, hi = getattr(p, "min", None), getattr(p, "max", None)
    bounds = [f"at least {lo}" if lo is not None else "", f"at most {hi}" if hi is not None else ""]
    return f"{name}: " + ", ".join([what, *[b for b in bounds if b]])
