"""The query API under hostile input and load, against real Redis and Postgres: every bad parameter is a
4xx on a connection that stays usable, position waiters hold no connection, and each limit (search size,
statement timeout, reads in flight per user) answers its documented problem."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from command_api import bodies, commands
from command_api.append import Appender
from events.position import LogPosition
from projector import params, queries
from projector.app import create_app
from projector.exceptions import PositionFromAnotherEpoch
from projector.reads import Reads, reached
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.exceptions import SettingError
from servicekit.log_settings import LogSettings
from servicekit.settings import Env
from tests.inprocess import uvicorn_serving
from tests.test_projector_api import AUTH, headers


@dataclasses.dataclass
class Served:
    client: httpx.AsyncClient
    app: FastAPI
    reads: Reads
    settings: ProjectorSettings
    position: LogPosition  # of the last event appended before serving: reached


@asynccontextmanager
async def serving(redis_url: str, redis: aioredis.Redis, namespace: str, database_url: str,
                  **overrides: Any) -> AsyncIterator[Served]:  # fmt: skip
    """A running worker and query API on conversation c1 (ann, bob) with one message."""
    settings = ProjectorSettings(
        log=LogSettings(redis_url, namespace, 2), database_url=database_url, auth=AUTH, block_ms=50,
        lease_ttl_s=2.0, worker_id="limits-worker", **overrides,
    )  # fmt: skip
    appender = Appender(redis, settings.log.layout())
    await appender.open()
    ann = commands.Context("ann")
    await appender.append(
        commands.create_conversation_with_id(ann, bodies.CreateConversation("t", ["bob"]), "c1")
    )
    last = await appender.append(commands.send_message(ann, "c1", bodies.SendMessage("hello pizza")))
    await appender.close()
    async with (
        projector_running(settings) as (_worker, reads, app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://projector") as client,
    ):
        r = await client.get(
            "/v1/unread", headers={**headers("bob"), "X-Parley-Position": last.position.token()}
        )
        assert r.json()["unread"] == 1
        yield Served(client, app, reads, settings, last.position)


@asynccontextmanager
async def projector_running(settings: ProjectorSettings) -> AsyncIterator[tuple[Worker, Reads, FastAPI]]:
    """A started worker running its loop (ready), and the query API on its own open `Reads`."""
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 10)
        async with Reads(settings) as reads:
            yield worker, reads, create_app(settings, worker, reads)
    finally:
        stop.set()
        await task
        await worker.close()


@pytest.fixture
async def served(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> AsyncIterator[Served]:
    async with serving(redis_server_url, redis_client, log_namespace, database_url, read_wait_s=1.0) as s:
        yield s


def unreachable(served: Served) -> str:
    return f"{served.position.epoch}.{served.position.partition}.99999999999999-0"


def is_problem(r: httpx.Response, status: int, slug: str) -> bool:
    return (r.status_code, r.headers["content-type"], r.json()["type"]) == (
        status, "application/problem+json", f"/problems/{slug}",
    )  # fmt: skip


def uvicorn_on(app: FastAPI) -> AbstractAsyncContextManager[int]:
    """`app` served by a real uvicorn on a free loopback port (keep-alive behaviour is the server's)."""
    return uvicorn_serving(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                  access_log=False, lifespan="off"))  # fmt: skip


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str, user: str = "ann"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open connection: status, headers (lower-cased names), body."""
    auth = headers(user)["Authorization"]
    writer.write(f"GET {target} HTTP/1.1\r\nHost: projector\r\nAuthorization: {auth}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 5)
    return int(status_line.split()[1]), fields, body


def cursor_of(value: object) -> str:
    return base64.urlsafe_b64encode(params._encoder.encode(value)).decode().rstrip("=")


BAD_INPUT = [
    ("/v1/conversations/c1/messages?limit=%C2%B2", 400, "invalid-limit"),  # ² passes str.isdigit
    ("/v1/conversations/c1/messages?after_seq=%C2%B2", 400, "invalid-after-seq"),
    ("/v1/conversations/c1/messages?before_seq=%C2%B2", 400, "invalid-before-seq"),
    ("/v1/conversations/c1/messages?after_seq=9223372036854775808", 400, "invalid-after-seq"),  # 2^63
    ("/v1/conversations/c1/messages?before_seq=" + "9" * 5000, 400, "invalid-before-seq"),
    ("/v1/conversations/c1/messages?limit=" + "1" * 5000, 400, "invalid-limit"),
    ("/v1/conversations/c%00/messages", 404, "conversation-not-found"),
    ("/v1/conversations/" + "c" * 65 + "/messages", 404, "conversation-not-found"),
    ("/v1/search?q=pizza%00", 400, "invalid-query"),
    ("/v1/conversations?cursor=" + cursor_of(["2026-01-01T00:00:00+00:00", "c\x00"]), 400, "invalid-cursor"),
    ("/v1/conversations?cursor=" + cursor_of([1, 2]), 400, "invalid-cursor"),
    ("/v1/conversations?cursor=%00", 400, "invalid-cursor"),
    ("/v1/conversations?cursor=" + "A" * 5000, 400, "invalid-cursor"),
    ("/v1/unread?position=e.0.1-0%00", 400, "invalid-position"),
    ("/v1/unread?position=e%00.0.1-0", 400, "invalid-position"),
    ("/v1/unread?position=e." + "9" * 5000 + ".1-0", 400, "invalid-position"),
    ("/v1/unread?position=e.%C2%B2.1-0", 400, "invalid-position"),
    ("/v1/unread?position=e.0.%C2%B2-0", 400, "invalid-position"),
]


async def test_bad_input_is_a_4xx_and_the_keep_alive_connection_stays_usable(served: Served) -> None:
    async with uvicorn_on(served.app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for target, status, slug in BAD_INPUT:
                code, fields, body = await exchange(reader, writer, target)
                assert (code, fields["content-type"]) == (status, "application/problem+json"), (target, body)
                assert f'"/problems/{slug}"'.encode() in body, (target, body)
                code, _, body = await exchange(reader, writer, "/v1/unread", "bob")  # the same connection
                assert (code, msgspec.json.decode(body)["unread"]) == (200, 1), target
        finally:
            writer.close()


HOSTILE = "0123456789²٣-+.: ,=\x00\x01\"'\\%/?#&éß漢😀\u202e"


async def test_no_parameter_text_answers_5xx(served: Served) -> None:
    rng = random.Random(8)
    names = ["limit", "after_seq", "before_seq", "cursor", "q", "position", "archived"]
    for _ in range(150):
        text = "".join(rng.choice(HOSTILE) for _ in range(rng.choice([1, 3, 20, 300])))
        name = rng.choice(names)
        for path in ("/v1/conversations", "/v1/conversations/c1/messages", "/v1/unread", "/v1/search",
                     f"/v1/conversations/{urllib.parse.quote(text, safe='')}/messages"):  # fmt: skip
            r = await served.client.get(path, params={name: text}, headers=headers("ann"))
            assert r.status_code < 500 or r.json()["type"] == "/problems/position-not-reached", (
                path,
                name,
                text,
            )
            if r.status_code >= 400:
                assert r.headers["content-type"] == "application/problem+json"


async def test_a_bug_is_a_500_without_retry_after_and_the_connection_stays_usable(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def bug(*_: object) -> int:
        raise RuntimeError("a bug in a query")

    async with uvicorn_on(served.app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with monkeypatch.context() as patch:
                patch.setattr(queries, "total_unread", bug)
                code, fields, body = await exchange(reader, writer, "/v1/unread")
            assert (code, fields["content-type"]) == (500, "application/problem+json")
            assert b'"/problems/internal-error"' in body and "retry-after" not in fields
            assert "query GET '/v1/unread' failed" in caplog.text
            assert (await exchange(reader, writer, "/v1/unread", "bob"))[0] == 200
        finally:
            writer.close()


async def test_postgres_unreachable_is_a_503_with_retry_after(served: Served) -> None:
    away = dataclasses.replace(served.settings, database_url="postgresql://postgres@127.0.0.1:9/none",
                               query_pool_timeout_s=0.3)  # fmt: skip
    async with Reads(away) as reads:
        app = create_app(away, Worker(away), reads)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as client:
            r = await client.get("/v1/unread", headers=headers("ann"))
    assert is_problem(r, 503, "unavailable") and r.headers["retry-after"] == "1"
    assert "detail" not in r.json()  # the driver's message names hosts: logged, not answered


async def test_position_waiters_hold_no_connection_and_do_not_slow_other_users(served: Served) -> None:
    client, wait_s = served.client, served.settings.read_wait_s
    pool = served.reads.pool
    far = {"position": unreachable(served)}
    waiters = [
        asyncio.create_task(client.get("/v1/unread", params=far, headers=headers(f"waiter{i}")))
        for i in range(200)
    ]
    await asyncio.sleep(0.2)  # all of them waiting
    pool.pop_stats()
    latencies = []
    reads_started = time.monotonic()
    for _ in range(20):
        started = time.monotonic()
        r = await client.get("/v1/unread", headers=headers("ann"))
        latencies.append(time.monotonic() - started)
        assert r.status_code == 200
    elapsed = time.monotonic() - reads_started
    checkouts = pool.pop_stats().get("requests_num", 0)
    answers = await asyncio.gather(*waiters)
    assert all(is_problem(r, 503, "position-not-reached") for r in answers)
    assert max(latencies) < wait_s / 10, latencies  # before: 0.23-0.27 s with 200 waiters
    # ann's 20 reads, plus one checkpoint read per poll for all the waiters together
    assert checkouts <= 20 + elapsed / 0.02 + 5, checkouts


async def test_position_waiters_are_woken_when_the_checkpoint_passes(
    served: Served, redis_client: aioredis.Redis
) -> None:
    appender = Appender(redis_client, served.settings.log.layout())
    await appender.open()
    try:
        later = await appender.append(commands.send_message(commands.Context("ann"), "c1",
                                                            bodies.SendMessage("later")))  # fmt: skip
    finally:
        await appender.close()
    answers = await asyncio.gather(*(
        served.client.get("/v1/unread", headers={**headers(f"u{i}"), "X-Parley-Position": later.position.token()})
        for i in range(20)
    ))  # fmt: skip
    assert [r.status_code for r in answers] == [200] * 20
    r = await served.client.get(
        "/v1/unread", headers={**headers("bob"), "X-Parley-Position": later.position.token()}
    )
    assert r.json()["unread"] == 2


async def test_the_checkpoint_watcher_is_restarted_after_a_crash(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = served.reads.watcher
    watcher._known.clear()  # so the waiter below must ask the watcher
    read = watcher.read
    crashes = [RuntimeError("a bug in the watcher")]

    async def buggy() -> dict[int, tuple[str | None, str]]:
        if crashes:
            raise crashes.pop()
        return await read()

    watcher.read = buggy  # type: ignore[method-assign]  # stands for any unforeseen exception
    with caplog.at_level(logging.ERROR, "projector.reads"):
        r = await served.client.get("/v1/unread", params={"position": served.position.token()},
                                    headers=headers("bob"))  # fmt: skip
    assert r.json()["unread"] == 1
    assert "checkpoint-watcher crashed (1 waiting); restarting" in caplog.text


async def test_search_text_is_capped_in_characters_and_terms(served: Served) -> None:
    client = served.client
    s = served.settings
    assert (s.search_max_chars, s.search_max_terms) == (256, 16)  # the defaults, as documented

    async def search(q: str) -> httpx.Response:
        return await client.get("/v1/search", params={"q": q}, headers=headers("ann"))

    assert is_problem(await search("pizza " * 43), 400, "query-too-long")
    assert is_problem(await search(" ".join(["pizza"] * 17)), 400, "query-too-many-terms")
    assert is_problem(await search(",".join(["pizza"] * 17)), 400, "query-too-many-terms")  # one "word"
    assert is_problem(await search("   "), 400, "missing-query")
    r = await search(" ".join(["pizza"] * 16))
    assert [m["seq"] for m in r.json()["messages"]] == [2]


async def test_statement_timeout(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    """A read past the statement timeout is cancelled: 503 `query-timeout` with Retry-After (the
    database is busy), except a search: 422 `query-too-expensive` (its words make it slow)."""
    async with (
        serving(redis_server_url, redis_client, log_namespace, database_url,
                query_statement_timeout_ms=100) as served,
        await psycopg.AsyncConnection.connect(database_url) as locker,
    ):  # fmt: skip
        await locker.execute("LOCK TABLE parley.inbox, parley.messages IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        r = await served.client.get("/v1/unread", headers=headers("ann"))
        assert is_problem(r, 503, "query-timeout") and r.headers["retry-after"] == "1"
        r = await served.client.get("/v1/search", params={"q": "pizza"}, headers=headers("ann"))
        assert is_problem(r, 422, "query-too-expensive") and "retry-after" not in r.headers
        assert time.monotonic() - started < 2
        await locker.rollback()
        assert (await served.client.get("/v1/unread", headers=headers("ann"))).status_code == 200


async def test_reads_in_flight_are_capped_per_user(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    async with serving(redis_server_url, redis_client, log_namespace, database_url,
                       query_max_concurrent_per_user=2, read_wait_s=0.5) as served:  # fmt: skip
        client = served.client
        far = {"position": unreachable(served)}
        waiting = [asyncio.create_task(client.get("/v1/unread", params=far, headers=headers("ann")))
                   for _ in range(2)]  # fmt: skip
        await asyncio.sleep(0.1)
        r = await client.get("/v1/unread", headers=headers("ann"))
        assert is_problem(r, 429, "too-many-reads") and r.headers["retry-after"] == "1"
        assert (await client.get("/v1/unread", headers=headers("bob"))).status_code == 200
        assert all(is_problem(r, 503, "position-not-reached") for r in await asyncio.gather(*waiting))
        assert (await client.get("/v1/unread", headers=headers("ann"))).status_code == 200


def test_parameters_are_parsed_as_ascii_digits_within_int8() -> None:
    assert params.parse_seq("after_seq", str(2**63 - 1)) == 2**63 - 1
    assert params.parse_seq("after_seq", "0") == 0
    for raw in ("²", "٣", "-1", "+1", " 1", "", str(2**63), "1e3"):
        with pytest.raises(params.Problem):
            params.parse_seq("after_seq", raw)
    assert params.parse_limit("200", 50) == 200 and params.parse_limit(None, 50) == 50
    for raw in ("0", "201", "²", "1" * 5000):
        with pytest.raises(params.Problem):
            params.parse_limit(raw, 50)


def test_a_position_is_reached_by_its_partitions_checkpoint_of_the_same_epoch() -> None:
    position = LogPosition(0, "5-1", "e1")
    assert reached(("e1", "5-1"), position) and reached((None, "6-0"), position)
    assert not reached(("e1", "5-0"), position) and not reached(None, position)
    with pytest.raises(PositionFromAnotherEpoch):
        reached(("e2", "9-0"), position)


def test_the_query_limits_are_read_from_the_environment() -> None:
    env = Env({"PARLEY_QUERY_POOL_SIZE": "3", "PARLEY_QUERY_POOL_TIMEOUT_S": "0.5",
               "PARLEY_QUERY_STATEMENT_TIMEOUT_MS": "250", "PARLEY_QUERY_MAX_CONCURRENT_PER_USER": "4",
               "PARLEY_SEARCH_MAX_CHARS": "100", "PARLEY_SEARCH_MAX_TERMS": "5"})  # fmt: skip
    s = ProjectorSettings.from_env(env, auth=False)
    assert (s.query_pool_size, s.query_pool_timeout_s, s.query_statement_timeout_ms) == (3, 0.5, 250)
    assert (s.query_max_concurrent_per_user, s.search_max_chars, s.search_max_terms) == (4, 100, 5)
    d = ProjectorSettings.from_env(Env({}), auth=False)
    assert (d.query_pool_size, d.query_pool_timeout_s, d.query_statement_timeout_ms) == (8, 2.0, 2000)
    assert (d.query_max_concurrent_per_user, d.search_max_chars, d.search_max_terms) == (8, 256, 16)
    with pytest.raises(SettingError, match="PARLEY_QUERY_POOL_SIZE"):
        ProjectorSettings.from_env(Env({"PARLEY_QUERY_POOL_SIZE": "0"}), auth=False)
