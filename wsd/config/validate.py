"""Validation: the checks of values and of keys against each other, once a config has converted.

Each check records ``"key.path: problem"`` in a :class:`Problems`; a key that already failed to
convert is not reported again. The checks of ``[auth]`` live in ``wsd.config.auth`` (they read the
key files) and are run from here, in their place among the sections.
"""

import ipaddress
import json
import os
import re
import ssl
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec

from wsd.config.auth import check_auth
from wsd.config.encryption import check_encryption
from wsd.config.model import (
    ChannelConfig,
    Config,
    EngineConfig,
    LimitsConfig,
    ManagerConfig,
    ResolvedAuth,
    ServerConfig,
    WorkersConfig,
)
from wsd.config.problems import ConfigError, Problems, key_path, read_text, show_value

_RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")
_POOL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch only
_CHANNEL_ID = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")  # one channel-instance segment, no "/"; fullmatch only


def validate(cfg: Config, errs: Problems, *, from_file: bool, raw: dict[str, Any]) -> ResolvedAuth:
    """Check cfg (converted from raw); the token keys the checks of [auth] read."""
    _check_manager(cfg.manager, errs)
    _check_server(cfg.server, errs)
    auth = check_auth(cfg.auth, errs, from_file=from_file)
    for key in msgspec.structs.fields(LimitsConfig):
        _at_least(errs, f"limits.{key.name}", getattr(cfg.limits, key.name), 1)
    _between(errs, "limits.max_json_depth", cfg.limits.max_json_depth, 2, 512)
    _at_least(errs, "log.repeat_summary_interval_s", cfg.log.repeat_summary_interval_s, 1)
    _check_channels(cfg.channels, errs)
    _check_pools(cfg, errs, pools_from_file="pools" in raw)
    _check_routing(cfg, errs)
    check_encryption(cfg, errs)
    _check_engine(cfg.engine, errs)
    _check_workers(cfg.workers, errs)
    _at_least(errs, "audit.max_bytes", cfg.audit.max_bytes, 1024)
    _at_least(errs, "audit.backups", cfg.audit.backups, 0)
    for i, cidr in enumerate(cfg.http.metrics_allow):
        _check_cidr(errs, f"http.metrics_allow[{i}]", cidr)
    return auth


def _at_least(errs: Problems, path: str, value: Any, low: float) -> None:
    if isinstance(value, (int, float)) and value < low:
        errs.add(path, f"must be at least {low}, got {value}")


def _between(errs: Problems, path: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, (int, float)) and not low <= value <= high:
        errs.add(path, f"must be between {low} and {high}, got {value}")


def _check_cidr(errs: Problems, path: str, value: Any) -> None:
    if not isinstance(value, str):
        return
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        errs.add(path, f"not an IP network (CIDR), got {show_value(value)}")


def _check_origins(errs: Problems, path: str, origins: list[str] | None) -> None:
    for i, origin in enumerate(origins or []):
        if isinstance(origin, str) and origin != "*" and "://" not in origin:
            errs.add(f"{path}[{i}]", f'an origin is "*" or scheme://host[:port], got {show_value(origin)}')


def _check_manager(m: ManagerConfig, errs: Problems) -> None:
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


def _check_server(s: ServerConfig, errs: Problems) -> None:
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
    _check_proxies(s, errs)


def _check_proxies(s: ServerConfig, errs: Problems) -> None:
    for i, cidr in enumerate(s.trusted_proxies):
        _check_cidr(errs, f"server.trusted_proxies[{i}]", cidr)
        try:
            every = ipaddress.ip_network(cidr, strict=False).prefixlen == 0
        except (TypeError, ValueError):
            continue
        if every:
            errs.add(f"server.trusted_proxies[{i}]", f"trusts every address ({cidr}): any client could claim "
                     "any address and escape the per-address limits; list the proxies' own addresses")
    if s.proxy_protocol and not s.trusted_proxies:
        errs.add("server.proxy_protocol", "needs server.trusted_proxies: the addresses of the proxies that send "
                 "the PROXY header (no one else's connection is read as carrying one)")
    if s.proxy_protocol and s.tls_cert:
        errs.add("server.proxy_protocol", "cannot be combined with server.tls_cert: the PROXY header comes before "
                 "the TLS handshake, and wsd's TLS listener reads the handshake first; terminate TLS at the proxy "
                 "(or pass TLS through without the PROXY protocol)")


def _check_channels(channels: dict[str, ChannelConfig], errs: Problems) -> None:
    for cid, ch in channels.items():
        path = key_path("channels", cid)
        if not _CHANNEL_ID.fullmatch(cid):
            errs.add(path, "a channel group id is 1-128 of A-Z a-z 0-9 _ . : @ + = - (no /)")
        _at_least(errs, f"{path}.history_size", ch.history_size, 0)
        _at_least(errs, f"{path}.history_ttl_s", ch.history_ttl_s, 0)
        for i, pub in enumerate(ch.publishers):
            if pub == "":
                errs.add(f"{path}.publishers[{i}]", "must not be empty")
        _check_data_schema(ch, path, errs)


MAX_SCHEMA_FILE_BYTES = 1 << 20  # a data_schema_file larger than this is refused


def _check_data_schema(ch: ChannelConfig, path: str, errs: Problems) -> None:
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
        text = read_text(errs, where, ch.data_schema_file)
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
        errs = Problems()
        _check_data_schema(ch, "channels", errs)
        if errs.items:
            raise ConfigError(errs.lines())
    return ch.__dict__["_data_schema"]


def _check_pools(cfg: Config, errs: Problems, *, pools_from_file: bool) -> None:
    seen: dict[str, str] = {}
    channels_ok = errs.intact("channels")
    for pid, pool in cfg.pools.items():
        path = key_path("pools", pid)
        if not _POOL_ID.fullmatch(pid):
            errs.add(path, "a pool id is 1-64 of A-Z a-z 0-9 _ -")
        p = pool.path
        if not p.startswith("/"):
            errs.add(f"{path}.path", f'must start with "/", got {show_value(p)}')
        elif any(ch.isspace() for ch in p) or "?" in p or "#" in p:
            errs.add(f"{path}.path", f"must be a plain URL path (no spaces, ? or #), got {show_value(p)}")
        elif p in _RESERVED_PATHS:
            errs.add(f"{path}.path", f"{p} is reserved for the HTTP endpoints")
        elif p in seen:
            errs.add(f"{path}.path", f"{json.dumps(p)} is already the path of {seen[p]}")
        else:
            seen[p] = path
        _at_least(errs, f"{path}.max_connections", pool.max_connections, 1)
        _at_least(errs, f"{path}.min_connections", pool.min_connections, 0)
        if pool.min_connections > pool.max_connections >= 1:
            errs.add(f"{path}.min_connections", f"the reservation ({pool.min_connections}) is more than the "
                     f"pool's ceiling {path}.max_connections ({pool.max_connections})")
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
    _check_reservations(cfg, errs, pools_from_file=pools_from_file)


def _check_reservations(cfg: Config, errs: Problems, *, pools_from_file: bool) -> None:
    """The pools' reservations (min_connections) must fit in manager.max_connections together."""
    limit = cfg.manager.max_connections
    reserving = {pid: p.min_connections for pid, p in cfg.pools.items() if p.min_connections > 0}
    total = sum(reserving.values())
    if limit < 1 or total <= limit:
        return
    hint = "" if pools_from_file else " (the built-in pools apply because the file has no [pools])"
    if len(reserving) == 1:
        pid = next(iter(reserving))
        errs.add(f"{key_path('pools', pid)}.min_connections", f"reserves {total} connections, more than "
                 f"manager.max_connections ({limit}){hint}")
    else:
        parts = ", ".join(f"{key_path('pools', pid)}.min_connections = {n}" for pid, n in reserving.items())
        errs.add("pools", f"the reservations add up to {total} ({parts}), more than manager.max_connections "
                 f"({limit}){hint}")


def _check_routing(cfg: Config, errs: Problems) -> None:
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
                    errs.add(key_path(f"{path}.pool_transforms", pid), f"no pool {json.dumps(pid)} in [pools]")
        _at_least(errs, f"{path}.target.max_retries", t.max_retries, 0)
        _at_least(errs, f"{path}.target.ack_timeout_ms", t.ack_timeout_ms, 1)
        if rule.filter.expression.strip() and compile_expression is not None:
            try:
                compile_expression(rule.filter.expression)
            except Exception as exc:  # ExpressionError carries the position; anything else is reported too
                errs.add(f"{path}.filter.expression", str(exc) or type(exc).__name__)


def _host_port(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536)


def _check_sentinel(e: EngineConfig, errs: Problems) -> None:
    if not e.sentinels:
        errs.add("engine.sentinels", 'required when engine.mode is "sentinel" (e.g. ["10.0.0.1:26379", '
                                     '"10.0.0.2:26379", "10.0.0.3:26379"])')
    for i, addr in enumerate(e.sentinels):
        if not _host_port(addr):
            errs.add(f"engine.sentinels[{i}]", f'must be "host:port", got {json.dumps(addr)}')
    if not e.sentinel_master:
        errs.add("engine.sentinel_master", 'required when engine.mode is "sentinel": the master\'s name in the '
                                           'sentinels\' configuration (e.g. "mymaster")')
    if e.url:
        parts = urlsplit(e.url)
        if parts.scheme not in ("redis", "rediss") or parts.hostname or parts.port:
            errs.add("engine.url", 'with engine.mode = "sentinel" the master\'s address comes from the sentinels: '
                                   'give only its credentials and database, e.g. "redis://:password@/0" '
                                   '(rediss:// for TLS)')


def _check_workers(w: WorkersConfig, errs: Problems) -> None:
    from wsd.core.scaling import WorkerCountError, parse_workers

    try:
        parse_workers(w.count, os.cpu_count() or 1)
    except WorkerCountError as exc:
        errs.add("workers.count", str(exc))
    _between(errs, "workers.scale_up_cpu", w.scale_up_cpu, 0.01, 1.0)
    _between(errs, "workers.scale_down_cpu", w.scale_down_cpu, 0.0, 1.0)
    if w.scale_down_cpu >= w.scale_up_cpu:
        errs.add("workers.scale_down_cpu", f"must be below workers.scale_up_cpu ({w.scale_up_cpu}), "
                                           f"got {w.scale_down_cpu}")
    _between(errs, "workers.scale_up_after_s", w.scale_up_after_s, 0.1, 86400)
    _between(errs, "workers.scale_down_after_s", w.scale_down_after_s, 0.1, 86400)


def _check_engine(e: EngineConfig, errs: Problems) -> None:
    if e.type == "redis":
        if e.mode == "sentinel":
            _check_sentinel(e, errs)
        elif not e.url:
            errs.add("engine.url", 'required when engine.type is "redis" (e.g. "redis://localhost:6379/0")')
        elif urlsplit(e.url).scheme not in ("redis", "rediss", "unix"):
            errs.add("engine.url", "must be a redis://, rediss:// or unix:// URL")
        elif e.mode == "cluster" and (urlsplit(e.url).scheme == "unix" or urlsplit(e.url).path.strip("/") not in
                                      ("", "0")):
            errs.add("engine.url", 'with engine.mode = "cluster": a redis:// or rediss:// URL of one cluster node, '
                                   "database 0 (a cluster has no other)")
        if e.mode != "sentinel":
            for key in ("sentinels", "sentinel_master", "sentinel_password"):
                if getattr(e, key):
                    errs.add(f"engine.{key}", f'set, but engine.mode is "{e.mode}"; set engine.mode = "sentinel" '
                                              "or remove it")
        if e.mode != "cluster" and e.cluster_nodes:
            errs.add("engine.cluster_nodes", f'set, but engine.mode is "{e.mode}"; set engine.mode = "cluster" '
                                             "or remove it")
        for i, addr in enumerate(e.cluster_nodes):
            if not _host_port(addr):
                errs.add(f"engine.cluster_nodes[{i}]", f'must be "host:port", got {json.dumps(addr)}')
        _between(errs, "engine.wait_replicas", e.wait_replicas, 0, 16)
        if e.mode == "cluster" and e.wait_replicas:
            errs.add("engine.wait_replicas", 'not supported with engine.mode = "cluster" (Redis Cluster runs WAIT '
                                             "on one master, not the one that stored the message); set it to 0")
    else:
        if e.url:
            errs.add("engine.url", f'set, but engine.type is "{e.type}"; set engine.type = "redis" or remove it')
        if e.mode != "single":
            errs.add("engine.mode", f'set, but engine.type is "{e.type}"; set engine.type = "redis" or remove it')
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", e.prefix):
        errs.add("engine.prefix", "must be 1 or more of A-Z a-z 0-9 _ . : -")
