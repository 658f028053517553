"""The query API in-process against real servers: auth, participants only, paging, read-your-writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from command_api import bodies, commands
from command_api.append import Appender
from events.config import LogSettings
from projector.app import create_app
from projector.reads import Reads
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.auth_settings import AuthSettings
from servicekit.tokens import mint_token

AUTH = AuthSettings(algorithms=("HS256",), secret="api-test-secret-api-test-secret-0123", dev_mode=True)


def headers(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(AUTH, user)}"}


@pytest.fixture
async def served(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Appender]]:
    settings = ProjectorSettings(
        log=LogSettings(redis_server_url, log_namespace, 2), database_url=database_url, auth=AUTH,
        block_ms=50, lease_ttl_s=2.0, worker_id="api-worker", read_wait_s=3.0,
    )  # fmt: skip
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 10)
    async with Reads(settings) as reads:
        transport = httpx.ASGITransport(app=create_app(settings, worker, reads))
        async with httpx.AsyncClient(transport=transport, base_url="http://projector") as client:
            yield client, appender
    stop.set()
    await task
    await worker.close()
    await appender.close()


async def test_queries_with_read_your_writes(served: tuple[httpx.AsyncClient, Appender]) -> None:
    client, appender = served
    ann = commands.Context("ann")
    await appender.append(
        commands.create_conversation(ann, bodies.CreateConversation("plans", ["bob"], "conv1"))
    )
    for i in range(5):
        await appender.append(commands.send_message(ann, "conv1", bodies.SendMessage(f"lunch idea {i}")))
    await appender.append(commands.remove_participant(commands.Context("bob"), "conv1", "bob"))
    last = await appender.append(commands.send_message(ann, "conv1", bodies.SendMessage("secret pizza")))
    position = last.position.token()

    r = await client.get("/v1/conversations/conv1/messages", params={"position": position},
                         headers=headers("ann"))  # fmt: skip
    assert r.status_code == 200, r.text
    assert [m["seq"] for m in r.json()["messages"]] == [8, 6, 5, 4, 3, 2]
    r = await client.get("/v1/conversations/conv1/messages", params={"after_seq": 0, "limit": 2},
                         headers={**headers("bob"), "X-Parley-Position": position})  # fmt: skip
    page: dict[str, Any] = r.json()
    assert [m["seq"] for m in page["messages"]] == [2, 3] and page["next_after_seq"] == 3
    r = await client.get("/v1/conversations/conv1/messages", params={"after_seq": 3}, headers=headers("bob"))
    assert [m["seq"] for m in r.json()["messages"]] == [4, 5, 6]  # nothing after bob left
    r = await client.get("/v1/conversations/conv1/messages", headers=headers("eve"))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"

    r = await client.get("/v1/conversations", headers=headers("ann"))
    (conv,) = r.json()["conversations"]
    assert conv["last_message_preview"] == "secret pizza" and conv["unread_count"] == 0
    assert (await client.get("/v1/unread", headers=headers("bob"))).json() == {"unread": 0}
    r = await client.get("/v1/search", params={"q": "pizza"}, headers=headers("bob"))
    assert r.json()["messages"] == []
    r = await client.get("/v1/search", params={"q": "pizza"}, headers=headers("ann"))
    assert [m["seq"] for m in r.json()["messages"]] == [8]

    assert (await client.get("/v1/unread")).status_code == 401
    future = f"{last.position.epoch}.{last.position.partition}.99999999999999-0"
    r = await client.get("/v1/unread", params={"position": future}, headers=headers("ann"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert (await client.get("/readyz")).status_code == 200
    assert "parley_projector_events_applied" in (await client.get("/metrics")).text
