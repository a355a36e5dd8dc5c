"""Loading: the TOML file, then ``WSD_*`` overrides, converted and validated into a Config.

Order of precedence: built-in defaults < the TOML file < ``WSD_<SECTION>_<KEY>`` environment variables.
Every problem is collected with its key path before :class:`ConfigError` is raised. The token keys
named by ``[auth]`` are read here, once per load, and returned with the config (:class:`Loaded`).
"""

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsd.config.auth import keep_auth
from wsd.config.convert import convert_struct
from wsd.config.env import apply_env
from wsd.config.model import ChannelConfig, Config, ResolvedAuth
from wsd.config.problems import ConfigError, Problems, key_path
from wsd.config.validate import validate
from wsd.core.encryption import is_key_text

# File paths in the config; a relative one is taken relative to the config file's directory.
PATH_KEYS = (("server", "tls_cert"), ("server", "tls_key"), ("auth", "secret_file"),
             ("auth", "public_key_file"), ("auth", "private_key_file"), ("audit", "path"),
             ("control", "socket"))


@dataclass(frozen=True)
class Loaded:
    """A loaded config and the token keys its ``[auth]`` names, read from their files in the same load."""

    config: Config
    auth: ResolvedAuth


def load(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Loaded:
    """The effective config and its token keys: defaults, the TOML file at ``path`` (if any), ``WSD_*``.

    Raises ConfigError listing every problem found, each with its key path. ``env=None`` reads
    ``os.environ``. Each call reads the key files again, so a reload picks up a rotated key.
    """
    env = os.environ if env is None else env
    errs = Problems()
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
    file_keys = {(s, k) for s, k in PATH_KEYS if isinstance(raw.get(s), dict) and raw[s].get(k)}
    apply_env(raw, env, errs)
    if "pools" in raw and raw["pools"] == {}:
        errs.structure("pools", "at least one pool is required (leave [pools] out for the built-in ones)")
    cfg = convert_struct(Config, raw, "", errs)
    if not isinstance(cfg, Config):  # cannot happen: tomllib always returns a table
        raise ConfigError(errs.lines())
    cfg.source_path = source
    if "pools" not in raw and "mt5" in cfg.pools:
        # The built-in mt5 pool reserves a tenth of the manager's limit (1000 of the default 10000), so a file
        # that only lowers manager.max_connections still loads.
        cfg.pools["mt5"].min_connections = min(cfg.pools["mt5"].min_connections, cfg.manager.max_connections // 10)
    base = os.path.dirname(source) if source else os.getcwd()
    for section, key in PATH_KEYS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value:
            value = os.path.expanduser(value)
            from_env = key_path(section, key) in errs.env_origin
            root = base if (section, key) in file_keys and not from_env else os.getcwd()
            setattr(obj, key, os.path.normpath(os.path.join(root, value)))
    for ch in cfg.channels.values():  # [channels.<id>] data_schema_file: relative to the config file too
        if isinstance(ch, ChannelConfig) and ch.data_schema_file:
            ch.data_schema_file = os.path.normpath(os.path.join(base, os.path.expanduser(ch.data_schema_file)))
    keys = cfg.encryption.keys  # [encryption.keys] files: relative to the config file too
    for kid, file in keys.items():
        if isinstance(file, str) and file:
            resolved = os.path.normpath(os.path.join(base, os.path.expanduser(file)))
            # the key itself pasted in place of its file's path: kept as written, so the check can say so
            # without ever showing it (a resolved path would quote it)
            keys[kid] = file if is_key_text(file) and not os.path.exists(resolved) else resolved
    auth = validate(cfg, errs, from_file=path is not None, raw=raw)
    if errs.items:
        raise ConfigError(errs.lines())
    keep_auth(cfg, auth)
    return Loaded(cfg, auth)


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """The effective config: defaults, then the TOML file at ``path`` (if any), then ``WSD_*`` overrides.

    Raises ConfigError listing every problem found. ``env=None`` reads ``os.environ``. The token keys
    read in this load stay with the config: ``resolved_auth(config)`` returns them.
    """
    return load(path, env).config
