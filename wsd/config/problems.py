"""Configuration errors: ``ConfigError`` and the collector that gathers every problem with its key path.

Loading collects every problem as ``"dotted.key.path: what is wrong"`` before raising, so one
``wsd config check`` run shows them all.
"""

import json
import re
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one ``"key.path: problem"`` line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch only


class _Invalid:
    """The value of a key that did not convert; it never reaches a built Config."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()


class Problems:
    """Every problem found, with the key paths that had structural (type / unknown key) errors."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.structural: list[str] = []
        self.env_origin: dict[str, str] = {}  # key path -> environment variable that set it
        self.replaced: set[str] = set()  # keys whose bad value was replaced by a default or dropped

    def structure(self, path: str, message: str) -> None:
        self.items.append((path, message))
        self.structural.append(path)

    def add(self, path: str, message: str) -> None:
        """A semantic error; dropped when the same key (or a parent) already has a structural error."""
        for bad in self.structural:
            if under(path, bad):
                return
        self.items.append((path, message))

    def intact(self, key: str) -> bool:
        """True when the table at ``key`` holds every entry the user wrote (none dropped or defaulted)."""
        return key not in self.replaced

    def lines(self) -> list[str]:
        out = []
        for path, message in self.items:
            line = f"{path}: {message}" if path else message
            for key, var in self.env_origin.items():
                if under(path, key):
                    line += f" (from {var})"
                    break
            out.append(line)
        return out


def under(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or a key inside it."""
    return path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "[") or not prefix


def key_path(path: str, key: str) -> str:
    """``path.key``, with ``key`` quoted when it is not a bare TOML key."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


def show_value(value: Any) -> str:
    """A value as an error message shows it: TOML-like and at most 60 characters."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (str, int, float, list)):
        text = json.dumps(value, default=str, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {value}"


def read_text(errs: Problems, path: str, file: str) -> str | None:
    """The text of ``file`` named by key ``path``, or None after recording why it cannot be read."""
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        errs.add(path, f"cannot read {json.dumps(file)}: {reason}")
        return None
