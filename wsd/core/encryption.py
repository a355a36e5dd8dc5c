"""Message-level encryption of published data: AES-256-GCM, once per publication.

A channel group with ``encrypt = "<key id>"`` has the ``data`` of every message published to it replaced, at
publish and before anything is stored or sent, by an envelope ``{"kid", "iv", "ct"}``: ``iv`` 12 random bytes,
``ct`` the ciphertext of the UTF-8 JSON of ``data`` followed by the 16-byte tag, both base64url without padding,
and the additional authenticated data is the channel instance name, so a ciphertext moved to another channel
does not authenticate. The push carries ``"enc": "A256GCM"``. Clients decrypt (docs/security.md,
docs/protocol.md section 7); the daemon never does.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any

import msgspec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: the value of a push's ``enc`` field for an encrypted message
ALGORITHM = "A256GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
#: a key id: it is sent with every encrypted message, so it is short and plain
KEY_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # fullmatch only
KEY_ID_RULE = "a key id is 1-64 of A-Z a-z 0-9 _ . : -"

_encode = msgspec.json.Encoder().encode


def parse_key(text: str) -> bytes:
    """The key in a key file's text: standard (padded) base64 of exactly 32 bytes, surrounding whitespace
    ignored. Raises ValueError saying what is wrong (never quoting the text: it is a secret)."""
    s = text.strip()
    if not s:
        raise ValueError("is empty")
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("is not base64 (a key file holds the base64 of 32 random bytes; "
                         "`wsd keygen PATH` writes one)") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"is the base64 of {len(raw)} bytes, not {KEY_BYTES} (`wsd keygen PATH` writes a key)")
    return raw


def is_key_text(text: str) -> bool:
    """Whether ``text`` is a key as a key file holds it (the base64 of 32 bytes), e.g. pasted where a path goes."""
    try:
        parse_key(text)
    except ValueError:
        return False
    return True


def new_key_text() -> str:
    """A fresh key as a key file holds it: the base64 of 32 random bytes, and a newline."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii") + "\n"


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


class Sealer:
    """Encrypts published data with one key (``kid``). The key is never shown (not in ``repr``)."""

    __slots__ = ("_aead", "kid")

    def __init__(self, kid: str, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AES-256 key is {KEY_BYTES} bytes, got {len(key)}")
        self.kid = kid
        self._aead = AESGCM(key)

    def seal(self, channel: str, data: Any) -> dict[str, str]:
        """The envelope of ``data`` published to channel instance ``channel`` (its AAD): once per publication."""
        iv = os.urandom(NONCE_BYTES)
        ct = self._aead.encrypt(iv, _encode(data), channel.encode("utf-8"))
        return {"kid": self.kid, "iv": _b64url(iv), "ct": _b64url(ct)}

    def __repr__(self) -> str:
        return f"Sealer(kid={self.kid!r})"
