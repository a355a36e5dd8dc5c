"""Token keys: the checks of ``[auth]`` and the key material they read, once per load.

The loader reads ``auth.secret_file`` / ``auth.public_key_file`` / ``auth.private_key_file`` while
checking them and keeps what it read with the loaded config as a :class:`ResolvedAuth`; the daemon
takes its keys from there (``resolved_auth``) and never reads the files itself, so the keys it runs
with are the ones that were checked. A reload loads again, so a rotated key file takes effect then.
"""

import json
from typing import Any

from wsd.config.model import AuthConfig, Config, ResolvedAuth
from wsd.config.problems import ConfigError, Problems, read_text

HS_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512",
              "EdDSA")


def _fingerprint(a: AuthConfig) -> tuple[Any, ...]:
    """The keys of ``[auth]`` that decide the key material (a change makes kept material stale)."""
    return (tuple(a.algorithms), a.secret, a.secret_file, a.public_key_file, a.private_key_file)


def keep_auth(cfg: Config, auth: ResolvedAuth) -> None:
    """Keep ``auth`` (read by the loader) with ``cfg`` for :func:`resolved_auth`."""
    cfg.auth._resolved = (_fingerprint(cfg.auth), auth)  # type: ignore[attr-defined]


def resolved_auth(cfg: Config) -> ResolvedAuth:
    """The token keys of ``cfg``: those its load read, or (for a config built in code, or whose
    ``[auth]`` changed since) read and checked now; raises ConfigError naming the key path."""
    kept = getattr(cfg.auth, "_resolved", None)
    if kept is not None and kept[0] == _fingerprint(cfg.auth):
        return kept[1]  # type: ignore[no-any-return]
    errs = Problems()
    auth = check_auth(cfg.auth, errs, from_file=False)
    if errs.items:
        raise ConfigError(errs.lines())
    keep_auth(cfg, auth)
    return auth


def resolved_secret(cfg: Config) -> str:
    """The HMAC secret: ``auth.secret``, else the content of ``auth.secret_file``; '' when neither is set."""
    auth = resolved_auth(cfg)
    return auth.verify_key if auth.hmac else ""


def resolved_public_key(cfg: Config) -> str:
    """The PEM text of ``auth.public_key_file`` ('' when not set): the key tokens verify with."""
    auth = resolved_auth(cfg)
    return "" if auth.hmac else auth.verify_key


def resolved_private_key(cfg: Config) -> str:
    """The PEM text of ``auth.private_key_file`` ('' when not set): lets the daemon sign RS/PS/ES tokens."""
    auth = resolved_auth(cfg)
    return "" if auth.hmac else auth.sign_key


def check_auth(a: AuthConfig, errs: Problems, *, from_file: bool) -> ResolvedAuth:
    """Check ``[auth]`` and read its key files once; the keys read (empty ones when a check failed)."""
    algs = [x for x in a.algorithms if isinstance(x, str)]
    empty = ResolvedAuth(tuple(algs))
    if not a.algorithms:
        errs.add("auth.algorithms", 'must name at least one algorithm, e.g. ["HS256"]')
    known = True
    for i, alg in enumerate(algs):
        if alg.lower() == "none":
            errs.add(f"auth.algorithms[{i}]", '"none" is never allowed: it accepts unsigned tokens')
            known = False
        elif alg not in HS_MIN_BYTES and alg not in ASYMMETRIC:
            errs.add(f"auth.algorithms[{i}]", f"unknown algorithm {json.dumps(alg)}; expected one of "
                     + ", ".join([*HS_MIN_BYTES, *ASYMMETRIC]))
            known = False
    hmac = [x for x in algs if x in HS_MIN_BYTES]
    asym = [x for x in algs if x in ASYMMETRIC]
    if hmac and asym:
        errs.add("auth.algorithms", f"mixes HMAC ({', '.join(hmac)}) with public-key ({', '.join(asym)}) "
                 "algorithms; a public key must never be accepted as an HMAC secret: pick one family")
        return empty
    if not known or not algs:
        return empty
    if a.secret and a.secret_file:
        errs.add("auth.secret_file", "set auth.secret or auth.secret_file, not both")
        return empty
    if hmac:
        for key in ("public_key_file", "private_key_file"):
            if getattr(a, key):
                errs.add(f"auth.{key}", f"only used with public-key algorithms, not {', '.join(hmac)}")
        secret, where = a.secret, "auth.secret"
        if a.secret_file:
            where = "auth.secret_file"
            text = read_text(errs, where, a.secret_file)
            if text is None:
                return empty
            secret = text.strip()
            if not secret:
                errs.add(where, f"{json.dumps(a.secret_file)} is empty")
                return empty
        if not secret:
            if from_file:
                errs.add("auth.secret", f"required for {', '.join(hmac)}: set auth.secret or "
                         "auth.secret_file (or WSD_AUTH_SECRET); `wsd config init` writes a random one")
            return empty
        need = max(HS_MIN_BYTES[x] for x in hmac)
        size = len(secret.encode("utf-8"))
        if size < need:
            errs.add(where, f"too short for {', '.join(hmac)}: {size} bytes, need at least {need} random "
                     "bytes "
                     "(`wsd config init` writes one)")
            return empty
        if ("BEGIN" in secret and "KEY" in secret) or secret.startswith("ssh-"):
            errs.add(where, "looks like a PEM/SSH key, not an HMAC secret (HS/RS confusion)")
            return empty
        return ResolvedAuth(tuple(algs), secret, secret)
    # Public-key family.
    if a.secret or a.secret_file:
        key = "auth.secret" if a.secret else "auth.secret_file"
        errs.add(key, f"not used with {', '.join(asym)}: remove it (tokens verify with auth.public_key_file)")
    if not a.public_key_file:
        errs.add("auth.public_key_file", f"required for {', '.join(asym)}: a PEM public key file")
        return empty
    import jwt

    pub_pem = read_text(errs, "auth.public_key_file", a.public_key_file)
    if pub_pem is None:
        return empty
    pub = None
    for alg in asym:
        try:
            pub = jwt.get_algorithm_by_name(alg).prepare_key(pub_pem)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            errs.add("auth.public_key_file", f"not a usable {alg} public key: {exc or type(exc).__name__}")
            return empty
    if pub is not None and hasattr(pub, "private_bytes"):
        errs.add("auth.public_key_file", "holds a private key; give the public key here "
                 "(and the private key in auth.private_key_file)")
        return empty
    if not a.private_key_file:
        return ResolvedAuth(tuple(algs), pub_pem, "")
    priv_pem = read_text(errs, "auth.private_key_file", a.private_key_file)
    if priv_pem is None:
        return empty
    try:
        priv = jwt.get_algorithm_by_name(asym[0]).prepare_key(priv_pem)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        errs.add("auth.private_key_file", f"not a usable {asym[0]} private key: {exc or type(exc).__name__}")
        return empty
    if not hasattr(priv, "private_bytes"):
        errs.add("auth.private_key_file", "holds a public key, not a private key")
        return empty
    from cryptography.hazmat.primitives import serialization

    def spki(key: Any) -> bytes:
        der, spki_format = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        return bytes(key.public_bytes(der, spki_format))

    if pub is not None and spki(priv.public_key()) != spki(pub):
        errs.add("auth.private_key_file",
                 "does not match auth.public_key_file (tokens it signs would not verify)")
        return empty
    return ResolvedAuth(tuple(algs), pub_pem, priv_pem)
