"""``WSD_<SECTION>_<KEY>`` environment overrides, written into the raw TOML tables before conversion."""

import tomllib
import typing
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from wsd.config.convert import is_struct, unwrap
from wsd.config.model import Config
from wsd.config.problems import Problems, key_path

# Top-level sections that WSD_<SECTION>_<KEY> may override.
ENV_SECTIONS = ("manager", "server", "control", "auth", "limits", "engine", "audit", "http", "log")
# Sections that are tables of named entries, not settable from the environment.
NO_ENV_SECTIONS = ("pools", "channels", "routing", "encryption")


def _env_value(tp: Any, text: str) -> Any:
    """An environment string as a value for ``tp``: TOML when it parses, else the plain string."""
    tp = unwrap(tp)
    try:
        parsed: Any = tomllib.loads(f"v = {text}")["v"]
        parses = True
    except tomllib.TOMLDecodeError:
        parsed, parses = text, False
    if parses and ("\n" in text or "\r" in text or ("#" in text and not isinstance(parsed, (str, list)))):
        # "0#x" would parse as 0 with a comment: a value from the environment is taken whole or not at all.
        parsed, parses = text, False
    if tp is str or typing.get_origin(tp) is Literal:
        # A secret or a host name that happens to look like a number stays a string.
        return parsed if parses and isinstance(parsed, str) else text
    if typing.get_origin(tp) is list and not (parses and isinstance(parsed, list)):
        return [part.strip() for part in text.split(",") if part.strip()]
    return parsed


def apply_env(raw: dict[str, Any], env: Mapping[str, str], errs: Problems) -> None:
    """Write ``WSD_<SECTION>_<KEY>`` overrides into the raw TOML tables."""
    field_types = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for var in sorted(env):
        if not var.startswith("WSD_"):
            continue
        section, _, rest = var[4:].lower().partition("_")
        if section in NO_ENV_SECTIONS:
            errs.structure(var, f"[{section}] cannot be set from the environment; use the config file")
            continue
        if section not in ENV_SECTIONS or not rest:
            continue  # WSD_SOCKET (wsctl) and other names that are not config overrides
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # "section: expected table" is reported by the conversion
        cls = field_types[section]
        path = section
        while True:
            fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
            scalar = fields.get(rest)
            if scalar is not None and not is_struct(scalar):
                table[rest] = _env_value(scalar, env[var])
                errs.env_origin[key_path(path, rest)] = var
                break
            nested = next((n for n, t in fields.items() if is_struct(t) and rest.startswith(n + "_")), None)
            if nested is None or not isinstance(table.setdefault(nested, {}), dict):
                errs.structure(var, f"unknown setting: {key_path(path, rest)} is not a config key")
                break
            cls, table, path, rest = fields[nested], table[nested], key_path(path, nested), rest[len(nested) + 1:]
    # A secret from the environment replaces the file's secret source rather than clashing with it.
    auth = raw.get("auth")
    if isinstance(auth, dict):
        for mine, other in (("secret", "secret_file"), ("secret_file", "secret")):
            if f"auth.{mine}" in errs.env_origin and f"auth.{other}" not in errs.env_origin:
                auth.pop(other, None)
