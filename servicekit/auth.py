"""Bearer-token verification: every refusal is an InvalidToken with a stable `reason` slug."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidSubjectError, PyJWTError
from jwt.warnings import InsecureKeyLengthWarning

from servicekit.auth_settings import (
    ALGORITHMS,
    HMAC_ALGORITHMS,
    JWKS_FILE,
    PUBLIC_KEY,
    AuthSettings,
)
from servicekit.exceptions import InvalidToken, MissingToken, SettingError

SUBJECT = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MAX_TOKEN_CHARS = 8192
CACHE_SIZE = 4096

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_REQUIRED = ["exp", "nbf", "sub", "iss", "aud"]
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_REASONS: tuple[tuple[type[PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired-token"),
    (jwt.ImmatureSignatureError, "token-not-yet-valid"),
    (jwt.InvalidSignatureError, "bad-signature"),
    (jwt.InvalidAudienceError, "wrong-audience"),
    (jwt.InvalidIssuerError, "wrong-issuer"),
    (jwt.InvalidAlgorithmError, "disallowed-algorithm"),
    (jwt.MissingRequiredClaimError, "missing-claim"),
    (InvalidSubjectError, "invalid-subject"),
    (jwt.InvalidKeyError, "bad-signature"),
)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: `sub` as user_id, `exp` as epoch seconds, read-only claims."""

    user_id: str
    expires_at: float
    claims: Mapping[str, object]


def parse_bearer(header_value: str | None) -> str:
    """Return the token of `Bearer <token>`; MissingToken if absent, InvalidToken if malformed."""
    if header_value is None or not header_value.strip():
        raise MissingToken("no bearer token in the Authorization header")
    parts = header_value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise InvalidToken("expected 'Authorization: Bearer <token>'", "malformed-authorization")
    return parts[1]


class TokenVerifier:
    """Verifies JWTs per AuthSettings; a bounded LRU of verified tokens is re-timed on every hit."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        now: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._now = now
        self._leeway = settings.leeway_s
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Principal, float | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._decoder = jwt.PyJWT(
            options={
                "require": list(_REQUIRED),
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            }
        )
        self._key: PublicKey | bytes = b""
        self._jwks: dict[str, jwt.PyJWK] | None = None
        self._quiet = False
        if settings.secret is not None:
            self._key = settings.secret.encode("utf-8")
            self._algorithms = list(settings.algorithms)
            needed = max(HMAC_ALGORITHMS[name] for name in settings.algorithms)
            self._quiet = len(self._key) < needed
        elif settings.public_key_pem is not None:
            self._key = _load_public_key(settings.public_key_pem)
            usable = _algorithms_for(self._key)
            self._algorithms = [name for name in settings.algorithms if name in usable]
            if not self._algorithms:
                raise SettingError(
                    ALGORITHMS, f"none of {settings.algorithms} fits the {PUBLIC_KEY} key type"
                )
        elif settings.jwks_json is not None:
            self._algorithms = list(settings.algorithms)
            self._jwks = _load_jwks(settings.jwks_json, frozenset(self._algorithms))
        else:
            raise SettingError(PUBLIC_KEY, "AuthSettings carries no key material")

    def verify(self, token: str) -> Principal:
        """Return the Principal of a valid token; raise InvalidToken (with `reason`) otherwise."""
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None:
                self._cache.move_to_end(token)
        if cached is not None:
            principal, not_before = cached
            try:
                self._check_time(principal.expires_at, not_before)
            except InvalidToken as error:
                if error.reason == "expired-token":
                    with self._lock:
                        self._cache.pop(token, None)
                raise
            return principal
        principal, not_before = self._decode(token)
        self._check_time(principal.expires_at, not_before)
        with self._lock:
            self._cache[token] = (principal, not_before)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    def _check_time(self, expires_at: float, not_before: float | None) -> None:
        now = self._now()
        if expires_at <= now - self._leeway:
            raise InvalidToken("token has expired", "expired-token")
        if not_before is not None and not_before > now + self._leeway:
            raise InvalidToken("token is not valid yet", "token-not-yet-valid")

    def _decode(self, token: str) -> tuple[Principal, float | None]:
        if len(token) > MAX_TOKEN_CHARS or _TOKEN_SHAPE.fullmatch(token) is None:
            raise InvalidToken("token is not a compact JWS", "malformed-token")
        try:
            claims = self._decode_claims(token)
        except PyJWTError as error:
            raise _translate(error) from error
        except (ValueError, TypeError, OverflowError, RecursionError) as error:
            raise InvalidToken(f"malformed token: {error}", "malformed-token") from error
        subject = claims["sub"]
        if not isinstance(subject, str) or SUBJECT.fullmatch(subject) is None:
            raise InvalidToken("sub is not a valid user id", "invalid-subject")
        expires_at = _number(claims, "exp")
        if expires_at is None:
            raise InvalidToken("exp is missing", "missing-claim")
        not_before = _number(claims, "nbf")
        if not_before is None:
            raise InvalidToken("nbf is missing", "missing-claim")
        _number(claims, "iat")
        return Principal(subject, expires_at, MappingProxyType(claims)), not_before

    def _decode_claims(self, token: str) -> dict[str, Any]:
        with (
            warnings.catch_warnings(action="ignore", category=InsecureKeyLengthWarning)
            if self._quiet
            else nullcontext()
        ):
            return self._decoder.decode(
                token,
                self._key_for(token),
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
            )

    def _key_for(self, token: str) -> PublicKey | bytes | jwt.PyJWK:
        if self._jwks is None:
            return self._key
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None:
            raise InvalidToken("token header has no kid", "bad-signature")
        key = self._jwks.get(kid)
        if key is None:
            raise InvalidToken(f"no key for kid {kid!r}", "bad-signature")
        return key


def _translate(error: PyJWTError) -> InvalidToken:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return InvalidToken(str(error), reason)
    return InvalidToken(f"malformed token: {error}", "malformed-token")


def _number(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{name} is not a number", "malformed-token")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidToken(f"{name} is not a finite number", "malformed-token")
    return number


def _load_public_key(pem: str) -> PublicKey:
    try:
        key = load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError) as error:
        raise SettingError(PUBLIC_KEY, f"not a PEM public key: {error}") from None
    if not isinstance(key, PublicKey):
        raise SettingError(PUBLIC_KEY, f"unsupported key type {type(key).__name__}")
    return key


def _algorithms_for(key: PublicKey) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = _EC_ALGORITHMS.get(key.curve.name)
        return frozenset() if name is None else frozenset({name})
    return frozenset({"EdDSA"})


def _load_jwks(text: str, allowed: frozenset[str]) -> dict[str, jwt.PyJWK]:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        keyset = jwt.PyJWKSet.from_dict(data)
    except (ValueError, PyJWTError) as error:
        raise SettingError(JWKS_FILE, f"not a usable JWKS: {error}") from None
    keys: dict[str, jwt.PyJWK] = {}
    for jwk in keyset.keys:
        kid = jwk.key_id
        if kid is None or jwk.public_key_use == "enc" or jwk.algorithm_name not in allowed:
            continue
        if kid in keys:
            raise SettingError(JWKS_FILE, f"two keys share kid {kid!r}")
        keys[kid] = jwk
    if not keys:
        raise SettingError(JWKS_FILE, f"no signing key with a kid for algorithms {sorted(allowed)}")
    return keys
