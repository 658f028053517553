"""Bearer-token settings: one kind of key material, algorithms that fit it, iss/aud/leeway."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Self

from servicekit.exceptions import SettingError
from servicekit.settings import Env, EnvSettings, read_settings, setting

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


def _read_public_key(key: str, value: str | None) -> str | None:
    if value is None or value.lstrip().startswith(_PEM_PREFIX):
        return value
    return _read_file(key, value)


def _read_file(key: str, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingError(key, f"cannot read {path!r}: {error}") from None


@dataclass(frozen=True)
class AuthSettings(EnvSettings):
    """Validated token settings: `secret` XOR (`public_key_pem` / `jwks_json`), never both kinds."""

    algorithms: tuple[str, ...]
    """PARLEY_JWT_ALGORITHMS: its default depends on the kind of key material (see `from_env`)."""
    secret: str | None = setting(SECRET, None, repr=False)
    public_key_pem: str | None = setting(PUBLIC_KEY, None, check=_read_public_key)
    jwks_json: str | None = setting(JWKS_FILE, None, check=_read_file)
    issuer: str = setting(ISSUER, "parley")
    audience: str = setting(AUDIENCE, "parley")
    leeway_s: float = setting(LEEWAY_S, 30.0, minimum=0.0)
    dev_mode: bool = setting(DEV_MODE, False)

    @classmethod
    def from_env(cls, env: Env | None = None) -> Self:
        """Read the PARLEY_JWT_* settings; SettingError names the key that is missing or unsafe."""
        values = read_settings(cls, env := env or Env())
        secret, public_key, jwks_json = values["secret"], values["public_key_pem"], values["jwks_json"]
        asymmetric = public_key is not None or jwks_json is not None
        if secret is None and not asymmetric:
            raise SettingError(SECRET, f"no key material: set {SECRET}, {PUBLIC_KEY} or {JWKS_FILE}")
        if secret is not None and asymmetric:
            raise SettingError(SECRET, f"cannot be combined with {PUBLIC_KEY} or {JWKS_FILE}")
        if public_key is not None and jwks_json is not None:
            raise SettingError(JWKS_FILE, f"cannot be combined with {PUBLIC_KEY}; set only one")
        default = ("RS256", "ES256") if asymmetric else ("HS256",)
        algorithms = _check_algorithms(env.csv(ALGORITHMS, default), asymmetric=asymmetric)
        if secret is not None and not values["dev_mode"]:
            _check_secret_length(secret, algorithms)
        return cls(algorithms=algorithms, **values)


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
