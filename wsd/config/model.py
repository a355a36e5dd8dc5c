"""The configuration model: every key as a msgspec Struct field with its default.

This module holds data only; reading, checking and printing it live in the sibling modules.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

REDACTED = "***redacted***"

PoolType = Literal["frontend", "mt5_client", "admin", "api"]
ChannelType = Literal["user", "company", "global", "admin"]
TargetType = Literal["individual", "group", "broadcast", "filtered", "channel"]



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
    trusted_proxies: list[str] = []
    forwarded_header: Literal["x-forwarded-for", "forwarded", "none"] = "x-forwarded-for"
    proxy_protocol: bool = False


class ControlConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    socket: str = ""


# ``dict=True`` lets the loader keep the ResolvedAuth it read from the key files with the section
# (see wsd.config.auth.resolved_auth) without making it a TOML key, a compared field or output.
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
    min_connections: int = 0
    allow_cidrs: list[str] = []
    allowed_origins: list[str] | None = None
    roles: list[str] = []
    default_subscriptions: list[str] = []
    compression: bool | None = None
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)


# ``dict=True``: the loader keeps the compiled data schema with the group (see data_schema_of).
class ChannelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    type: ChannelType
    name: str = ""
    history_size: int = 100
    history_ttl_s: int = 3600
    publishers: list[str] = []
    # A JSON Schema that published ``data`` must satisfy: inline, or a JSON file (not both).
    data_schema: dict[str, Any] | None = None
    data_schema_file: str = ""
    # The key id (in [encryption.keys]) that encrypts the data of messages published to this group; "" = none.
    encrypt: str = ""


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
    # Redis deployment: one server (or a proxy), a master found through Redis Sentinel, or a Redis Cluster
    mode: Literal["single", "sentinel", "cluster"] = "single"
    sentinels: list[str] = []  # "host:port" of each sentinel (mode "sentinel")
    sentinel_master: str = ""  # the master's name in the sentinels' configuration
    sentinel_password: str = ""  # the sentinels' own password (requirepass on the sentinels), if any
    cluster_nodes: list[str] = []  # more "host:port" nodes to start from besides the url's (mode "cluster")
    wait_replicas: int = 0  # acknowledge a publication once this many replicas have it (WAIT)


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""
    max_bytes: int = 10485760
    backups: int = 5


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    metrics_allow: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])


# ``dict=True``: the loader keeps the keys it read from the files with the section (wsd.config.encryption).
class EncryptionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    # key id -> the file holding that key (the base64 of 32 random bytes; `wsd keygen PATH` writes one)
    keys: dict[str, str] = {}


class WorkersConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # 1, a number, "auto" (one per CPU) or "auto:MIN-MAX" (scaled on CPU); `wsd serve --workers` overrides it
    count: int | str = 1
    scale_up_cpu: float = 0.75
    scale_down_cpu: float = 0.25
    scale_up_after_s: float = 30.0
    scale_down_after_s: float = 300.0


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    repeat_summary_interval_s: int = 10


def default_pools() -> dict[str, PoolConfig]:
    """The four built-in pools, used when the config file has no ``[pools]``."""
    return {
        "frontend": PoolConfig(type="frontend", path="/ws/frontend", default_subscriptions=["system-status"]),
        "mt5": PoolConfig(type="mt5_client", path="/ws/mt5", min_connections=1000, allowed_origins=[],
                          compression=False,
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
    encryption: EncryptionConfig = msgspec.field(default_factory=EncryptionConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    source_path: str = ""


# Fields of the model that are not TOML keys (set by the loader).

# Fields of the model that are not TOML keys (set by the loader).
NOT_TOML: dict[type, frozenset[str]] = {Config: frozenset({"source_path"})}


@dataclass(frozen=True)
class ResolvedAuth:
    """The token keys of a loaded config, read from their files once, when the config was loaded.

    ``verify_key`` checks tokens (the HMAC secret, or the PEM public key); ``sign_key`` issues them
    (the same secret, the PEM private key, or '' when none is configured). For HMAC with no secret
    configured (built-in defaults only) both are ''. The keys are left out of ``repr``.
    """

    algorithms: tuple[str, ...]
    verify_key: str = field(default="", repr=False)
    sign_key: str = field(default="", repr=False)

    @property
    def hmac(self) -> bool:
        return bool(self.algorithms) and self.algorithms[0].startswith("HS")
