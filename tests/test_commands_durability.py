"""The command API as a real process: durability under kill -9, idempotency across restarts, auth, CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from command_api.append import Appender, AppendSettings
from command_api.bodies import CreateConversation, SendMessage
from command_api.commands import Context, create_conversation_with_id, send_message
from command_api.exceptions import LogUnavailable
from command_api.services import HEALTH_CHECK_S
from devstack.ports import free_port
from devstack.servers import RedisServer
from events.codec import decode
from events.layout import LogLayout
from events.log import EventLog
from events.schema import MessageSent
from tests.apiclient import ApiClient
from tests.conftest import DEV_SECRET


@contextmanager
def api_process(env: dict[str, str]) -> Iterator[str]:
    """`python -m command_api` on a free loopback port; yields its base URL, SIGKILLs it at the end."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "command_api"],
        env={**os.environ, **env, "PARLEY_API_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"command API did not start (exit {proc.poll()})")
            time.sleep(0.05)
        yield base
    finally:
        proc.kill()
        proc.wait()


def bearer(user: str, **claims: object) -> dict[str, str]:
    now = int(time.time())
    payload = {
        "sub": user,
        "iss": "parley",
        "aud": "parley",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return {"Authorization": "Bearer " + jwt.encode(payload, DEV_SECRET, algorithm="HS256")}


async def all_events(redis_url: str, namespace: str) -> list:  # type: ignore[type-arg]
    client = aioredis.Redis.from_url(redis_url)
    try:
        log = EventLog(client, LogLayout(namespace, 4))
        events = []
        for p in range(4):
            events += [decode(e.data) for e in await log.read_after(p, "0-0", 1_000_000)]
        return events
    finally:
        await client.aclose()


async def test_every_acknowledged_event_survives_kill_9_of_redis(
    api_env: dict[str, str], redis_proc: RedisServer
) -> None:
    env = {**api_env, "REDIS_URL": redis_proc.url}
    acknowledged: list[str] = []
    with api_process(env) as base:
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            created = await http.post("/v1/conversations", json={"title": "t"}, headers=bearer("alice"))
            cid = created.json()["conversation_id"]
            acknowledged.append(created.json()["event_ids"][0])
            stop = asyncio.Event()

            async def sender(n: int) -> None:
                for i in range(400):  # bounded; the kill stops it sooner
                    if stop.is_set():
                        return
                    try:
                        answer = await http.post(
                            f"/v1/conversations/{cid}/messages",
                            json={"body": f"{n}-{i}"},
                            headers=bearer("alice"),
                        )
                    except httpx.TransportError:
                        return
                    if answer.status_code == 202:
                        acknowledged.append(answer.json()["event_ids"][0])
                    else:
                        assert answer.status_code == 503, answer.text

            senders = [asyncio.create_task(sender(n)) for n in range(8)]
            while len(acknowledged) < 150:
                await asyncio.sleep(0.01)
            redis_proc.kill()  # SIGKILL while commands are in flight
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*senders)
    redis_proc.start()
    in_log = {e.event_id for e in await all_events(redis_proc.url, api_env["PARLEY_LOG_NAMESPACE"])}
    assert len(acknowledged) >= 150
    missing = [e for e in acknowledged if e not in in_log]
    assert missing == []


async def test_idempotent_retry_across_an_api_restart(api_env: dict[str, str]) -> None:
    key = {"Idempotency-Key": "restart-1"}
    with api_process(api_env) as base:
        created = httpx.post(base + "/v1/conversations", json={"title": "t"}, headers=bearer("alice"))
        cid = created.json()["conversation_id"]
        first = httpx.post(
            f"{base}/v1/conversations/{cid}/messages", json={"body": "x"}, headers={**bearer("alice"), **key}
        )
        assert first.status_code == 202
    with api_process(api_env) as base:
        again = httpx.post(
            f"{base}/v1/conversations/{cid}/messages", json={"body": "x"}, headers={**bearer("alice"), **key}
        )
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
    events = [
        e
        for e in await all_events(api_env["REDIS_URL"], api_env["PARLEY_LOG_NAMESPACE"])
        if e.conversation_id == cid
    ]
    assert [e.seq for e in events] == [1, 2]


def _unsigned(payload: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def _hs256_with_key(payload: dict[str, object], key: bytes) -> str:
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}"
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_auth_failures_get_401_problems(api_env: dict[str, str], tmp_path: pytest.TempPathFactory) -> None:
    now = int(time.time())
    claims = {"sub": "alice", "iss": "parley", "aud": "parley", "iat": now, "nbf": now, "exp": now + 600}
    cases = {
        "missing-token": {},
        "malformed-authorization": {"Authorization": "Basic abc"},
        "expired-token": bearer("alice", exp=now - 3600),
        "bad-signature": {"Authorization": "Bearer " + jwt.encode(claims, "y" * 40, algorithm="HS256")},
        "wrong-audience": bearer("alice", aud="someone-else"),
        "disallowed-algorithm": {"Authorization": "Bearer " + _unsigned(claims)},
    }
    with api_process(api_env) as base:
        for reason, headers in cases.items():
            answer = httpx.post(base + "/v1/conversations", json={"title": "t"}, headers=headers)
            assert answer.status_code == 401, (reason, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["type"] == f"/problems/{reason}", answer.text
            assert answer.headers["www-authenticate"].startswith("Bearer")

    # RS256 deployment: a token HMAC-signed with the public key as secret (algorithm confusion) is refused
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rs_env = {k: v for k, v in api_env.items() if k != "PARLEY_JWT_SECRET"}
    rs_env["PARLEY_JWT_PUBLIC_KEY"] = public_pem.decode()
    with api_process(rs_env) as base:
        good = jwt.encode(claims, private, algorithm="RS256")
        ok = httpx.post(
            base + "/v1/conversations", json={"title": "t"}, headers={"Authorization": f"Bearer {good}"}
        )
        assert ok.status_code == 202, ok.text
        confused = _hs256_with_key(claims, public_pem)
        refused = httpx.post(
            base + "/v1/conversations", json={"title": "t"}, headers={"Authorization": f"Bearer {confused}"}
        )
        assert refused.status_code == 401
        assert refused.json()["type"] == "/problems/disallowed-algorithm"


def test_token_cli_mints_only_in_dev_mode(api_env: dict[str, str]) -> None:
    run = [sys.executable, "-m", "command_api", "token", "alice"]
    minted = subprocess.run(run, env={**os.environ, **api_env}, capture_output=True, text=True, check=True)
    claims = jwt.decode(minted.stdout.strip(), DEV_SECRET, algorithms=["HS256"], audience="parley")
    assert claims["sub"] == "alice"
    prod = {**os.environ, **api_env, "PARLEY_DEV_MODE": "0"}
    refused = subprocess.run(run, env=prod, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "PARLEY_DEV_MODE=1" in refused.stderr


async def test_after_a_redis_restart_commands_succeed_and_none_is_applied_twice(
    redis_proc: RedisServer, log_namespace: str
) -> None:
    """The pooled connections from before a restart are dead: the first commands after it (keyed or not)
    are 202, or the documented 503 `log-unavailable`, never a 500, and none is in the log twice."""
    env = {"REDIS_URL": redis_proc.url, "PARLEY_LOG_NAMESPACE": log_namespace, "PARLEY_PARTITIONS": "4",
           "PARLEY_JWT_SECRET": DEV_SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_RATE_LIMIT_PER_S": "0"}  # fmt: skip
    async with ApiClient.running(env) as api:
        cid = await api.create_conversation("alice", "bob")

        async def burst(tag: str) -> list[httpx.Response]:
            """Concurrent commands, so that the pool holds several connections; half of them keyed."""
            return list(await asyncio.gather(*(
                api.send("alice", cid, f"{tag}-{i}", {"Idempotency-Key": f"{tag}-{i}"} if i % 2 else None)
                for i in range(8)
            )))  # fmt: skip

        assert {r.status_code for r in await burst("before")} == {202}
        for restart in range(2):
            if restart == 0:
                redis_proc.stop()
            else:
                redis_proc.kill()  # no goodbye on the connections this time
            redis_proc.start()
            await asyncio.sleep(HEALTH_CHECK_S + 0.2 if restart == 0 else 0)  # idle: PINGed before use
            answers = await burst(f"after{restart}")
            for answer in answers:
                if answer.status_code != 202:
                    assert_log_unavailable(answer)
            if restart == 0:
                assert {r.status_code for r in answers} == {202}
        bodies = [e.payload.body for e in await all_events(redis_proc.url, log_namespace)
                  if isinstance(e.payload, MessageSent)]  # fmt: skip
        assert len(bodies) == len(set(bodies))
        assert (await api.send("alice", cid, "last")).status_code == 202


def assert_log_unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.json()["type"] == "/problems/log-unavailable" and "retry-after" in answer.headers


async def test_a_script_redis_forgot_is_loaded_and_run_once_and_wait_is_sent_with_it(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    """The append is sent once (`events.redisclient.send_once`): a NOSCRIPT answer proves it did not
    run, so it is loaded and sent again; WAIT rides in the same write."""
    layout = LogLayout(log_namespace, 4)
    appender = Appender(redis_client, layout)
    await appender.open()
    ann = Context("ann")
    try:
        await redis_client.script_flush()
        created = await appender.append(create_conversation_with_id(ann, CreateConversation("t"), "noscript"))
        await redis_client.script_flush()
        await appender.append(send_message(ann, "noscript", SendMessage("once")))
        waiting = Appender(redis_client, layout, AppendSettings(wait_replicas=1, wait_timeout_ms=50))
        await waiting.open()
        with pytest.raises(LogUnavailable, match="replicas"):  # no replica here: it may still be applied
            await waiting.append(send_message(ann, "noscript", SendMessage("unreplicated")))
        await waiting.close()
    finally:
        await appender.close()
    log = EventLog(redis_client, layout)
    events = [decode(e.data) for e in await log.read_after(created.position.partition, "0-0", 100)]
    assert [e.seq for e in events if e.conversation_id == "noscript"] == [1, 2, 3]
