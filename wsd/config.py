"""The typed configuration of wsd: the model, the TOML loader, ``WSD_*`` overrides and validation.

This module owns every configuration key, its default and its checks. Loading collects every
problem as ``"dotted.key.path: what is wrong"`` before raising :class:`ConfigError`, so one
``wsd config check`` run shows them all; unknown keys are errors, never silently ignored.

Order of precedence: built-in defaults < the TOML file < ``WSD_<SECTION>_<KEY>`` environment variables.
"""

import difflib
import ipaddress
import json
import os
import re
import secrets
import ssl
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
import tomli_w

__all__ = [
    "REDACTED",
    "AuditConfig",
    "AuthConfig",
    "BatchingConfig",
    "ChannelConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "EngineConfig",
    "FilterConfig",
    "HttpConfig",
    "LimitsConfig",
    "LogConfig",
    "ManagerConfig",
    "PoolConfig",
    "RoutingConfig",
    "RuleConfig",
    "ServerConfig",
    "TargetConfig",
    "TransformConfig",
    "config_to_dict",
    "default_channels",
    "default_config_toml",
    "default_pools",
    "dump_config",
    "load_config",
    "resolved_private_key",
    "resolved_public_key",
    "resolved_secret",
]

REDACTED = "***redacted***"

PoolType = Literal["frontend", "mt5_client", "admin", "api"]
ChannelType = Literal["user", "company", "global", "admin"]
TargetType = Literal["individual", "group", "broadcast", "filtered", "channel"]


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one ``"key.path: problem"`` line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------------------------- model


class CompressionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server_max_window_bits: int = 12
    client_max_window_bits: int = 12
    memory_level: int = 5
    compress_min_bytes: int = 128


class ManagerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    manager_id: str = "ws-manager-v1"
    max_connections: int = 10000
    connection_timeout_ms: int = 300000
    heartbeat_interval_ms: int = 30000
    missed_pongs_allowed: int = 3
    message_buffer_size: int = 1000
    enable_compression: bool = False
    compression: CompressionConfig = msgspec.field(default_factory=CompressionConfig)
    drain_timeout_ms: int = 5000
    slow_consumer_timeout_ms: int = 5000
    write_high_water_bytes: int = 65536
    socket_send_buffer_bytes: int = 0
    coalesce_window_ms: int = 5
    coalesce_max_messages: int = 256
    session_ttl_s: int = 300
    health_error_rate: float = 0.05
    breaker_failure_threshold: int = 3
    breaker_cooldown_ms: int = 1000
    overflow_close_count: int = 100


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert: str = ""
    tls_key: str = ""
    max_message_bytes: int = 65536
    allowed_origins: list[str] = []
    backlog: int = 4096


class ControlConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    socket: str = ""


# ``dict=True`` lets the loader keep the key material it read from files on the instance
# without making it a TOML key (see resolved_secret / resolved_public_key).
class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    secret: str = ""
    secret_file: str = ""
    public_key_file: str = ""
    private_key_file: str = ""
    issuer: str = ""
    audience: str = ""
    leeway_s: int = 30
    max_token_bytes: int = 4096
    user_claim: str = "sub"
    company_claim: str = "company_id"
    roles_claim: str = "roles"
    pool_claim: str = "pool"
    admin_role: str = "admin"
    token_ttl_s: int = 3600


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    connections_per_user_per_minute: int = 60
    connections_per_ip_per_minute: int = 600
    max_connections_per_user: int = 20
    messages_per_connection_per_second: int = 50
    message_burst: int = 100
    max_subscriptions_per_connection: int = 100
    max_filter_types: int = 64
    max_filter_type_length: int = 128
    max_session_bytes: int = 65536
    max_sessions_per_user: int = 20
    max_sessions: int = 100000
    max_sessions_bytes: int = 268435456
    max_history_channels: int = 10000
    history_max_messages: int = 500
    history_max_bytes: int = 524288
    max_json_depth: int = 32
    handshakes_in_progress_per_ip: int = 128
    handshakes_in_progress: int = 2048


class BatchingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_ms: int = 50
    max_messages: int = 100


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: PoolType
    path: str
    max_connections: int = 10000
    allow_cidrs: list[str] = []
    allowed_origins: list[str] | None = None
    roles: list[str] = []
    default_subscriptions: list[str] = []
    compression: bool | None = None
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)


class ChannelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    type: ChannelType
    name: str = ""
    history_size: int = 100
    history_ttl_s: int = 3600
    publishers: list[str] = []
    # A JSON Schema that published ``data`` must satisfy: inline, or a JSON file (not both).
    data_schema: dict[str, Any] | None = None
    data_schema_file: str = ""


class FilterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    message_types: list[str] = []
    channels: list[str] = []
    user_ids: list[str] = []
    company_ids: list[str] = []
    expression: str = ""


class TargetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: TargetType
    connection_ids: list[str] = []
    group_id: str = ""
    pools: list[str] = []
    company_ids: list[str] = []
    reliable_delivery: bool = False
    max_retries: int = 0
    ack_timeout_ms: int = 2000


class TransformConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_fields: list[str] = []
    exclude_fields: list[str] = []
    rename: dict[str, str] = {}
    set: dict[str, Any] = {}


class RuleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    priority: int = 0
    enabled: bool = True
    stop: bool = False
    filter: FilterConfig = msgspec.field(default_factory=FilterConfig)
    target: TargetConfig
    transform: TransformConfig = msgspec.field(default_factory=TransformConfig)
    pool_transforms: dict[str, TransformConfig] = {}


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rules: list[RuleConfig] = []


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["memory", "redis"] = "memory"
    url: str = ""
    prefix: str = "wsd"


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""
    max_bytes: int = 10485760
    backups: int = 5


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    metrics_allow: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    repeat_summary_interval_s: int = 10


def default_pools() -> dict[str, PoolConfig]:
    """The four built-in pools, used when the config file has no ``[pools]``."""
    return {
        "frontend": PoolConfig(type="frontend", path="/ws/frontend", default_subscriptions=["system-status"]),
        "mt5": PoolConfig(type="mt5_client", path="/ws/mt5", allowed_origins=[], compression=False,
                          batching=BatchingConfig(enabled=False)),
        "admin": PoolConfig(type="admin", path="/ws/admin", roles=["admin"]),
        "api": PoolConfig(type="api", path="/ws/api"),
    }


def default_channels() -> dict[str, ChannelConfig]:
    """The built-in channel groups, used when the config file has no ``[channels]``."""
    return {
        "system-status": ChannelConfig(type="global", name="System status", publishers=["admin"]),
        "trading-signals": ChannelConfig(type="company", name="Trading signals",
                                         publishers=["mt5", "api", "admin"]),
        "notifications": ChannelConfig(type="user", name="Notifications", publishers=["api", "admin"]),
        "admin-events": ChannelConfig(type="admin", name="Admin events", publishers=["admin"]),
    }


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    manager: ManagerConfig = msgspec.field(default_factory=ManagerConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    pools: dict[str, PoolConfig] = msgspec.field(default_factory=default_pools)
    channels: dict[str, ChannelConfig] = msgspec.field(default_factory=default_channels)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    source_path: str = ""


# Fields of the model that are not TOML keys (set by the loader).
_NOT_TOML: dict[type, frozenset[str]] = {Config: frozenset({"source_path"})}
# Top-level sections that WSD_<SECTION>_<KEY> may override.
_ENV_SECTIONS = ("manager", "server", "control", "auth", "limits", "engine", "audit", "http", "log")
# Sections that are tables of named entries, not settable from the environment.
_NO_ENV_SECTIONS = ("pools", "channels", "routing")
# File paths in the config; a relative one is taken relative to the config file's directory.
_PATH_KEYS = (("server", "tls_cert"), ("server", "tls_key"), ("auth", "secret_file"),
              ("auth", "public_key_file"), ("auth", "private_key_file"), ("audit", "path"),
              ("control", "socket"))

_HS_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512",
               "EdDSA")
_RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")
_POOL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch only
_CHANNEL_ID = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")  # one channel-instance segment, no "/"; fullmatch only
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch only


# ------------------------------------------------------------------------------------ error collection


class _Invalid:
    """The value of a key that did not convert; it never reaches a built Config."""

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Any = _Invalid()


class _Errors:
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
            if _under(path, bad):
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
                if _under(path, key):
                    line += f" (from {var})"
                    break
            out.append(line)
        return out


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "[") or not prefix


def _key(path: str, key: str) -> str:
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (str, int, float, list)):
        text = json.dumps(value, default=str, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {value}"


_TYPE_NAMES: dict[Any, str] = {int: "int", float: "number", bool: "bool", str: "string"}


# ------------------------------------------------------------------------------------- conversion


def _convert(tp: Any, value: Any, path: str, errs: _Errors) -> Any:
    """``value`` (from TOML) as ``tp``, or _INVALID after recording why; reports every bad key."""
    if _is_struct(tp):
        return _convert_struct(tp, value, path, errs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, errs)  # TOML has no null: only the non-None arm applies
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(json.dumps(a) for a in args)
        errs.structure(path, f"expected one of {choices}, got {_show(value)}")
        return _INVALID
    if origin is list:
        if not isinstance(value, list):
            errs.structure(path, f"expected array, got {_show(value)}")
            return _INVALID
        items = [_convert(args[0], v, f"{path}[{i}]", errs) for i, v in enumerate(value)]
        # A bad element becomes None (never in a returned Config: its error is recorded), so the
        # semantic checks still see the good ones at their own index.
        return [None if v is _INVALID else v for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            errs.structure(path, f"expected table, got {_show(value)}")
            return _INVALID
        out = {}
        for k, v in value.items():
            got = _convert(args[1], v, _key(path, k), errs)
            if got is _INVALID:
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
    errs.structure(path, f"expected {name}, got {_show(value)}")
    return _INVALID


def _convert_struct(cls: type[msgspec.Struct], value: Any, path: str, errs: _Errors) -> Any:
    if not isinstance(value, dict):
        errs.structure(path, f"expected table, got {_show(value)}")
        return _INVALID
    skip = _NOT_TOML.get(cls, frozenset())
    fields = [f for f in msgspec.structs.fields(cls) if f.name not in skip]
    names = [f.name for f in fields]
    for key in value:
        if key not in names:
            what = "unknown section" if not path else "unknown key"
            close = difflib.get_close_matches(key, names, n=1)
            errs.structure(_key(path, key), what + (f' (did you mean "{close[0]}"?)' if close else ""))
    kwargs: dict[str, Any] = {}
    for f in fields:
        sub = _key(path, f.name)
        got = _INVALID
        if f.name in value:
            got = _convert(f.type, value[f.name], sub, errs)
            if got is _INVALID:
                errs.replaced.add(sub)
        if got is _INVALID:
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
    tp = _unwrap(tp)
    if _is_struct(tp):
        return tp(**{f.name: _placeholder(tp, f.name, f.type) for f in msgspec.structs.fields(tp)
                     if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT})
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)[0]
    if tp in (str, int, float, bool):
        return tp()
    return (typing.get_origin(tp) or dict)()


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


# ------------------------------------------------------------------------------------ environment


def _unwrap(tp: Any) -> Any:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _env_value(tp: Any, text: str) -> Any:
    """An environment string as a value for ``tp``: TOML when it parses, else the plain string."""
    tp = _unwrap(tp)
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


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], errs: _Errors) -> None:
    """Write ``WSD_<SECTION>_<KEY>`` overrides into the raw TOML tables."""
    field_types = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for var in sorted(env):
        if not var.startswith("WSD_"):
            continue
        section, _, rest = var[4:].lower().partition("_")
        if section in _NO_ENV_SECTIONS:
            errs.structure(var, f"[{section}] cannot be set from the environment; use the config file")
            continue
        if section not in _ENV_SECTIONS or not rest:
            continue  # WSD_SOCKET (wsctl) and other names that are not config overrides
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # "section: expected table" is reported by the conversion
        cls = field_types[section]
        path = section
        while True:
            fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
            scalar = fields.get(rest)
            if scalar is not None and not _is_struct(scalar):
                table[rest] = _env_value(scalar, env[var])
                errs.env_origin[_key(path, rest)] = var
                break
            nested = next((n for n, t in fields.items() if _is_struct(t) and rest.startswith(n + "_")), None)
            if nested is None or not isinstance(table.setdefault(nested, {}), dict):
                errs.structure(var, f"unknown setting: {_key(path, rest)} is not a config key")
                break
            cls, table, path, rest = fields[nested], table[nested], _key(path, nested), rest[len(nested) + 1:]
    # A secret from the environment replaces the file's secret source rather than clashing with it.
    auth = raw.get("auth")
    if isinstance(auth, dict):
        for mine, other in (("secret", "secret_file"), ("secret_file", "secret")):
            if f"auth.{mine}" in errs.env_origin and f"auth.{other}" not in errs.env_origin:
                auth.pop(other, None)


# ---------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """The effective config: defaults, then the TOML file at ``path`` (if any), then ``WSD_*`` overrides.

    Raises ConfigError listing every problem found. ``env=None`` reads ``os.environ``.
    """
    env = os.environ if env is None else env
    errs = _Errors()
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = os.path.abspath(os.fspath(path))
        shown = os.fspath(path)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{shown}: not UTF-8 text (byte {exc.start})"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{shown}: TOML syntax error: {exc}"]) from None
    file_keys = {(s, k) for s, k in _PATH_KEYS if isinstance(raw.get(s), dict) and raw[s].get(k)}
    _apply_env(raw, env, errs)
    if "pools" in raw and raw["pools"] == {}:
        errs.structure("pools", "at least one pool is required (leave [pools] out for the built-in ones)")
    cfg = _convert_struct(Config, raw, "", errs)
    if not isinstance(cfg, Config):  # cannot happen: tomllib always returns a table
        raise ConfigError(errs.lines())
    cfg.source_path = source
    base = os.path.dirname(source) if source else os.getcwd()
    for section, key in _PATH_KEYS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value:
            value = os.path.expanduser(value)
            from_env = _key(section, key) in errs.env_origin
            root = base if (section, key) in file_keys and not from_env else os.getcwd()
            setattr(obj, key, os.path.normpath(os.path.join(root, value)))
    for ch in cfg.channels.values():  # [channels.<id>] data_schema_file: relative to the config file too
        if isinstance(ch, ChannelConfig) and ch.data_schema_file:
            ch.data_schema_file = os.path.normpath(os.path.join(base, os.path.expanduser(ch.data_schema_file)))
    _validate(cfg, errs, from_file=path is not None, raw=raw)
    if errs.items:
        raise ConfigError(errs.lines())
    return cfg


# ------------------------------------------------------------------------------------- validation


def _validate(cfg: Config, errs: _Errors, *, from_file: bool, raw: dict[str, Any]) -> None:
    _check_manager(cfg.manager, errs)
    _check_server(cfg.server, errs)
    _check_auth(cfg.auth, errs, from_file=from_file)
    for key in msgspec.structs.fields(LimitsConfig):
        _at_least(errs, f"limits.{key.name}", getattr(cfg.limits, key.name), 1)
    _between(errs, "limits.max_json_depth", cfg.limits.max_json_depth, 2, 512)
    _at_least(errs, "log.repeat_summary_interval_s", cfg.log.repeat_summary_interval_s, 1)
    _check_channels(cfg.channels, errs)
    _check_pools(cfg, errs, pools_from_file="pools" in raw)
    _check_routing(cfg, errs)
    _check_engine(cfg.engine, errs)
    _at_least(errs, "audit.max_bytes", cfg.audit.max_bytes, 1024)
    _at_least(errs, "audit.backups", cfg.audit.backups, 0)
    for i, cidr in enumerate(cfg.http.metrics_allow):
        _check_cidr(errs, f"http.metrics_allow[{i}]", cidr)


def _at_least(errs: _Errors, path: str, value: Any, low: float) -> None:
    if isinstance(value, (int, float)) and value < low:
        errs.add(path, f"must be at least {low}, got {value}")


def _between(errs: _Errors, path: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, (int, float)) and not low <= value <= high:
        errs.add(path, f"must be between {low} and {high}, got {value}")


def _check_cidr(errs: _Errors, path: str, value: Any) -> None:
    if not isinstance(value, str):
        return
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        errs.add(path, f"not an IP network (CIDR), got {_show(value)}")


def _check_origins(errs: _Errors, path: str, origins: list[str] | None) -> None:
    for i, origin in enumerate(origins or []):
        if isinstance(origin, str) and origin != "*" and "://" not in origin:
            errs.add(f"{path}[{i}]", f'an origin is "*" or scheme://host[:port], got {_show(origin)}')


def _check_manager(m: ManagerConfig, errs: _Errors) -> None:
    if not m.manager_id:
        errs.add("manager.manager_id", "must not be empty")
    _at_least(errs, "manager.max_connections", m.max_connections, 1)
    _at_least(errs, "manager.connection_timeout_ms", m.connection_timeout_ms, 1000)
    _at_least(errs, "manager.heartbeat_interval_ms", m.heartbeat_interval_ms, 100)
    _at_least(errs, "manager.missed_pongs_allowed", m.missed_pongs_allowed, 1)
    _at_least(errs, "manager.message_buffer_size", m.message_buffer_size, 1)
    _at_least(errs, "manager.drain_timeout_ms", m.drain_timeout_ms, 0)
    _at_least(errs, "manager.slow_consumer_timeout_ms", m.slow_consumer_timeout_ms, 1)
    _at_least(errs, "manager.write_high_water_bytes", m.write_high_water_bytes, 1024)
    _at_least(errs, "manager.socket_send_buffer_bytes", m.socket_send_buffer_bytes, 0)
    _at_least(errs, "manager.coalesce_window_ms", m.coalesce_window_ms, 0)
    _at_least(errs, "manager.coalesce_max_messages", m.coalesce_max_messages, 2)
    _at_least(errs, "manager.session_ttl_s", m.session_ttl_s, 0)
    _between(errs, "manager.health_error_rate", m.health_error_rate, 0.0, 1.0)
    _at_least(errs, "manager.breaker_failure_threshold", m.breaker_failure_threshold, 1)
    _at_least(errs, "manager.breaker_cooldown_ms", m.breaker_cooldown_ms, 1)
    _at_least(errs, "manager.overflow_close_count", m.overflow_close_count, 1)
    c = m.compression
    _between(errs, "manager.compression.server_max_window_bits", c.server_max_window_bits, 9, 15)
    _between(errs, "manager.compression.client_max_window_bits", c.client_max_window_bits, 9, 15)
    _between(errs, "manager.compression.memory_level", c.memory_level, 1, 9)
    _at_least(errs, "manager.compression.compress_min_bytes", c.compress_min_bytes, 0)


def _check_server(s: ServerConfig, errs: _Errors) -> None:
    if not s.host:
        errs.add("server.host", "must not be empty")
    _between(errs, "server.port", s.port, 0, 65535)
    _at_least(errs, "server.max_message_bytes", s.max_message_bytes, 1)
    _at_least(errs, "server.backlog", s.backlog, 1)
    _check_origins(errs, "server.allowed_origins", s.allowed_origins)
    if bool(s.tls_cert) != bool(s.tls_key):
        have, missing = ("tls_cert", "tls_key") if s.tls_cert else ("tls_key", "tls_cert")
        errs.add(f"server.{missing}", f"required when server.{have} is set (give both or neither)")
    present = True
    for key in ("tls_cert", "tls_key"):
        file = getattr(s, key)
        if file and not (os.path.isfile(file) and os.access(file, os.R_OK)):
            errs.add(f"server.{key}", f"cannot read {json.dumps(file)}: no such readable file")
            present = False
    if s.tls_cert and s.tls_key and present:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                s.tls_cert, s.tls_key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            errs.add("server.tls_cert", f"certificate and key do not load as a pair: {exc}")


def _read_text(errs: _Errors, path: str, file: str) -> str | None:
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        errs.add(path, f"cannot read {json.dumps(file)}: {reason}")
        return None


def _check_auth(a: AuthConfig, errs: _Errors, *, from_file: bool) -> None:
    algs = [x for x in a.algorithms if isinstance(x, str)]
    if not a.algorithms:
        errs.add("auth.algorithms", 'must name at least one algorithm, e.g. ["HS256"]')
    known = True
    for i, alg in enumerate(algs):
        if alg.lower() == "none":
            errs.add(f"auth.algorithms[{i}]", '"none" is never allowed: it accepts unsigned tokens')
            known = False
        elif alg not in _HS_MIN_BYTES and alg not in _ASYMMETRIC:
            errs.add(f"auth.algorithms[{i}]", f"unknown algorithm {json.dumps(alg)}; expected one of "
                     + ", ".join([*_HS_MIN_BYTES, *_ASYMMETRIC]))
            known = False
    hmac = [x for x in algs if x in _HS_MIN_BYTES]
    asym = [x for x in algs if x in _ASYMMETRIC]
    if hmac and asym:
        errs.add("auth.algorithms", f"mixes HMAC ({', '.join(hmac)}) with public-key ({', '.join(asym)}) "
                 "algorithms; a public key must never be accepted as an HMAC secret: pick one family")
        return
    if not known or not algs:
        return
    if a.secret and a.secret_file:
        errs.add("auth.secret_file", "set auth.secret or auth.secret_file, not both")
        return
    a._secret_material = ""  # type: ignore[attr-defined]
    a._public_key_pem = ""  # type: ignore[attr-defined]
    a._private_key_pem = ""  # type: ignore[attr-defined]
    if hmac:
        for key in ("public_key_file", "private_key_file"):
            if getattr(a, key):
                errs.add(f"auth.{key}", f"only used with public-key algorithms, not {', '.join(hmac)}")
        secret, where = a.secret, "auth.secret"
        if a.secret_file:
            where = "auth.secret_file"
            text = _read_text(errs, where, a.secret_file)
            if text is None:
                return
            secret = text.strip()
            if not secret:
                errs.add(where, f"{json.dumps(a.secret_file)} is empty")
                return
        if not secret:
            if from_file:
                errs.add("auth.secret", f"required for {', '.join(hmac)}: set auth.secret or "
                         "auth.secret_file (or WSD_AUTH_SECRET); `wsd config init` writes a random one")
            return
        need = max(_HS_MIN_BYTES[x] for x in hmac)
        size = len(secret.encode("utf-8"))
        if size < need:
            errs.add(where, f"too short for {', '.join(hmac)}: {size} bytes, need at least {need} random "
                     "bytes "
                     "(`wsd config init` writes one)")
            return
        if ("BEGIN" in secret and "KEY" in secret) or secret.startswith("ssh-"):
            errs.add(where, "looks like a PEM/SSH key, not an HMAC secret (HS/RS confusion)")
            return
        a._secret_material = secret  # type: ignore[attr-defined]
        return
    # Public-key family.
    if a.secret or a.secret_file:
        key = "auth.secret" if a.secret else "auth.secret_file"
        errs.add(key, f"not used with {', '.join(asym)}: remove it (tokens verify with auth.public_key_file)")
    if not a.public_key_file:
        errs.add("auth.public_key_file", f"required for {', '.join(asym)}: a PEM public key file")
        return
    import jwt

    pub_pem = _read_text(errs, "auth.public_key_file", a.public_key_file)
    if pub_pem is None:
        return
    pub = None
    for alg in asym:
        try:
            pub = jwt.get_algorithm_by_name(alg).prepare_key(pub_pem)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            errs.add("auth.public_key_file", f"not a usable {alg} public key: {exc or type(exc).__name__}")
            return
    if pub is not None and hasattr(pub, "private_bytes"):
        errs.add("auth.public_key_file", "holds a private key; give the public key here "
                 "(and the private key in auth.private_key_file)")
        return
    a._public_key_pem = pub_pem  # type: ignore[attr-defined]
    if not a.private_key_file:
        return
    priv_pem = _read_text(errs, "auth.private_key_file", a.private_key_file)
    if priv_pem is None:
        return
    try:
        priv = jwt.get_algorithm_by_name(asym[0]).prepare_key(priv_pem)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        errs.add("auth.private_key_file", f"not a usable {asym[0]} private key: {exc or type(exc).__name__}")
        return
    if not hasattr(priv, "private_bytes"):
        errs.add("auth.private_key_file", "holds a public key, not a private key")
        return
    from cryptography.hazmat.primitives import serialization

    def spki(key: Any) -> bytes:
        der, spki_format = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        return bytes(key.public_bytes(der, spki_format))

    if pub is not None and spki(priv.public_key()) != spki(pub):
        errs.add("auth.private_key_file",
                 "does not match auth.public_key_file (tokens it signs would not verify)")
        return
    a._private_key_pem = priv_pem  # type: ignore[attr-defined]


def _check_channels(channels: dict[str, ChannelConfig], errs: _Errors) -> None:
    for cid, ch in channels.items():
        path = _key("channels", cid)
        if not _CHANNEL_ID.fullmatch(cid):
            errs.add(path, "a channel group id is 1-128 of A-Z a-z 0-9 _ . : @ + = - (no /)")
        _at_least(errs, f"{path}.history_size", ch.history_size, 0)
        _at_least(errs, f"{path}.history_ttl_s", ch.history_ttl_s, 0)
        for i, pub in enumerate(ch.publishers):
            if pub == "":
                errs.add(f"{path}.publishers[{i}]", "must not be empty")
        _check_data_schema(ch, path, errs)


MAX_SCHEMA_FILE_BYTES = 1 << 20  # a data_schema_file larger than this is refused


def _check_data_schema(ch: ChannelConfig, path: str, errs: _Errors) -> None:
    """Read, check and compile a channel group's data schema once, at load (kept on the struct)."""
    from wsd.core.schema import SchemaError, compile_schema

    ch._data_schema = None  # type: ignore[attr-defined]
    schema, where = ch.data_schema, f"{path}.data_schema"
    if schema is not None and ch.data_schema_file:
        errs.add(f"{path}.data_schema_file", "set data_schema or data_schema_file, not both")
        return
    if ch.data_schema_file:
        where = f"{path}.data_schema_file"
        try:  # a FIFO or a device (/dev/zero) would block or fill memory at load and at every reload
            st = os.stat(ch.data_schema_file)
        except OSError:
            st = None  # _read_text names the error
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SCHEMA_FILE_BYTES):
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else \
                f"larger than {MAX_SCHEMA_FILE_BYTES // (1 << 20)} MiB"
            errs.add(where, f"{json.dumps(ch.data_schema_file)} is {what}")
            return
        text = _read_text(errs, where, ch.data_schema_file)
        if text is None:
            return
        try:
            schema = json.loads(text)
        except ValueError as exc:
            errs.add(where, f"{json.dumps(ch.data_schema_file)} is not JSON: {exc}")
            return
    if schema is None:
        return
    try:
        ch._data_schema = compile_schema(schema)  # type: ignore[attr-defined]
    except SchemaError as exc:
        at = "" if exc.json_path == "$" else f" (at {exc.json_path})"
        errs.add(where, f"not a valid JSON Schema: {exc.message}{at}")


def data_schema_of(ch: ChannelConfig) -> Any:
    """The compiled ``DataSchema`` of a channel group, or None; compiled here for a hand-built config."""
    if "_data_schema" not in ch.__dict__:
        errs = _Errors()
        _check_data_schema(ch, "channels", errs)
        if errs.items:
            raise ConfigError(errs.lines())
    return ch.__dict__["_data_schema"]


def _check_pools(cfg: Config, errs: _Errors, *, pools_from_file: bool) -> None:
    seen: dict[str, str] = {}
    channels_ok = errs.intact("channels")
    for pid, pool in cfg.pools.items():
        path = _key("pools", pid)
        if not _POOL_ID.fullmatch(pid):
            errs.add(path, "a pool id is 1-64 of A-Z a-z 0-9 _ -")
        p = pool.path
        if not p.startswith("/"):
            errs.add(f"{path}.path", f'must start with "/", got {_show(p)}')
        elif any(ch.isspace() for ch in p) or "?" in p or "#" in p:
            errs.add(f"{path}.path", f"must be a plain URL path (no spaces, ? or #), got {_show(p)}")
        elif p in _RESERVED_PATHS:
            errs.add(f"{path}.path", f"{p} is reserved for the HTTP endpoints")
        elif p in seen:
            errs.add(f"{path}.path", f"{json.dumps(p)} is already the path of {seen[p]}")
        else:
            seen[p] = path
        _at_least(errs, f"{path}.max_connections", pool.max_connections, 1)
        for i, cidr in enumerate(pool.allow_cidrs):
            _check_cidr(errs, f"{path}.allow_cidrs[{i}]", cidr)
        _check_origins(errs, f"{path}.allowed_origins", pool.allowed_origins)
        for i, role in enumerate(pool.roles):
            if role == "":
                errs.add(f"{path}.roles[{i}]", "must not be empty")
        for i, group in enumerate(pool.default_subscriptions):
            if channels_ok and isinstance(group, str) and group not in cfg.channels:
                hint = "" if pools_from_file else \
                    " (the built-in pools apply because the file has no [pools])"
                errs.add(f"{path}.default_subscriptions[{i}]",
                         f"no channel group {json.dumps(group)} in [channels]{hint}")
        _at_least(errs, f"{path}.batching.interval_ms", pool.batching.interval_ms, 1)
        _at_least(errs, f"{path}.batching.max_messages", pool.batching.max_messages, 1)


def _check_routing(cfg: Config, errs: _Errors) -> None:
    pools_ok, channels_ok = errs.intact("pools"), errs.intact("channels")
    seen: dict[str, int] = {}
    compile_expression: Callable[[str], Any] | None
    try:
        from wsd.core.expr import compile_expression
    except ImportError as exc:
        if exc.name != "wsd.core.expr":
            raise
        compile_expression = None
    for i, rule in enumerate(cfg.routing.rules):
        if rule is None:  # had a structural error, already reported
            continue
        path = f"routing.rules[{i}]"
        if not rule.id:
            errs.add(f"{path}.id", "must not be empty")
        elif rule.id in seen:
            errs.add(f"{path}.id",
                     f"{json.dumps(rule.id)} is already the id of routing.rules[{seen[rule.id]}]")
        else:
            seen[rule.id] = i
        for j, ch in enumerate(rule.filter.channels):
            if channels_ok and isinstance(ch, str) and ch.split("/")[0] not in cfg.channels:
                errs.add(f"{path}.filter.channels[{j}]", f"no channel group {json.dumps(ch.split('/')[0])}")
        t = rule.target
        if t.type == "individual" and not t.connection_ids:
            errs.add(f"{path}.target.connection_ids", 'required for target type "individual"')
        if t.type == "group":
            if not t.group_id:
                errs.add(f"{path}.target.group_id", 'required for target type "group": a channel group id')
            elif channels_ok and t.group_id not in cfg.channels:
                errs.add(f"{path}.target.group_id",
                         f"no channel group {json.dumps(t.group_id)} in [channels]")
        if t.type == "filtered" and not rule.filter.expression.strip():
            errs.add(f"{path}.filter.expression", 'required for target type "filtered"')
        if pools_ok:
            for j, pid in enumerate(t.pools):
                if isinstance(pid, str) and pid not in cfg.pools:
                    errs.add(f"{path}.target.pools[{j}]", f"no pool {json.dumps(pid)} in [pools]")
            for pid in rule.pool_transforms:
                if pid not in cfg.pools:
                    errs.add(_key(f"{path}.pool_transforms", pid), f"no pool {json.dumps(pid)} in [pools]")
        _at_least(errs, f"{path}.target.max_retries", t.max_retries, 0)
        _at_least(errs, f"{path}.target.ack_timeout_ms", t.ack_timeout_ms, 1)
        if rule.filter.expression.strip() and compile_expression is not None:
            try:
                compile_expression(rule.filter.expression)
            except Exception as exc:  # ExpressionError carries the position; anything else is reported too
                errs.add(f"{path}.filter.expression", str(exc) or type(exc).__name__)


def _check_engine(e: EngineConfig, errs: _Errors) -> None:
    if e.type == "redis":
        if not e.url:
            errs.add("engine.url", 'required when engine.type is "redis" (e.g. "redis://localhost:6379/0")')
        elif urlsplit(e.url).scheme not in ("redis", "rediss", "unix"):
            errs.add("engine.url", "must be a redis://, rediss:// or unix:// URL")
    elif e.url:
        errs.add("engine.url", f'set, but engine.type is "{e.type}"; set engine.type = "redis" or remove it')
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", e.prefix):
        errs.add("engine.prefix", "must be 1 or more of A-Z a-z 0-9 _ . : -")


# ----------------------------------------------------------------------------------------- secrets


def resolved_secret(cfg: Config) -> str:
    """The HMAC secret: ``auth.secret``, else the content of ``auth.secret_file``; '' when neither is set."""
    if cfg.auth.secret:
        return cfg.auth.secret
    cached = getattr(cfg.auth, "_secret_material", None)
    if cached:
        return str(cached)
    if cfg.auth.secret_file:
        return Path(cfg.auth.secret_file).read_text(encoding="utf-8").strip()
    return ""


def resolved_public_key(cfg: Config) -> str:
    """The PEM text of ``auth.public_key_file`` ('' when not set): the key tokens verify with."""
    cached = getattr(cfg.auth, "_public_key_pem", None)
    if cached:
        return str(cached)
    return Path(cfg.auth.public_key_file).read_text(encoding="utf-8") if cfg.auth.public_key_file else ""


def resolved_private_key(cfg: Config) -> str:
    """The PEM text of ``auth.private_key_file`` ('' when not set): lets the daemon sign RS/PS/ES tokens."""
    cached = getattr(cfg.auth, "_private_key_pem", None)
    if cached:
        return str(cached)
    return Path(cfg.auth.private_key_file).read_text(encoding="utf-8") if cfg.auth.private_key_file else ""


# ----------------------------------------------------------------------------------------- output


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


def config_to_dict(cfg: Config, redact: bool = True) -> dict[str, Any]:
    """The config as plain JSON-able data (``None`` = "not set, falls back"); secrets redacted when asked."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    if redact:
        if data["auth"]["secret"]:
            data["auth"]["secret"] = REDACTED
        if data["engine"]["url"]:
            data["engine"]["url"] = _redact_url(data["engine"]["url"])
    return data


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def dump_config(cfg: Config, redact: bool = True) -> str:
    """The effective config as TOML (keys left unset fall back as documented); secrets redacted when asked."""
    data = _drop_none(config_to_dict(cfg, redact=redact))
    data.pop("source_path", None)
    head = f"# effective wsd config (source: {cfg.source_path or 'built-in defaults'})\n"
    if redact:
        head += f'# secrets are shown as "{REDACTED}"\n'
    return head + "\n" + tomli_w.dumps(data)


def default_config_toml(secret: str | None = None) -> str:
    """The complete, commented default config; a fresh random HS256 secret unless ``secret`` is given."""
    if secret is None:
        secret = secrets.token_urlsafe(48)
    return _DEFAULT_TEMPLATE.replace("@SECRET@", json.dumps(secret))


_DEFAULT_TEMPLATE = '''\
# wsd configuration: every key with its default.
# Environment variables WSD_<SECTION>_<KEY> override keys of the top-level sections,
# e.g. WSD_SERVER_PORT=9000, WSD_AUTH_SECRET=..., WSD_MANAGER_COMPRESSION_MEMORY_LEVEL=3.
# Unknown keys are errors. Check a file with `wsd config check FILE`.
# Relative file paths are taken relative to this file's directory.

[manager]
# Name of this manager instance (shown by `wsctl status`, used in metrics and events).
manager_id = "ws-manager-v1"
# Connections accepted across all pools; more are refused with 503 manager_full.
max_connections = 10000
# Close a connection that sent nothing (no frame, no pong) for this long (close 4010).
connection_timeout_ms = 300000
# Interval between WebSocket ping frames.
heartbeat_interval_ms = 30000
# Pings left unanswered before the connection is closed.
missed_pongs_allowed = 3
# Outbound queue length per connection; overflow drops the lowest priority first.
message_buffer_size = 1000
# Offer permessage-deflate compression (pools may override with pools.<id>.compression).
enable_compression = false
# On shutdown or reload, how long connections get to flush before they are closed (1001).
drain_timeout_ms = 5000
# A connection whose writes stay blocked this long is a slow consumer (close 4009).
slow_consumer_timeout_ms = 5000
# Transport write buffer above which a connection counts as congested and messages queue.
write_high_water_bytes = 65536
# SO_SNDBUF for client sockets (0 = the kernel's autotuning, which lets a client that stopped reading
# hold up to net.ipv4.tcp_wmem's max, 4 MiB, in the kernel before wsd sees it congested). Set e.g.
# 262144 to detect slow consumers sooner and bound kernel memory per connection.
socket_send_buffer_bytes = 0
# Burst coalescing: a second message for one channel within this window starts a window whose frames
# are written joined, one write per receiver (0 = off). Lone and critical messages go at once.
coalesce_window_ms = 5
# A window is flushed early when it holds this many messages.
coalesce_max_messages = 256
# How long a disconnected session can be resumed with ?session=<id> (0 = no resume).
session_ttl_s = 300
# Error rate (0..1) above which a pool reports itself unhealthy.
health_error_rate = 0.05
# Consecutive write failures that open a connection's circuit breaker.
breaker_failure_threshold = 3
# How long an open breaker waits before it half-opens and retries.
breaker_cooldown_ms = 1000
# Queue overflows (dropped messages) after which a connection is closed with 4009.
overflow_close_count = 100

[manager.compression]
# permessage-deflate window sizes (9..15); smaller uses less memory per connection.
server_max_window_bits = 12
client_max_window_bits = 12
# zlib memory level (1..9).
memory_level = 5
# Frames smaller than this are sent uncompressed.
compress_min_bytes = 128

[server]
# Address and port of the WebSocket / HTTP listener (port 0 = any free port).
host = "127.0.0.1"
port = 8765
# PEM certificate and key for wss:// (both or neither; empty = plain ws://).
tls_cert = ""
tls_key = ""
# Largest frame a client may send (close 1009 above it).
max_message_bytes = 65536
# Origins allowed to connect, e.g. ["https://app.example.com"]; [] = no Origin check.
# Pools may set their own list.
allowed_origins = []
# Listen backlog.
backlog = 4096

[control]
# Unix socket for wsctl; "" = $XDG_RUNTIME_DIR/wsd/wsd.sock, else /tmp/wsd-$UID/wsd.sock.
socket = ""

[auth]
# Accepted JWT algorithms, all from one family: HS256/HS384/HS512, or RS*/PS*/ES*/EdDSA.
algorithms = ["HS256"]
# HMAC secret (at least 32 bytes for HS256, 48 for HS384, 64 for HS512). Keep this file mode 0600,
# or use secret_file / WSD_AUTH_SECRET instead.
secret = @SECRET@
# File holding the HMAC secret (surrounding whitespace is ignored); instead of secret.
secret_file = ""
# PEM public key that verifies RS*/PS*/ES*/EdDSA tokens.
public_key_file = ""
# PEM private key matching public_key_file; lets the daemon sign tokens (wsctl token).
private_key_file = ""
# Required "iss" / "aud" claim values; "" = not checked.
issuer = ""
audience = ""
# Clock skew allowed when checking nbf / iat (exp is strict: connections close at exp with 4001).
leeway_s = 30
# Tokens longer than this are refused before decoding.
max_token_bytes = 4096
# Claim names: user id, company id, roles (list), pool restriction.
user_claim = "sub"
company_claim = "company_id"
roles_claim = "roles"
pool_claim = "pool"
# Role that may use admin channels and name any channel instance.
admin_role = "admin"
# Lifetime of tokens the daemon signs (wsctl token) unless --ttl is given.
token_ttl_s = 3600

[limits]
# New connections per user and per client IP per minute (429 above).
connections_per_user_per_minute = 60
connections_per_ip_per_minute = 600
# Open connections per user.
max_connections_per_user = 20
# Client frames per connection: sustained rate and burst (close 4008 above).
messages_per_connection_per_second = 50
message_burst = 100
# Channels one connection may subscribe to.
max_subscriptions_per_connection = 100
# A subscribe's filter.types: at most this many types, each at most this many characters
# (error filter_too_large above; nothing is stored).
max_filter_types = 64
max_filter_type_length = 128
# A disconnected session larger than this (encoded JSON bytes) is not kept: its resume starts afresh.
max_session_bytes = 65536
# Disconnected sessions kept per user and in total; beyond either the oldest is evicted (counted).
max_sessions_per_user = 20
max_sessions = 100000
# Encoded bytes of all disconnected sessions together (memory engine); beyond it the oldest is evicted.
max_sessions_bytes = 268435456
# Channel instances whose history is held; beyond it the least recently used one without
# subscribers is freed (instances without subscribers are also freed once their history expires).
max_history_channels = 10000
# One history or pull reply carries at most this many messages and about this many bytes
# (at least one message); a cut reply says "more": true and where to continue.
history_max_messages = 500
history_max_bytes = 524288
# Deepest nesting of arrays/objects in a client frame (the frame is level 1); deeper gets bad_request.
max_json_depth = 32
# TCP connections still in their WebSocket handshake, per client IP and in total: a connection
# over either bound is closed at once (counted as refused code handshakes_in_progress).
handshakes_in_progress_per_ip = 128
handshakes_in_progress = 2048

# Pools: one WebSocket endpoint each. A file with no [pools] gets these four.
# Keys: type (frontend|mt5_client|admin|api), path, max_connections, allow_cidrs ([] = any IP),
# allowed_origins (leave out = [server] allowed_origins; [] = no Origin check), roles ([] = any role),
# default_subscriptions (channel groups joined on connect), compression (leave out = manager setting),
# [pools.<id>.batching] enabled, interval_ms, max_messages.
[pools.frontend]
type = "frontend"
path = "/ws/frontend"
max_connections = 10000
allow_cidrs = []
roles = []
default_subscriptions = ["system-status"]

[pools.frontend.batching]
enabled = true
interval_ms = 50
max_messages = 100

[pools.mt5]
type = "mt5_client"
path = "/ws/mt5"
max_connections = 10000
allow_cidrs = []
# MT5 terminals send no browser Origin: no check.
allowed_origins = []
roles = []
default_subscriptions = []
compression = false

[pools.mt5.batching]
# Trading clients get every message as it comes.
enabled = false
interval_ms = 50
max_messages = 100

[pools.admin]
type = "admin"
path = "/ws/admin"
max_connections = 10000
allow_cidrs = []
roles = ["admin"]
default_subscriptions = []

[pools.api]
type = "api"
path = "/ws/api"
max_connections = 10000
allow_cidrs = []
roles = []
default_subscriptions = []

# Channel groups. A file with no [channels] gets these four.
# type: user (instance group/company/user), company (group/company), global, admin (admins only).
# publishers: pool ids or role names whose clients may publish; [] = only the server side.
# data_schema (an inline JSON Schema) or data_schema_file (a JSON file): publications whose data
# fails it are refused with invalid_data. Not set: any data. See docs/configuration.md.
[channels.system-status]
type = "global"
name = "System status"
history_size = 100
history_ttl_s = 3600
publishers = ["admin"]

[channels.trading-signals]
type = "company"
name = "Trading signals"
history_size = 100
history_ttl_s = 3600
publishers = ["mt5", "api", "admin"]

[channels.notifications]
type = "user"
name = "Notifications"
history_size = 100
history_ttl_s = 3600
publishers = ["api", "admin"]

[channels.admin-events]
type = "admin"
name = "Admin events"
history_size = 100
history_ttl_s = 3600
publishers = ["admin"]

[routing]
# With no rule matching, a message goes to the subscribers of its channel. See docs/configuration.md.
rules = []
# [[routing.rules]]
# id = "critical-alerts"
# priority = 100
# filter = { message_types = ["system_alert"] }
# target = { type = "broadcast", pools = ["frontend", "admin"] }

[engine]
# "memory" (one process) or "redis" (several wsd share channels and history).
type = "memory"
# Redis URL when type = "redis", e.g. "redis://localhost:6379/0".
url = ""
# Key / channel prefix in the engine.
prefix = "wsd"

[audit]
# Audit log file (JSON lines: drops, kicks, refusals); "" = no audit file.
path = ""
# Rotate at this size, keeping this many old files.
max_bytes = 10485760
backups = 5

[http]
# Networks allowed to GET /metrics.
metrics_allow = ["127.0.0.1/32", "::1/128"]

[log]
# debug | info | warning | error
level = "info"
# text | json
format = "text"
# Repeated records (one refusal kind from one address, descriptor exhaustion): the first is
# written in full, the rest are counted into one summary per this many seconds.
repeat_summary_interval_s = 10
'''
