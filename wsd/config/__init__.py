"""The typed configuration of wsd: the model, the TOML loader, ``WSD_*`` overrides and validation.

This package owns every configuration key, its default and its checks. Loading collects every
problem as ``"dotted.key.path: what is wrong"`` before raising :class:`ConfigError`, so one
``wsd config check`` run shows them all; unknown keys are errors, never silently ignored.

Order of precedence: built-in defaults < the TOML file < ``WSD_<SECTION>_<KEY>`` environment variables.

Modules, each depending only on those above it:

* ``model``    the msgspec Structs and their defaults (data only), and ``ResolvedAuth``
* ``problems`` ``ConfigError`` and the collector of key-path errors
* ``convert``  TOML tables to Structs, every bad key reported
* ``env``      ``WSD_<SECTION>_<KEY>`` overrides
* ``auth``     the checks of ``[auth]``, which read the key files once per load
* ``encryption`` the checks of ``[encryption.keys]`` and the encrypted groups, which read the key files
* ``validate`` the checks of values and of keys against each other
* ``load``     file + environment → checked ``Config`` and its token keys (``Loaded``)
* ``output``   ``wsd config show`` / ``wsctl config`` rendering and ``default.toml`` (``wsd config init``)
"""

from wsd.config.auth import resolved_auth, resolved_private_key, resolved_public_key, resolved_secret
from wsd.config.encryption import encryption_keys, rekeyed, sealers_of
from wsd.config.load import Loaded, load, load_config
from wsd.config.model import (
    REDACTED,
    AuditConfig,
    AuthConfig,
    BatchingConfig,
    ChannelConfig,
    ChannelType,
    CompressionConfig,
    Config,
    ControlConfig,
    EncryptionConfig,
    EngineConfig,
    FilterConfig,
    HttpConfig,
    LimitsConfig,
    LogConfig,
    ManagerConfig,
    PoolConfig,
    PoolType,
    ResolvedAuth,
    RoutingConfig,
    RuleConfig,
    ServerConfig,
    TargetConfig,
    TargetType,
    TransformConfig,
    default_channels,
    default_pools,
)
from wsd.config.output import config_to_dict, default_config_toml, dump_config
from wsd.config.problems import ConfigError
from wsd.config.validate import MAX_SCHEMA_FILE_BYTES, data_schema_of

__all__ = [
    "MAX_SCHEMA_FILE_BYTES",
    "REDACTED",
    "AuditConfig",
    "AuthConfig",
    "BatchingConfig",
    "ChannelConfig",
    "ChannelType",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "EncryptionConfig",
    "EngineConfig",
    "FilterConfig",
    "HttpConfig",
    "LimitsConfig",
    "Loaded",
    "LogConfig",
    "ManagerConfig",
    "PoolConfig",
    "PoolType",
    "ResolvedAuth",
    "RoutingConfig",
    "RuleConfig",
    "ServerConfig",
    "TargetConfig",
    "TargetType",
    "TransformConfig",
    "config_to_dict",
    "data_schema_of",
    "default_channels",
    "default_config_toml",
    "default_pools",
    "dump_config",
    "encryption_keys",
    "load",
    "load_config",
    "rekeyed",
    "resolved_auth",
    "resolved_private_key",
    "resolved_public_key",
    "resolved_secret",
    "sealers_of",
]
