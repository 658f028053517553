"""Token settings, verification and minting: every refusal is InvalidToken with a stable reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from servicekit.auth import Principal, TokenVerifier, parse_bearer
from servicekit.auth_settings import AuthSettings
from servicekit.exceptions import DevModeRequired, InvalidToken, MissingToken, SettingError
from servicekit.settings import Env
from servicekit.tokens import mint_token

SECRET = "0123456789abcdef0123456789abcdef-secret"
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": "parley",
        "aud": "parley",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 3600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hand_signed_hs256(payload_json: str, key: bytes) -> str:
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64(payload_json.encode())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def hs_token(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def settings(**environ: str) -> AuthSettings:
    return AuthSettings.from_env(Env(environ))


def hs_verifier(clock: Clock | None = None, **environ: str) -> TokenVerifier:
    return TokenVerifier(settings(PARLEY_JWT_SECRET=SECRET, **environ), now=clock or Clock())


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token)
    return caught.value.reason


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}))
    return path


# --- verification ---------------------------------------------------------------------------


def test_valid_hs256_token_yields_principal() -> None:
    principal = hs_verifier().verify(hs_token(role="admin"))
    assert principal == Principal("alice", NOW + 3600, principal.claims)
    assert principal.claims["role"] == "admin"
    assert principal.claims["iss"] == "parley"


def test_expired_token_is_refused() -> None:
    assert refused(hs_verifier(), hs_token(exp=int(NOW) - 60)) == "expired-token"


def test_cached_token_is_refused_once_it_expires() -> None:
    clock = Clock()
    verifier = hs_verifier(clock)
    token = hs_token(exp=int(NOW) + 60)
    first = verifier.verify(token)
    assert verifier.verify(token) is first
    clock.t = NOW + 60 + 31
    assert refused(verifier, token) == "expired-token"
    assert refused(verifier, token) == "expired-token"


def test_cache_is_bounded() -> None:
    verifier = TokenVerifier(settings(PARLEY_JWT_SECRET=SECRET), now=Clock(), cache_size=2)
    tokens = [hs_token(sub=f"user{i}") for i in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._cache) == 2
    assert [verifier.verify(t).user_id for t in tokens] == [f"user{i}" for i in range(5)]


def test_token_not_yet_valid_is_refused() -> None:
    assert refused(hs_verifier(), hs_token(nbf=int(NOW) + 120)) == "token-not-yet-valid"


def test_leeway_is_honoured() -> None:
    verifier = hs_verifier(PARLEY_JWT_LEEWAY_S="30")
    assert verifier.verify(hs_token(exp=int(NOW) - 20)).user_id == "alice"
    assert verifier.verify(hs_token(nbf=int(NOW) + 20)).user_id == "alice"
    assert refused(verifier, hs_token(exp=int(NOW) - 40)) == "expired-token"
    assert refused(verifier, hs_token(nbf=int(NOW) + 40)) == "token-not-yet-valid"
    strict = hs_verifier(PARLEY_JWT_LEEWAY_S="0")
    assert refused(strict, hs_token(exp=int(NOW) - 1)) == "expired-token"


def test_bad_signature_is_refused() -> None:
    verifier = hs_verifier()
    assert refused(verifier, hs_token(secret="x" * 40)) == "bad-signature"
    header, _, signature = hs_token().split(".")
    forged = f"{header}.{b64json(claims(sub='mallory'))}.{signature}"
    assert refused(verifier, forged) == "bad-signature"


def test_wrong_audience_and_issuer_are_refused() -> None:
    verifier = hs_verifier()
    assert refused(verifier, hs_token(aud="billing")) == "wrong-audience"
    assert refused(verifier, hs_token(iss="evil")) == "wrong-issuer"
    assert verifier.verify(hs_token(aud=["billing", "parley"])).user_id == "alice"


@pytest.mark.parametrize("claim", ["exp", "nbf", "sub", "iss", "aud"])
def test_missing_required_claim_is_refused(claim: str) -> None:
    assert refused(hs_verifier(), jwt.encode(claims(**{claim: None}), SECRET)) == "missing-claim"


@pytest.mark.parametrize("sub", ["", "a b", "x" * 65, "ünïcode", "a/b", 42])
def test_invalid_subject_is_refused(sub: object) -> None:
    assert refused(hs_verifier(), hs_token(sub=sub)) == "invalid-subject"


@pytest.mark.parametrize("exp", ['"tomorrow"', "true", "1" + "0" * 400, "NaN", "[1]"])
def test_non_numeric_exp_is_malformed(exp: str) -> None:
    body = json.dumps(claims(exp=None))[:-1] + f', "exp": {exp}}}'
    assert refused(hs_verifier(), hand_signed_hs256(body, SECRET.encode())) == "malformed-token"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    unsigned = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}."
    assert refused(hs_verifier(), unsigned) == "disallowed-algorithm"


def test_hs256_signed_with_the_rsa_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = pem(rsa_key)
    verifier = TokenVerifier(settings(PARLEY_JWT_PUBLIC_KEY=public_pem), now=Clock())
    forged = hand_signed_hs256(json.dumps(claims()), public_pem.encode())
    assert refused(verifier, forged) == "disallowed-algorithm"


def test_rs256_token_verifies_with_public_key(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    inline = TokenVerifier(settings(PARLEY_JWT_PUBLIC_KEY=pem(rsa_key)), now=Clock())
    assert inline.verify(token).user_id == "alice"
    path = tmp_path / "public.pem"
    path.write_text(pem(rsa_key))
    from_file = TokenVerifier(settings(PARLEY_JWT_PUBLIC_KEY=str(path)), now=Clock())
    assert from_file.verify(token).user_id == "alice"
    assert refused(from_file, jwt.encode(claims(), rsa_key, algorithm="RS512")) == ("disallowed-algorithm")


def test_public_key_that_fits_no_configured_algorithm_is_refused(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    env = settings(PARLEY_JWT_PUBLIC_KEY=pem(ec_key), PARLEY_JWT_ALGORITHMS="RS256")
    with pytest.raises(SettingError) as caught:
        TokenVerifier(env)
    assert caught.value.key == "PARLEY_JWT_ALGORITHMS"


def test_garbage_public_key_is_refused() -> None:
    with pytest.raises(SettingError) as caught:
        TokenVerifier(settings(PARLEY_JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----\nnope\n"))
    assert caught.value.key == "PARLEY_JWT_PUBLIC_KEY"


def test_es256_token_verifies_via_jwks_kid(ec_key: ec.EllipticCurvePrivateKey, jwks_file: Path) -> None:
    verifier = TokenVerifier(settings(PARLEY_JWT_JWKS_FILE=str(jwks_file)), now=Clock())
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "k1"})
    assert verifier.verify(token).user_id == "alice"


def test_unknown_or_missing_kid_is_refused(ec_key: ec.EllipticCurvePrivateKey, jwks_file: Path) -> None:
    verifier = TokenVerifier(settings(PARLEY_JWT_JWKS_FILE=str(jwks_file)), now=Clock())
    unknown = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "k2"})
    assert refused(verifier, unknown) == "bad-signature"
    assert refused(verifier, jwt.encode(claims(), ec_key, algorithm="ES256")) == "bad-signature"


def test_jwks_key_signed_by_another_key_is_refused(jwks_file: Path) -> None:
    verifier = TokenVerifier(settings(PARLEY_JWT_JWKS_FILE=str(jwks_file)), now=Clock())
    other = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), other, algorithm="ES256", headers={"kid": "k1"})
    assert refused(verifier, token) == "bad-signature"


_SEGMENT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=8,
)
_HEADERS = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "none", "RS256", "ES256", ""]) | st.text()},
    optional={"kid": _JSON, "typ": _JSON, "crit": _JSON, "b64": _JSON},
)
_TOKENS = (
    st.text()
    | st.builds(lambda a, b, c: f"{a}.{b}.{c}", _SEGMENT, _SEGMENT, _SEGMENT)
    | st.builds(
        lambda h, p, s: f"{b64json(h)}.{b64json(p)}.{s}",
        _HEADERS,
        st.dictionaries(st.sampled_from(list(claims())), _JSON) | _JSON,
        _SEGMENT,
    )
)


@given(_TOKENS)
def test_any_garbage_raises_invalid_token(token: str) -> None:
    for verifier in (hs_verifier(), _JWKS_VERIFIER):
        with pytest.raises(InvalidToken):
            verifier.verify(token)


def _jwks_verifier() -> TokenVerifier:
    key = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    jwks = json.dumps({"keys": [{**key, "kid": "k1"}]})
    return TokenVerifier(AuthSettings(algorithms=("ES256",), jwks_json=jwks), now=Clock())


_JWKS_VERIFIER = _jwks_verifier()


# --- Authorization header -------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_authorization_header(value: str | None) -> None:
    with pytest.raises(MissingToken) as caught:
        parse_bearer(value)
    assert caught.value.reason == "missing-token"


@pytest.mark.parametrize("value", ["Token abc", "Bearer", "Bearer a b", "Basic dXNlcjpw", "abc"])
def test_malformed_authorization_header(value: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        parse_bearer(value)
    assert caught.value.reason == "malformed-authorization"


@pytest.mark.parametrize("value", ["Bearer abc", "bearer abc", "BEARER  abc ", "BeArEr\tabc"])
def test_bearer_scheme_is_case_insensitive(value: str) -> None:
    assert parse_bearer(value) == "abc"


# --- settings -------------------------------------------------------------------------------


def refused_setting(**environ: str) -> str:
    with pytest.raises(SettingError) as caught:
        settings(**environ)
    return caught.value.key


def test_settings_defaults_for_a_secret() -> None:
    loaded = settings(PARLEY_JWT_SECRET=SECRET)
    assert loaded.algorithms == ("HS256",)
    assert (loaded.issuer, loaded.audience, loaded.leeway_s, loaded.dev_mode) == (
        "parley",
        "parley",
        30.0,
        False,
    )
    assert SECRET not in repr(loaded)


def test_settings_defaults_for_a_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    loaded = settings(PARLEY_JWT_PUBLIC_KEY=pem(rsa_key))
    assert loaded.algorithms == ("RS256", "ES256")
    assert loaded.public_key_pem == pem(rsa_key)


def test_settings_refuse_no_key_material() -> None:
    assert refused_setting() == "PARLEY_JWT_SECRET"


def test_settings_refuse_secret_with_asymmetric_key(rsa_key: rsa.RSAPrivateKey, jwks_file: Path) -> None:
    assert refused_setting(PARLEY_JWT_SECRET=SECRET, PARLEY_JWT_PUBLIC_KEY=pem(rsa_key)) == (
        "PARLEY_JWT_SECRET"
    )
    assert refused_setting(PARLEY_JWT_SECRET=SECRET, PARLEY_JWT_JWKS_FILE=str(jwks_file)) == (
        "PARLEY_JWT_SECRET"
    )


@pytest.mark.parametrize("algorithms", ["none", "HS256,none", "NONE"])
def test_settings_refuse_alg_none(algorithms: str, rsa_key: rsa.RSAPrivateKey) -> None:
    assert refused_setting(PARLEY_JWT_SECRET=SECRET, PARLEY_JWT_ALGORITHMS=algorithms) == (
        "PARLEY_JWT_ALGORITHMS"
    )
    public = pem(rsa_key)
    assert refused_setting(PARLEY_JWT_PUBLIC_KEY=public, PARLEY_JWT_ALGORITHMS=algorithms) == (
        "PARLEY_JWT_ALGORITHMS"
    )


@pytest.mark.parametrize("algorithms", ["HS256", "RS256,HS256", "HS512"])
def test_settings_refuse_hmac_with_asymmetric_key(algorithms: str, rsa_key: rsa.RSAPrivateKey) -> None:
    public = pem(rsa_key)
    assert refused_setting(PARLEY_JWT_PUBLIC_KEY=public, PARLEY_JWT_ALGORITHMS=algorithms) == (
        "PARLEY_JWT_ALGORITHMS"
    )


@pytest.mark.parametrize("algorithms", ["RS256", "HS256,ES256", "PS256"])
def test_settings_refuse_asymmetric_algorithms_with_a_secret(algorithms: str) -> None:
    assert refused_setting(PARLEY_JWT_SECRET=SECRET, PARLEY_JWT_ALGORITHMS=algorithms) == (
        "PARLEY_JWT_ALGORITHMS"
    )


def test_settings_refuse_short_secret_unless_dev_mode() -> None:
    assert refused_setting(PARLEY_JWT_SECRET="short") == "PARLEY_JWT_SECRET"
    assert refused_setting(PARLEY_JWT_SECRET=SECRET[:31]) == "PARLEY_JWT_SECRET"
    assert settings(PARLEY_JWT_SECRET=SECRET[:32]).secret == SECRET[:32]
    assert settings(PARLEY_JWT_SECRET="short", PARLEY_DEV_MODE="1").dev_mode is True


def test_settings_refuse_unreadable_key_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.pem")
    assert refused_setting(PARLEY_JWT_PUBLIC_KEY=missing) == "PARLEY_JWT_PUBLIC_KEY"
    assert refused_setting(PARLEY_JWT_JWKS_FILE=missing) == "PARLEY_JWT_JWKS_FILE"


def test_verifier_refuses_unusable_jwks(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}))
    with pytest.raises(SettingError) as caught:
        TokenVerifier(settings(PARLEY_JWT_JWKS_FILE=str(path)))
    assert caught.value.key == "PARLEY_JWT_JWKS_FILE"


# --- minting --------------------------------------------------------------------------------


def test_mint_token_refuses_without_dev_mode() -> None:
    with pytest.raises(DevModeRequired):
        mint_token(settings(PARLEY_JWT_SECRET=SECRET), "alice")


def test_mint_token_refuses_without_a_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    loaded = settings(PARLEY_JWT_PUBLIC_KEY=pem(rsa_key), PARLEY_DEV_MODE="true")
    with pytest.raises(SettingError) as caught:
        mint_token(loaded, "alice")
    assert caught.value.key == "PARLEY_JWT_SECRET"


@pytest.mark.parametrize("secret", [SECRET, "dev"])
def test_minted_token_verifies_in_dev_mode(secret: str) -> None:
    loaded = settings(PARLEY_JWT_SECRET=secret, PARLEY_DEV_MODE="1")
    token = mint_token(loaded, "alice", ttl_s=60, now=NOW, extra={"role": "admin"})
    principal = TokenVerifier(loaded, now=Clock(NOW + 30)).verify(token)
    assert (principal.user_id, principal.expires_at) == ("alice", NOW + 60)
    assert principal.claims["role"] == "admin"
    assert refused(TokenVerifier(loaded, now=Clock(NOW + 91)), token) == "expired-token"


def test_mint_token_refuses_reserved_extra_claims() -> None:
    loaded = settings(PARLEY_JWT_SECRET=SECRET, PARLEY_DEV_MODE="1")
    with pytest.raises(ValueError, match="sub"):
        mint_token(loaded, "alice", extra={"sub": "root"})
