"""Security suite: every HTTP route of the command and query APIs, and the WebSocket, refuse a bad
token (tampered, expired, wrong audience or issuer, `alg: none`, HS/RS-confused) with 401 problem+json
or close 4401; the command API's rate limit holds under a flood without touching another user."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.fanout_fixtures import SECRET, token
from tests.test_http_edge import Services, running_services
from tests.test_http_edge import services as services  # the real processes, one set per module

pytestmark = pytest.mark.security

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": "parley",
        "aud": "parley",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return base


def _hs256(payload: dict[str, Any], key: bytes = SECRET.encode()) -> str:
    return jwt.encode(payload, key, algorithm="HS256")


def _unsigned(payload: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def _hs_with_public_key(payload: dict[str, Any]) -> str:
    """The HS/RS confusion: an HMAC over the token keyed with the (public) RSA key's PEM."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(payload).encode())}"
    import hmac

    mac = hmac.new(RSA_PUBLIC_PEM, signing_input.encode(), "sha256").digest()
    return f"{signing_input}.{_b64(mac)}"


def _tampered() -> str:
    """A valid token for alice whose payload now names mallory; the signature is alice's."""
    head, _, sig = token("alice").split(".")
    return f"{head}.{_b64(json.dumps(_claims(sub='mallory')).encode())}.{sig}"


BAD_TOKENS: dict[str, str] = {
    "tampered": _tampered(),
    "expired": _hs256(
        _claims(iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    ),
    "wrong-audience": _hs256(_claims(aud="someone-else")),
    "wrong-issuer": _hs256(_claims(iss="someone-else")),
    "wrong-secret": _hs256(_claims(), b"another-secret-another-secret-32b"),
    "alg-none": _unsigned(_claims()),
    "rs256-signed": jwt.encode(_claims(), RSA_KEY, algorithm="RS256"),
    "hs256-keyed-with-public-key": _hs_with_public_key(_claims()),
    "not-a-jwt": "not-a-jwt",
    "no-subject": _hs256({k: v for k, v in _claims().items() if k != "sub"}),
}
"""Each refused by every route; the WebSocket closes 4401."""

PATH_VALUES = {"conversation_id": "alice:c1", "message_id": "m1", "user_id": "bob"}
EXEMPT = {"/healthz", "/readyz", "/metrics", "/openapi.json"}


def _routes(port: int) -> Iterator[tuple[str, str]]:
    document = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()
    for path, operations in document["paths"].items():
        if path in EXEMPT:
            continue
        concrete = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
        for method in operations:
            if method in {"get", "post", "put", "patch", "delete"}:
                yield method.upper(), concrete


def _assert_problem(response: httpx.Response, status: int, where: object) -> dict[str, Any]:
    assert response.status_code == status, (where, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json"), where
    problem: dict[str, Any] = response.json()
    assert {"type", "title", "status"} <= problem.keys() and problem["status"] == status, (where, problem)
    return problem


async def test_every_http_route_refuses_every_bad_token_with_401(services: Services) -> None:
    routes = [
        (port, *route) for port in (services.command_api, services.query_api) for route in _routes(port)
    ]
    assert len(routes) >= 14, routes  # every command route and every query route is here
    async with httpx.AsyncClient(timeout=10) as http:
        for port, method, path in routes:
            url = f"http://127.0.0.1:{port}{path}"
            body = {"title": "t", "body": "b", "user_id": "bob", "up_to_seq": 1}
            headers_cases = {
                "missing": {},
                **{n: {"Authorization": f"Bearer {t}"} for n, t in BAD_TOKENS.items()},
            }
            headers_cases["not-bearer"] = {"Authorization": f"Basic {_b64(b'alice:pw')}"}
            for name, headers in headers_cases.items():
                extra = {"Idempotency-Key": "k1"} if method != "GET" else {}
                answer = await http.request(method, url, headers={**headers, **extra},
                                            json=None if method in {"GET", "DELETE"} else body)  # fmt: skip
                _assert_problem(answer, 401, (method, path, name))
                assert answer.headers.get("www-authenticate", "").lower().startswith("bearer"), (path, name)
                assert "alice" not in answer.text and "mallory" not in answer.text, (path, name)
            good = await http.request(method, url, headers={"Authorization": f"Bearer {token('alice')}"},
                                      json=None if method in {"GET", "DELETE"} else body)  # fmt: skip
            assert good.status_code != 401, (method, path, good.text[:300])


async def _close_code(url: str, first: str | None) -> int | None:
    async with connect(url) as ws:
        if first is not None:
            await ws.send(first)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    return ws.close_code


async def test_the_websocket_closes_4401_on_every_bad_token(services: Services) -> None:
    base = f"ws://127.0.0.1:{services.fanout}/v1/stream"
    for name, bad in BAD_TOKENS.items():
        assert await _close_code(f"{base}?token={bad}", None) == 4401, ("handshake", name)
        assert await _close_code(base, json.dumps({"type": "auth", "token": bad})) == 4401, ("frame", name)
    subscribe_first = json.dumps({"type": "subscribe"})
    assert await _close_code(base, subscribe_first) == 4401  # no auth at all
    async with connect(f"{base}?token={token('alice')}") as ws:  # and a good one is served
        await ws.send(subscribe_first)
        async with asyncio.timeout(5):
            assert json.loads(await ws.recv())["type"]


@pytest.mark.parametrize(
    "frame",
    [b"\xff\xfe not utf-8", "{not json", "[]", "null", '{"type": "nope"}', '{"type": "subscribe", "cursor": 5}',
     '{"type": "subscribe", "conversations": "x"}', '{"type": "subscribe", "cursor": "forged-' + "z" * 64 + '"}'],
)  # fmt: skip
async def test_a_malformed_frame_closes_4400_or_resyncs_never_a_crash(
    services: Services, frame: str | bytes
) -> None:
    url = f"ws://127.0.0.1:{services.fanout}/v1/stream?token={token('alice')}"
    got: list[dict[str, Any]] = []
    async with connect(url) as ws:
        await ws.send(frame)
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(3):
                while True:
                    got.append(json.loads(await ws.recv()))
        closed_by_server = ws.close_code
    if closed_by_server is None:  # still open: only a forged cursor is served, and as a resync
        assert "forged" in str(frame), (frame, got)
        assert [m["reason"] for m in got if m["type"] == "resync"] == ["malformed-cursor"], got
        assert not [m for m in got if m["type"] == "event"], got
    else:
        assert closed_by_server == 4400, (frame, closed_by_server)
    async with httpx.AsyncClient() as http:  # and the process is fine
        assert (await http.get(f"http://127.0.0.1:{services.fanout}/healthz")).status_code == 200


MALFORMED_BODIES: list[tuple[str, bytes, str]] = [
    ("truncated", b'{"title": ', "application/json"),
    ("not-json", b"\x00\xff\xfe", "application/json"),
    ("array", b"[1, 2]", "application/json"),
    ("wrong-types", b'{"title": 5, "participants": "bob"}', "application/json"),
    ("huge-title", json.dumps({"title": "t" * 10_000}).encode(), "application/json"),
    ("deep", b"[" * 5000 + b"]" * 5000, "application/json"),
    ("form", b"title=t", "application/x-www-form-urlencoded"),
    ("oversize", b'{"title": "' + b"a" * 2_000_000 + b'"}', "application/json"),
]


async def test_malformed_and_oversize_bodies_are_4xx_problems(services: Services) -> None:
    auth = {"Authorization": f"Bearer {token('alice')}"}
    async with httpx.AsyncClient(timeout=10) as http:
        for name, body, kind in MALFORMED_BODIES:
            answer = await http.post(f"http://127.0.0.1:{services.command_api}/v1/conversations", content=body,
                                     headers={**auth, "Content-Type": kind})  # fmt: skip
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:200])
            _assert_problem(answer, answer.status_code, name)
        assert (await http.get(f"http://127.0.0.1:{services.command_api}/healthz")).status_code == 200


@pytest.fixture(scope="module")
def rs_services(
    redis_server_url: str, database_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    """The services verifying RS256 tokens against a public key, with no shared secret."""
    folder = tmp_path_factory.mktemp("rs")
    key = folder / "public.pem"
    key.write_bytes(RSA_PUBLIC_PEM)
    with running_services(
        redis_server_url, database_server_url, folder, PARLEY_JWT_SECRET="", PARLEY_JWT_PUBLIC_KEY=str(key),
        PARLEY_JWT_ALGORITHMS="RS256",
    ) as ports:  # fmt: skip
        yield ports


async def test_a_public_key_used_as_an_hmac_secret_is_refused_where_rs256_is_expected(
    rs_services: Services,
) -> None:
    """The classic confusion: the verifier holds an RSA public key, the attacker HMACs with it."""
    forged = {"hs256-keyed-with-public-key": _hs_with_public_key(_claims()), "alg-none": _unsigned(_claims()),
              "hs256-shared-secret": _hs256(_claims())}  # fmt: skip
    genuine = jwt.encode(_claims(), RSA_KEY, algorithm="RS256")
    async with httpx.AsyncClient(timeout=10) as http:
        for port in (rs_services.command_api, rs_services.query_api):
            for method, path in _routes(port):
                url = f"http://127.0.0.1:{port}{path}"
                body = None if method in {"GET", "DELETE"} else {"title": "t", "body": "b", "user_id": "bob"}
                for name, bad in forged.items():
                    answer = await http.request(
                        method, url, json=body, headers={"Authorization": f"Bearer {bad}"}
                    )
                    _assert_problem(answer, 401, (method, path, name))
                good = await http.request(
                    method, url, json=body, headers={"Authorization": f"Bearer {genuine}"}
                )
                assert good.status_code != 401, (method, path, good.text[:300])
    base = f"ws://127.0.0.1:{rs_services.fanout}/v1/stream"
    for name, bad in forged.items():
        assert await _close_code(f"{base}?token={bad}", None) == 4401, name
    async with connect(f"{base}?token={genuine}") as ws:
        await ws.send(json.dumps({"type": "subscribe"}))
        async with asyncio.timeout(5):
            assert json.loads(await ws.recv())["type"]


def test_no_refused_token_reached_a_log(services: Services, rs_services: Services) -> None:
    """Run last in this module: the logs of every refusal above hold no token, nor a part of one."""
    logs = {path: path.read_text() for path in [*services.logs, *rs_services.logs]}
    assert all(logs.values()), "the services logged nothing"
    for bad in BAD_TOKENS.values():
        parts = [part for part in bad.split(".") if len(part) >= 16]
        for path, text in logs.items():
            assert bad not in text and not any(part in text for part in parts), path.name
