"""Conversion of TOML tables into the model's Structs, reporting every bad key with its key path.

msgspec's own conversion stops at the first error; this one walks the whole table so that one
``wsd config check`` run shows every problem, and suggests the closest key for an unknown one.
"""

import difflib
import json
import types
import typing
from typing import Any, Literal

import msgspec

from wsd.config.model import NOT_TOML, TargetConfig
from wsd.config.problems import INVALID, Problems, key_path, show_value

_TYPE_NAMES: dict[Any, str] = {int: "int", float: "number", bool: "bool", str: "string"}


def is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def unwrap(tp: Any) -> Any:
    """``X`` for ``X | None``; any other type unchanged."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _convert(tp: Any, value: Any, path: str, errs: Problems) -> Any:
    """``value`` (from TOML) as ``tp``, or INVALID after recording why; reports every bad key."""
    if is_struct(tp):
        return convert_struct(tp, value, path, errs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, errs)  # TOML has no null: only the non-None arm applies
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(json.dumps(a) for a in args)
        errs.structure(path, f"expected one of {choices}, got {show_value(value)}")
        return INVALID
    if origin is list:
        if not isinstance(value, list):
            errs.structure(path, f"expected array, got {show_value(value)}")
            return INVALID
        items = [_convert(args[0], v, f"{path}[{i}]", errs) for i, v in enumerate(value)]
        # A bad element becomes None (never in a returned Config: its error is recorded), so the
        # semantic checks still see the good ones at their own index.
        return [None if v is INVALID else v for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            errs.structure(path, f"expected table, got {show_value(value)}")
            return INVALID
        out = {}
        for k, v in value.items():
            got = _convert(args[1], v, key_path(path, k), errs)
            if got is INVALID:
                errs.replaced.add(path)
            else:
                out[k] = got
        return out
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    name = _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))
    errs.structure(path, f"expected {name}, got {show_value(value)}")
    return INVALID


def convert_struct(cls: type[msgspec.Struct], value: Any, path: str, errs: Problems) -> Any:
    """The table ``value`` as ``cls``; a bad key is recorded and its default (or a stand-in) used."""
    if not isinstance(value, dict):
        errs.structure(path, f"expected table, got {show_value(value)}")
        return INVALID
    skip = NOT_TOML.get(cls, frozenset())
    fields = [f for f in msgspec.structs.fields(cls) if f.name not in skip]
    names = [f.name for f in fields]
    for key in value:
        if key not in names:
            what = "unknown section" if not path else "unknown key"
            close = difflib.get_close_matches(key, names, n=1)
            errs.structure(key_path(path, key), what + (f' (did you mean "{close[0]}"?)' if close else ""))
    kwargs: dict[str, Any] = {}
    for f in fields:
        sub = key_path(path, f.name)
        got = INVALID
        if f.name in value:
            got = _convert(f.type, value[f.name], sub, errs)
            if got is INVALID:
                errs.replaced.add(sub)
        if got is INVALID:
            if f.default is not msgspec.NODEFAULT:
                got = f.default
            elif f.default_factory is not msgspec.NODEFAULT:
                got = f.default_factory()
            else:
                if f.name not in value:
                    errs.structure(sub, "required key missing")
                got = _placeholder(cls, f.name, f.type)
        kwargs[f.name] = got
    return cls(**kwargs)


# Stand-ins for a required key that is missing or wrong, chosen so they trigger no semantic check
# of their own (the key's error is already recorded, so the Config is never returned).
_PLACEHOLDERS: dict[tuple[type, str], Any] = {(TargetConfig, "type"): "channel"}


def _placeholder(cls: type, name: str, tp: Any) -> Any:
    if (cls, name) in _PLACEHOLDERS:
        return _PLACEHOLDERS[(cls, name)]
    tp = unwrap(tp)
    if is_struct(tp):
        return tp(**{f.name: _placeholder(tp, f.name, f.type) for f in msgspec.structs.fields(tp)
                     if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT})
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)[0]
    if tp in (str, int, float, bool):
        return tp()
    return (typing.get_origin(tp) or dict)()
