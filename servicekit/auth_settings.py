"""Bearer-token settings: one kind of key material, algorithms that fit it, iss/aud/leeway."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from servicekit.exceptions import SettingError
from servicekit.settings import Env

SECRET = "PARLEY_JWT_SECRET"
PUBLIC_KEY = "PARLEY_JWT_PUBLIC_KEY"
JWKS_FILE = "PARLEY_JWT_JWKS_FILE"
ALGORITHMS = "PARLEY_JWT_ALGORITHMS"
ISSUER = "PARLEY_JWT_ISSUER"
AUDIENCE = "PARLEY_JWT_AUDIENCE"
LEEWAY_S = "PARLEY_JWT_LEEWAY_S"
DEV_MODE = "PARLEY_DEV_MODE"

HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_PEM_PREFIX = "-----BEGIN"


@dataclass(frozen=True)
class AuthSettings:
    """Validated token settings: `secret` XOR (`public_key_pem` / `jwks_json`), never both kinds."""

    algorithms: tuple[str, ...]
    secret: str | None = field(default=None, repr=False)
    public_key_pem: str | None = None
    jwks_json: str | None = None
    issuer: str = "parley"
    audience: str = "parley"
    leeway_s: float = 30.0
    dev_mode: bool = False

    @classmethod
    def from_env(cls, env: Env) -> AuthSettings:
        """Read the PARLEY_JWT_* settings; SettingError names the key that is missing or unsafe."""
        secret = env.optional_str(SECRET)
        public_key = _read_public_key(env.optional_str(PUBLIC_KEY))
        jwks_json = _read_file(JWKS_FILE, env.optional_str(JWKS_FILE))
        dev_mode = env.bool(DEV_MODE, False)
        asymmetric = public_key is not None or jwks_json is not None
        if secret is None and not asymmetric:
            raise SettingError(SECRET, f"no key material: set {SECRET}, {PUBLIC_KEY} or {JWKS_FILE}")
        if secret is not None and asymmetric:
            raise SettingError(SECRET, f"cannot be combined with {PUBLIC_KEY} or {JWKS_FILE}")
        if public_key is not None and jwks_json is not None:
            raise SettingError(JWKS_FILE, f"cannot be combined with {PUBLIC_KEY}; set only one")
        default = ("RS256", "ES256") if asymmetric else ("HS256",)
        algorithms = _check_algorithms(env.csv(ALGORITHMS, default), asymmetric=asymmetric)
        if secret is not None and not dev_mode:
            _check_secret_length(secret, algorithms)
        return cls(
            algorithms=algorithms,
            secret=secret,
            public_key_pem=public_key,
            jwks_json=jwks_json,
            issuer=env.str(ISSUER, "parley"),
            audience=env.str(AUDIENCE, "parley"),
            leeway_s=env.float(LEEWAY_S, 30.0, minimum=0.0),
            dev_mode=dev_mode,
        )


def _read_public_key(value: str | None) -> str | None:
    if value is None or value.lstrip().startswith(_PEM_PREFIX):
        return value
    return _read_file(PUBLIC_KEY, value)


def _read_file(key: str, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingError(key, f"cannot read {path!r}: {error}") from None


def _check_algorithms(algorithms: tuple[str, ...], *, asymmetric: bool) -> tuple[str, ...]:
    if not algorithms:
        raise SettingError(ALGORITHMS, "lists no algorithm")
    for name in algorithms:
        if name.lower() == "none":
            raise SettingError(ALGORITHMS, "'none' is never allowed")
        if name not in HMAC_ALGORITHMS and name not in ASYMMETRIC_ALGORITHMS:
            raise SettingError(ALGORITHMS, f"unsupported algorithm {name!r}")
        if asymmetric and name in HMAC_ALGORITHMS:
            raise SettingError(ALGORITHMS, f"{name} cannot be used with a public key or JWKS")
        if not asymmetric and name in ASYMMETRIC_ALGORITHMS:
            raise SettingError(ALGORITHMS, f"{name} needs {PUBLIC_KEY} or {JWKS_FILE}")
    return algorithms


def _check_secret_length(secret: str, algorithms: tuple[str, ...]) -> None:
    needed = max(HMAC_ALGORITHMS[name] for name in algorithms)
    length = len(secret.encode("utf-8"))
    if length < needed:
        raise SettingError(SECRET, f"is {length} bytes; at least {needed} are required outside {DEV_MODE}")
