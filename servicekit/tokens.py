"""Development-only token minting with the shared HS256 secret."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from servicekit.auth import SUBJECT
from servicekit.auth_settings import ALGORITHMS, DEV_MODE, HMAC_ALGORITHMS, SECRET, AuthSettings
from servicekit.exceptions import DevModeRequired, SettingError

RESERVED_CLAIMS = frozenset({"sub", "iss", "aud", "iat", "nbf", "exp"})


def mint_token(
    settings: AuthSettings,
    user_id: str,
    ttl_s: float = 3600,
    now: float | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """Return an HS256 token for user_id valid ttl_s from now; DevModeRequired outside dev mode."""
    if not settings.dev_mode:
        raise DevModeRequired(f"minting tokens requires {DEV_MODE}=1")
    if settings.secret is None:
        raise SettingError(SECRET, "is required to mint tokens")
    if "HS256" not in settings.algorithms:
        raise SettingError(ALGORITHMS, "must allow HS256 to mint tokens")
    if SUBJECT.fullmatch(user_id) is None:
        raise ValueError(f"user_id {user_id!r} does not match {SUBJECT.pattern}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    clashes = RESERVED_CLAIMS.intersection(extra or {})
    if clashes:
        raise ValueError(f"extra may not set {sorted(clashes)}")
    issued = time.time() if now is None else now
    payload = {
        **(extra or {}),
        "sub": user_id,
        "iss": settings.issuer,
        "aud": settings.audience,
        "iat": math.floor(issued),
        "nbf": math.floor(issued),
        "exp": math.floor(issued + ttl_s),
    }
    key = settings.secret.encode("utf-8")
    short = len(key) < HMAC_ALGORITHMS["HS256"]
    quiet = warnings.catch_warnings(action="ignore", category=InsecureKeyLengthWarning)
    with quiet if short else nullcontext():
        return jwt.encode(payload, key, algorithm="HS256")
