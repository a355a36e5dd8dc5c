"""Token keys come from the config's load: a rotated key file takes effect on reload, and only then.

The daemon verifies and signs with the keys the loader read and checked; it never reads a key file
on its own. A reload reads the files again: the new key is live, the old one refused. A reload with a
broken key file is refused with the key path, and the running keys stay.
"""

from __future__ import annotations

import signal
from pathlib import Path

import jwt
import pytest

from tests.harness import BASE_CONFIG, SECRET, ControlError, handshake, make_token, wait_for

OLD_SECRET = SECRET
NEW_SECRET = "rotated-secret-" + "9876543210" * 5


def _status(w, token: str) -> int:
    """The HTTP status of a WebSocket handshake on the frontend pool with ``token``."""
    return handshake(w.port, f"/ws/frontend?token={token}")[0]


def _pem_pair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return pub, priv


def _hs_file_config() -> str:
    base = BASE_CONFIG.replace(f'secret = "{SECRET}"', 'secret_file = "jwt.secret"')
    assert base != BASE_CONFIG
    return base


async def test_rotated_hs256_secret_file_takes_effect_on_sighup(wsd_factory) -> None:
    """HS256 from auth.secret_file: a new secret in the file is ignored until SIGHUP, then it is the
    only one accepted."""
    w = wsd_factory(base=_hs_file_config(), start=False)
    secret_file = w.workdir / "jwt.secret"
    secret_file.write_text(OLD_SECRET + "\n")
    w.start()
    old, new = make_token(secret=OLD_SECRET), make_token(secret=NEW_SECRET)
    assert _status(w, old) == 101 and _status(w, new) == 401

    secret_file.write_text(NEW_SECRET + "\n")
    assert _status(w, old) == 101 and _status(w, new) == 401  # no reload yet: the running key stays
    w.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        events = (await w.ctl("events.recent", limit=50))["events"]
        return any(e["event"] == "reload" for e in events)

    await wait_for(reloaded, timeout=5)
    assert _status(w, new) == 101 and _status(w, old) == 401


async def test_rotated_rs256_key_pair_takes_effect_on_reload(wsd_factory) -> None:
    """RS256 from key files: after the pair is replaced and the daemon reloaded, tokens of the new key
    verify, those of the old key are refused, and tokens the daemon mints verify with the new key."""
    (pub1, priv1), (pub2, priv2) = _pem_pair(), _pem_pair()
    base = BASE_CONFIG.replace(f'algorithms = ["HS256"]\nsecret = "{SECRET}"',
                               'algorithms = ["RS256"]\npublic_key_file = "jwt.pub.pem"\n'
                               'private_key_file = "jwt.key.pem"')
    assert base != BASE_CONFIG
    w = wsd_factory(base=base, start=False)
    (w.workdir / "jwt.pub.pem").write_text(pub1)
    (w.workdir / "jwt.key.pem").write_text(priv1)
    w.start()
    old = make_token(secret=priv1, algorithm="RS256")
    new = make_token(secret=priv2, algorithm="RS256")
    assert _status(w, old) == 101 and _status(w, new) == 401
    minted = (await w.ctl("token", user="bob"))["token"]
    assert jwt.decode(minted, pub1, algorithms=["RS256"], options={"verify_aud": False})["sub"] == "bob"

    (w.workdir / "jwt.pub.pem").write_text(pub2)
    (w.workdir / "jwt.key.pem").write_text(priv2)
    assert _status(w, old) == 101 and _status(w, new) == 401  # no reload yet
    res = await w.ctl("reload")
    assert res["ok"] is True
    assert _status(w, new) == 101 and _status(w, old) == 401
    minted = (await w.ctl("token", user="bob"))["token"]
    assert jwt.decode(minted, pub2, algorithms=["RS256"], options={"verify_aud": False})["sub"] == "bob"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(minted, pub1, algorithms=["RS256"], options={"verify_aud": False})


async def test_reload_with_a_broken_rotated_key_keeps_the_running_key(wsd_factory) -> None:
    """A key file replaced by something that is not a key: the reload is refused naming
    auth.public_key_file, and the keys read at the last good load keep working."""
    pub, priv = _pem_pair()
    base = BASE_CONFIG.replace(f'algorithms = ["HS256"]\nsecret = "{SECRET}"',
                               'algorithms = ["RS256"]\npublic_key_file = "jwt.pub.pem"')
    w = wsd_factory(base=base, start=False)
    key_file: Path = w.workdir / "jwt.pub.pem"
    key_file.write_text(pub)
    w.start()
    token = make_token(secret=priv, algorithm="RS256")
    assert _status(w, token) == 101

    key_file.write_text("not a key\n")
    with pytest.raises(ControlError) as err:
        await w.ctl("reload")
    assert "auth.public_key_file: not a usable RS256 public key" in err.value.message
    assert _status(w, token) == 101  # verified with the key read at start, not the file on disk now

    key_file.unlink()
    with pytest.raises(ControlError) as err:
        await w.ctl("reload")
    assert "auth.public_key_file: cannot read" in err.value.message
    assert _status(w, token) == 101
    assert w.proc.poll() is None
