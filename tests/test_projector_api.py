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
from projector.app import create_app
from projector.reads import Reads
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.auth_settings import AuthSettings
from servicekit.log_settings import LogSettings
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
        await appender.append(commands.send_message(ann, "ann:conv1", bodies.SendMessage(f"lunch idea {i}")))
    await appender.append(commands.remove_participant(commands.Context("bob"), "ann:conv1", "bob"))
    last = await appender.append(commands.send_message(ann, "ann:conv1", bodies.SendMessage("secret pizza")))
    position = last.position.token()

    r = await client.get("/v1/conversations/ann:conv1/messages", params={"position": position},
                         headers=headers("ann"))  # fmt: skip
    assert r.status_code == 200, r.text
    assert [m["seq"] for m in r.json()["messages"]] == [8, 6, 5, 4, 3, 2]
    r = await client.get("/v1/conversations/ann:conv1/messages", params={"after_seq": 0, "limit": 2},
                         headers={**headers("bob"), "X-Parley-Position": position})  # fmt: skip
    page: dict[str, Any] = r.json()
    assert [m["seq"] for m in page["messages"]] == [2, 3] and page["next_after_seq"] == 3
    r = await client.get(
        "/v1/conversations/ann:conv1/messages", params={"after_seq": 3}, headers=headers("bob")
    )
    assert [m["seq"] for m in r.json()["messages"]] == [4, 5, 6]  # nothing after bob left
    r = await client.get("/v1/conversations/ann:conv1/messages", headers=headers("eve"))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"

    r = await client.get("/v1/conversations", headers=headers("ann"))
    (conv,) = r.json()["conversations"]
    assert conv["last_message_preview"] == "secret pizza" and conv["unread_count"] == 0
    assert conv["conversation_id"] == "ann:conv1"  # an id its creator chose, in the creator's namespace
    assert (await client.get("/v1/unread", headers=headers("bob"))).json()["unread"] == 0
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


async def test_a_removed_participant_never_reads_or_finds_a_later_edit(
    served: tuple[httpx.AsyncClient, Appender],
) -> None:
    client, appender = served
    ann, dan = commands.Context("ann"), headers("dan")
    await appender.append(
        commands.create_conversation_with_id(ann, bodies.CreateConversation("c", ["dan"]), "conv2")
    )
    mid = "m-noon"
    await appender.append(
        commands.send_message(ann, "conv2", bodies.SendMessage("meet at noon", message_id=mid))
    )
    await appender.append(commands.remove_participant(ann, "conv2", "dan"))
    last = await appender.append(commands.edit_message(ann, "conv2", mid, bodies.EditMessage("moved to 5pm")))
    at = {"X-Parley-Position": last.position.token()}

    async def view(user: dict[str, str]) -> list[tuple[str | None, str]]:
        r = await client.get("/v1/conversations/conv2/messages", headers={**user, **at})
        assert r.status_code == 200, r.text
        return [(m["body"], m["state"]) for m in r.json()["messages"]]

    async def found(user: dict[str, str], q: str) -> list[str | None]:
        r = await client.get("/v1/search", params={"q": q}, headers={**user, **at})
        return [m["body"] for m in r.json()["messages"]]

    assert await view(dan) == [("meet at noon", "sent")]  # as it was when dan left
    assert await view(headers("ann")) == [("moved to 5pm", "edited")]
    assert await found(dan, "5pm") == [] and await found(dan, "noon") == ["meet at noon"]
    assert (
        await found(headers("ann"), "5pm") == ["moved to 5pm"] and await found(headers("ann"), "noon") == []
    )
    await appender.append(commands.add_participant(ann, "conv2", bodies.AddParticipant("dan")))
    again = await appender.append(commands.edit_message(ann, "conv2", mid, bodies.EditMessage("at 6pm then")))
    at = {"X-Parley-Position": again.position.token()}
    assert await view(dan) == [("at 6pm then", "edited")]  # an edit made while dan is back: seen
    assert await found(dan, "6pm") == ["at 6pm then"] and await found(dan, "5pm") == []
    await appender.append(commands.remove_participant(ann, "conv2", "dan"))
    await appender.append(commands.edit_message(ann, "conv2", mid, bodies.EditMessage("cancelled")))
    gone = await appender.append(commands.delete_message(ann, "conv2", mid))
    at = {"X-Parley-Position": gone.position.token()}
    assert await view(dan) == [(None, "deleted")] and await view(headers("ann")) == [(None, "deleted")]
    assert await found(dan, "6pm") == [] and await found(dan, "noon") == []  # a deletion is for everyone


async def test_the_inbox_shows_a_returning_or_new_participant_only_what_they_may_see(
    served: tuple[httpx.AsyncClient, Appender],
) -> None:
    client, appender = served
    ann = commands.Context("ann")
    await appender.append(
        commands.create_conversation_with_id(ann, bodies.CreateConversation("c", ["dan"]), "conv3")
    )
    await appender.append(commands.send_message(ann, "conv3", bodies.SendMessage("see you", message_id="m1")))
    await appender.append(commands.send_message(ann, "conv3", bodies.SendMessage("bye", message_id="m2")))
    await appender.append(commands.remove_participant(ann, "conv3", "dan"))
    await appender.append(commands.edit_message(ann, "conv3", "m2", bodies.EditMessage("bye, edited")))
    out = await appender.append(
        commands.send_message(ann, "conv3", bodies.SendMessage("sent while dan is out", message_id="m3"))
    )
    await appender.append(commands.delete_message(ann, "conv3", "m1"))
    await appender.append(commands.add_participant(ann, "conv3", bodies.AddParticipant("dan")))
    last = await appender.append(commands.add_participant(ann, "conv3", bodies.AddParticipant("cat")))
    at = {"X-Parley-Position": last.position.token()}

    async def listed(user: str) -> dict[str, Any]:
        r = await client.get("/v1/conversations", headers={**headers(user), **at})
        assert r.status_code == 200, r.text
        (conv,) = r.json()["conversations"]
        return conv  # type: ignore[no-any-return]

    dan, cat, owner = await listed("dan"), await listed("cat"), await listed("ann")
    assert (owner["last_message_id"], owner["last_message_preview"], owner["message_count"]) == (
        "m3", "sent while dan is out", 2,
    )  # fmt: skip
    # dan sees the last message he saw, as he saw it, and counts only those (m1 is deleted for everyone)
    assert (dan["last_message_id"], dan["last_message_seq"], dan["last_message_author"]) == ("m2", 3, "ann")
    assert (dan["last_message_preview"], dan["message_count"]) == ("bye", 1)
    assert (cat["last_message_id"], cat["last_message_preview"], cat["message_count"]) == (None, None, 0)
    sent_out = (await client.get("/v1/conversations/conv3/messages", headers={**headers("ann"), **at})).json()
    out_at = next(m["sent_at"] for m in sent_out["messages"] if m["seq"] == out.seq)
    assert owner["last_activity_at"] == out_at
    assert dan["last_activity_at"] != out_at and cat["last_activity_at"] != out_at  # their addition, not m3

    now = await appender.append(commands.send_message(ann, "conv3", bodies.SendMessage("welcome back")))
    at = {"X-Parley-Position": now.position.token()}
    for user, count in (("dan", 2), ("cat", 1), ("ann", 3)):
        conv = await listed(user)
        assert (conv["last_message_preview"], conv["message_count"]) == ("welcome back", count), user
