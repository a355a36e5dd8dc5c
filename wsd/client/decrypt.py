"""Decrypting the data of messages of encrypted channel groups (docs/security.md, docs/protocol.md section 7).

The daemon encrypts once at publish with AES-256-GCM: the push has ``"enc": "A256GCM"`` and ``data`` is
``{"kid", "iv", "ct"}`` (base64url without padding; ``ct`` is the ciphertext and its 16-byte tag), the
additional authenticated data is the push's ``channel``. The application gives the client its keys by id.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALGORITHM = "A256GCM"
KEY_BYTES = 32
_decode = msgspec.json.Decoder().decode


def prepare_keys(keys: Mapping[str, bytes | str] | None) -> dict[str, AESGCM]:
    """The application's keys (key id -> 32 bytes, or the base64 text of a key file) ready to decrypt.

    Raises ValueError naming the key id of a key that is not 32 bytes (the key itself is never shown)."""
    out: dict[str, AESGCM] = {}
    for kid, key in (keys or {}).items():
        raw = key
        if isinstance(key, str):
            try:
                raw = base64.b64decode(key.strip().encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                raise ValueError(f"keys[{kid!r}]: not base64 (give the 32 bytes, or a key file's text)") from None
        if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) != KEY_BYTES:
            raise ValueError(f"keys[{kid!r}]: an AES-256 key is {KEY_BYTES} bytes")
        out[str(kid)] = AESGCM(bytes(raw))
    return out


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64url(s: Any) -> bytes:
    """base64url without padding, as the daemon writes it; anything else (padding, other characters) is refused,
    as the JavaScript client refuses it, so both clients call the same envelopes malformed."""
    if not isinstance(s, str) or not _B64URL.fullmatch(s):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def open_envelope(keys: Mapping[str, AESGCM], channel: str, enc: Any, data: Any
                  ) -> tuple[Any, str | None, str | None]:
    """``(data, key_id, decrypt_error)`` of a push with ``enc`` and ``data`` on ``channel``.

    Decrypted: the plaintext value, its kid and None. Not decryptable: the envelope as received, its kid (or
    None) and a short reason: ``no key for kid '...'``, ``authentication failed`` or ``malformed`` (an
    ``enc`` other than A256GCM too, as the contract and the JavaScript client have it). A push without ``enc``
    is returned as it is, with ``None, None``."""
    if enc is None:
        return data, None, None
    kid = data.get("kid") if isinstance(data, dict) else None
    kid = kid if isinstance(kid, str) else None
    if enc != ALGORITHM:
        return data, kid, "malformed"
    if kid is None:
        return data, None, "malformed"
    aead = keys.get(kid)
    if aead is None:
        return data, kid, f"no key for kid {kid[:64]!r}"
    try:
        iv, ct = _unb64url(data.get("iv")), _unb64url(data.get("ct"))
    except (ValueError, binascii.Error):
        return data, kid, "malformed"
    if len(iv) != 12 or len(ct) < 16:
        return data, kid, "malformed"
    try:
        plain = aead.decrypt(iv, ct, channel.encode("utf-8"))
    except InvalidTag:
        return data, kid, "authentication failed"
    try:
        return _decode(plain), kid, None
    except msgspec.DecodeError:
        return data, kid, "malformed"
