"""JWT verification and signing, and where a token is found in a handshake.

Algorithms are pinned by config (never taken from the token header); ``exp`` is required;
the token size is capped before any decoding. The token itself is never logged or kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from wsd.core.channels import ID_RULE, valid_segment


class AuthError(Exception):
    """A token that does not authenticate; ``code`` is the handshake error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Claims:
    """What a verified token says, with the token itself left out."""

    __slots__ = ("company_id", "exp", "extra", "pool", "roles", "user_id")

    def __init__(self, user_id: str, company_id: str, roles: tuple[str, ...], pool: str, exp: float,
                 extra: dict[str, Any]) -> None:
        self.user_id = user_id
        self.company_id = company_id
        self.roles = roles
        self.pool = pool
        self.exp = exp
        self.extra = extra

    def as_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "company_id": self.company_id, "roles": list(self.roles),
                "pool": self.pool, "exp": self.exp, "claims": self.extra}


SUBPROTOCOL = "wsd.v1"
BEARER_PREFIX = "bearer."


def extract_token(headers: Mapping[str, str], query: Mapping[str, list[str]], subprotocols: Sequence[str]
                  ) -> tuple[str | None, str]:
    """The token and where it came from: Authorization header, ``token`` query, ``bearer.`` subprotocol."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), "header"
    vals = query.get("token")
    if vals and vals[0]:
        return vals[0], "query"
    for proto in subprotocols:
        if proto.startswith(BEARER_PREFIX) and len(proto) > len(BEARER_PREFIX):
            return proto[len(BEARER_PREFIX):], "subprotocol"
    return None, ""


def _prepared_once(jws: jwt.PyJWS, names: Sequence[str], key: str) -> None:
    """Let ``jws`` prepare ``key`` once per algorithm rather than at every verification.

    PyJWT prepares the key on each decode: for HMAC that is a check that the secret is not a PEM, SSH, DER
    or JWK key (a DER parse attempt and a JSON parse of the secret), for RSA/EC a key load — most of a
    handshake's token cost. The checks still run, once, on the configured key; any other key is prepared
    as PyJWT does it.
    """
    for name in names:
        try:
            alg = copy.copy(jws.get_algorithm_by_name(name))
        except NotImplementedError:
            continue  # PyJWT refuses it at decode, naming it
        prepare = alg.prepare_key
        prepared: list[Any] = []

        def prepare_key(k: Any, prepare: Any = prepare, prepared: list[Any] = prepared) -> Any:
            if k is not key:
                return prepare(k)
            if not prepared:
                prepared.append(prepare(k))  # raises for a key the algorithm refuses (each time)
            return prepared[0]

        alg.prepare_key = prepare_key  # type: ignore[method-assign]
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, alg)


class _Decoder(jwt.PyJWT):
    """PyJWT's decoder with the configured key prepared once (``_prepared_once``)."""

    def __init__(self, algorithms: Sequence[str], key: str) -> None:
        super().__init__()
        _prepared_once(self._jws, algorithms, key)


class TokenVerifier:
    """Verifies tokens against the configured key, algorithms, issuer, audience and leeway."""

    def __init__(self, auth: Any, key: str) -> None:
        self.algorithms = list(auth.algorithms)
        self.key = key
        self._decode = _Decoder(self.algorithms, key).decode
        self.issuer = auth.issuer or None
        self.audience = auth.audience or None
        self.leeway = auth.leeway_s
        self.max_bytes = auth.max_token_bytes
        self.user_claim = auth.user_claim
        self.company_claim = auth.company_claim
        self.roles_claim = auth.roles_claim
        self.pool_claim = auth.pool_claim
        require = ["exp"]
        if self.issuer:
            require.append("iss")
        if self.audience:
            require.append("aud")
        self._options = {"require": require, "verify_aud": bool(self.audience)}

    def verify(self, token: str) -> Claims:
        if len(token) > self.max_bytes:
            raise AuthError("invalid_token", f"token larger than {self.max_bytes} bytes")
        try:
            payload = self._decode(token, self.key, algorithms=self.algorithms, issuer=self.issuer,
                                   audience=self.audience, leeway=self.leeway, options=self._options)
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("invalid_token", "token not valid yet (nbf/iat)") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("invalid_token", "token algorithm not allowed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_token", f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise AuthError("invalid_token", "token issuer not accepted") from None
        except jwt.InvalidAudienceError:
            raise AuthError("invalid_token", "token audience not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "token signature does not verify") from None
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "token is malformed") from None
        claims = self._claims(payload)
        # The leeway absorbs clock skew for nbf/iat only: a connection is closed at `exp` (4001), so a
        # token already past it is refused here rather than welcomed and closed a second later.
        if claims.exp <= time.time():
            raise AuthError("token_expired", "token expired")
        return claims

    def _claims(self, payload: dict[str, Any]) -> Claims:
        user = payload.get(self.user_claim)
        if not isinstance(user, str) or not valid_segment(user):
            raise AuthError("invalid_token", f"claim {self.user_claim!r} must be a plain id: {ID_RULE}")
        company = payload.get(self.company_claim, "")
        if company is None:
            company = ""
        if not isinstance(company, str) or (company and not valid_segment(company)):
            raise AuthError("invalid_token", f"claim {self.company_claim!r} must be a plain id: {ID_RULE}")
        roles = payload.get(self.roles_claim, [])
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("invalid_token", f"claim {self.roles_claim!r} must be a list of strings")
        pool = payload.get(self.pool_claim, "") or ""
        if not isinstance(pool, str):
            raise AuthError("invalid_token", f"claim {self.pool_claim!r} must be a string")
        exp = payload.get("exp")
        if not isinstance(exp, (int, float)):
            raise AuthError("invalid_token", "claim 'exp' must be a number")
        skip = {self.user_claim, self.company_claim, self.roles_claim, self.pool_claim, "exp"}
        extra = {k: v for k, v in payload.items() if k not in skip}
        return Claims(user, company, tuple(roles), pool, float(exp), extra)


class TokenSigner:
    """Signs tokens with the daemon's own key (HS secret, or a private key for RS/ES/PS)."""

    def __init__(self, auth: Any, key: str) -> None:
        self.algorithm = auth.algorithms[0]
        self.key = key
        self.auth = auth

    def sign(self, user_id: str, company_id: str = "", roles: Sequence[str] = (), pool: str = "",
             ttl_s: float | None = None, now: float | None = None) -> tuple[str, float]:
        now = time.time() if now is None else now
        exp = int(now + (ttl_s if ttl_s is not None else self.auth.token_ttl_s))
        claims: dict[str, Any] = {self.auth.user_claim: user_id, self.auth.roles_claim: list(roles),
                                  "iat": int(now), "exp": exp}
        if company_id:
            claims[self.auth.company_claim] = company_id
        if pool:
            claims[self.auth.pool_claim] = pool
        if self.auth.issuer:
            claims["iss"] = self.auth.issuer
        if self.auth.audience:
            claims["aud"] = self.auth.audience
        return jwt.encode(claims, self.key, algorithm=self.algorithm), float(exp)
