"""Output: the effective config as data or TOML (``wsd config show``, ``wsctl config``), secrets
redacted, and the commented default config that ``wsd config init`` writes (``default.toml``)."""

import json
import secrets
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import tomli_w

from wsd.config.model import REDACTED, Config


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
        if data["engine"].get("sentinel_password"):
            data["engine"]["sentinel_password"] = REDACTED
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
    template = resources.files(__package__).joinpath("default.toml").read_text(encoding="utf-8")
    return template.replace("@SECRET@", json.dumps(secret))
