"""Message encryption keys: the checks of ``[encryption.keys]``, ``[channels.<group>] encrypt`` and the rules
that cannot work on an encrypted group, and the keys they read, once per load.

The loader reads each key file while checking it and keeps the keys with the loaded config; the daemon takes
its sealers from there (``sealers_of``) and never reads a key file itself, so it encrypts with the keys that
were checked. A reload loads again, which is how a new key id (rotation) takes effect. The keys never reach
any output: they are not fields of the model.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from wsd.config.model import ChannelConfig, Config
from wsd.config.problems import ConfigError, Problems, key_path, read_text
from wsd.core.encryption import KEY_ID, KEY_ID_RULE, Sealer, is_key_text, parse_key

MAX_KEY_FILE_BYTES = 4096  # a key file is 45 bytes; anything much larger is not one


def _fingerprint(cfg: Config) -> tuple[Any, ...]:
    return tuple(sorted(cfg.encryption.keys.items()))


def check_encryption(cfg: Config, errs: Problems) -> None:
    """Check the keys, the groups that name them and the rules that would read encrypted data; keep the keys
    read with ``cfg`` (for ``sealers_of``)."""
    keys: dict[str, bytes] = {}
    for kid, file in cfg.encryption.keys.items():
        path = key_path("encryption.keys", kid)
        if not KEY_ID.fullmatch(kid):
            errs.add(path, KEY_ID_RULE)
            continue
        key = _read_key(errs, path, file)
        if key is not None:
            keys[kid] = key
    cfg.encryption._resolved = (_fingerprint(cfg), keys)  # type: ignore[attr-defined]
    encrypted: dict[str, str] = {}
    for gid, ch in cfg.channels.items():
        if not isinstance(ch, ChannelConfig) or not ch.encrypt:
            continue
        encrypted[gid] = ch.encrypt
        if ch.encrypt not in cfg.encryption.keys:
            known = ", ".join(sorted(cfg.encryption.keys)) or "none"
            errs.add(f"{key_path('channels', gid)}.encrypt",
                     f"no key {json.dumps(ch.encrypt)} in [encryption.keys] (key ids: {known})")
    if encrypted:
        _check_rules(cfg, errs, encrypted)


def _read_key(errs: Problems, path: str, file: str) -> bytes | None:
    if not file:
        errs.add(path, "must name a key file (`wsd keygen PATH` writes one)")
        return None
    try:
        st = os.stat(file)
    except OSError:
        st = None  # read_text names the error
        if is_key_text(file):  # never quote it: it is the key
            errs.add(path, "is the key itself, not the path of a key file: write it to a file only the daemon's "
                           "user can read and name that file (`wsd keygen PATH` writes one); the value is not "
                           "shown, and a key that was written in a config is no longer secret: make a new one")
            return None
    if st is not None:
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE_BYTES:
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"larger than {MAX_KEY_FILE_BYTES} bytes"
            errs.add(path, f"{json.dumps(file)} is {what}, not a key file")
            return None
        if st.st_mode & 0o007:
            errs.add(path, f"{json.dumps(file)} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                           f"a key is a secret, chmod o-rwx it (`wsd keygen` writes 0600)")
            return None
    text = read_text(errs, path, file)
    if text is None:
        return None
    try:
        return parse_key(text)
    except ValueError as exc:
        errs.add(path, f"{json.dumps(file)} {exc}")
        return None


def _check_rules(cfg: Config, errs: Problems, encrypted: dict[str, str]) -> None:
    """A rule that can see a message of an encrypted group must not read or reshape its data: the daemon holds
    only the ciphertext after publish (and history is reshaped by the rules when read)."""
    from wsd.core.expr import compile_expression

    for i, rule in enumerate(cfg.routing.rules):
        if rule is None:
            continue
        if rule.filter.channels:
            groups = sorted({c.split("/")[0] for c in rule.filter.channels if isinstance(c, str)} & set(encrypted))
        else:
            groups = sorted(encrypted)  # no channel filter: it sees every group's messages
        if not groups:
            continue
        which = ", ".join(f"{g} (encrypt = {json.dumps(encrypted[g])})" for g in groups)
        what = f"channel group {which} is" if len(groups) == 1 else f"channel groups {which} are"
        why = (f"{what} encrypted: after publish the daemon holds only ciphertext; "
               + ("name only groups that are not encrypted in filter.channels, or "
                  if rule.filter.channels else "limit the rule with filter.channels to groups that are not "
                                               "encrypted, or "))
        path = f"routing.rules[{i}]"
        expr = rule.filter.expression
        if expr.strip():
            try:
                reads = compile_expression(expr).reads_data
            except Exception:  # reported by the routing checks
                reads = False
            if reads:
                errs.add(f"{path}.filter.expression", f"reads msg.data, but {why}test other fields")
        if not _identity(rule.transform):
            errs.add(f"{path}.transform", f"changes data, but {why}remove the transform")
        for pid, tr in rule.pool_transforms.items():
            if not _identity(tr):
                errs.add(key_path(f"{path}.pool_transforms", pid), f"changes data, but {why}remove the transform")


def _identity(t: Any) -> bool:
    return not (t.include_fields or t.exclude_fields or t.rename or t.set)


def encryption_keys(cfg: Config) -> dict[str, bytes]:
    """The keys of ``cfg`` by key id: those its load read, or (for a config built in code, or whose keys changed
    since) read and checked now; raises ConfigError naming the key path."""
    kept = getattr(cfg.encryption, "_resolved", None)
    if kept is not None and kept[0] == _fingerprint(cfg):
        return kept[1]  # type: ignore[no-any-return]
    errs = Problems()
    check_encryption(cfg, errs)
    if errs.items:
        raise ConfigError(errs.lines())
    return cfg.encryption._resolved[1]  # type: ignore[attr-defined,no-any-return]


def rekeyed(running: Config, new: Config) -> list[str]:
    """Error lines for the key ids of ``new`` whose key differs from the one ``running`` holds under that id.

    A key id names one key for ever: messages in history and on their way carry it, and clients look their key
    up by it, so a reload that changes the key behind an id (a key file overwritten) is refused; a new key takes
    a new id."""
    try:
        old = encryption_keys(running)
    except ConfigError:
        return []  # the running config's files changed since: nothing to compare with
    new_keys = encryption_keys(new)
    out = []
    for kid, key in new_keys.items():
        if kid in old and old[kid] != key:
            out.append(f"{key_path('encryption.keys', kid)}: {json.dumps(new.encryption.keys[kid])} holds another "
                       f"key than the one running under this id; a key id names one key (messages in history carry "
                       f"it): give the new key a new id")
    return out


def sealers_of(cfg: Config) -> dict[str, Sealer]:
    """group id -> the Sealer of its ``encrypt`` key, for the encrypted channel groups of ``cfg``."""
    groups = {gid: ch.encrypt for gid, ch in cfg.channels.items() if ch.encrypt}
    if not groups:
        return {}
    keys = encryption_keys(cfg)
    made = {kid: Sealer(kid, keys[kid]) for kid in set(groups.values())}
    return {gid: made[kid] for gid, kid in groups.items()}


__all__ = ["check_encryption", "encryption_keys", "rekeyed", "sealers_of"]
