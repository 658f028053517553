"""`rebuild` under load: a live worker, query traffic and a writer keep running while the read models are
rebuilt beside them and swapped in; no query fails, nothing is lost, the result equals the fold."""

from __future__ import annotations

import asyncio
import time

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from projector import queries
from projector.app import create_app
from projector.reads import Reads
from projector.rebuild import rebuild
from projector.settings import ProjectorSettings
from projector.store import Store
from projector.worker import Worker
from servicekit.log_settings import LogSettings
from tests.test_projector_api import AUTH, headers
from tests.test_projector_store import assert_equal_to_fold, wait_caught_up, whole_log
from tests.workload import Workload

PARTITIONS = 4
pytestmark = pytest.mark.slow


async def schemas(database_url: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'parley%'")
        return {str(r[0]) for r in await cur.fetchall()}


async def test_rebuild_under_write_and_query_load_swaps_atomically(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = ProjectorSettings(
        log=LogSettings(redis_server_url, log_namespace, PARTITIONS), database_url=database_url, auth=AUTH,
        batch=100, block_ms=50, lease_ttl_s=2.0, worker_id="live-worker", read_wait_s=3.0,
    )  # fmt: skip
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    workload = Workload(seed=31)
    await workload.append(appender, 800)
    await redis_client.xadd(settings.log.layout().stream_key(2), {"e": b"\xffpoison"})
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 10)
    await wait_caught_up(worker)
    # Damage the live model: only a real swap repairs every row.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("UPDATE parley.conversations SET title = 'tampered'")
    before = await schemas(database_url)

    errors: list[str] = []
    done = asyncio.Event()
    deadline = time.monotonic() + 30
    counts = {"http": 0, "prepared": 0}

    async def writer() -> None:
        for _ in range(60):
            if done.is_set() or time.monotonic() > deadline:
                return
            await workload.append(appender, 20)
            await asyncio.sleep(0.01)

    async def http_traffic(client: httpx.AsyncClient) -> None:
        for i in range(5000):
            if done.is_set() or time.monotonic() > deadline:
                return
            user = f"u{i % 20}"
            path = ("/v1/conversations", "/v1/unread", "/v1/search?q=pizza")[i % 3]
            r = await client.get(path, headers=headers(user))
            counts["http"] += 1
            if r.status_code != 200:
                errors.append(f"{path}: {r.status_code} {r.text}")

    async def prepared_traffic(conn: psycopg.AsyncConnection[object]) -> None:
        # Every statement is server-side prepared (threshold 0): the rename must not break them.
        for i in range(5000):
            if done.is_set() or time.monotonic() > deadline:
                return
            try:
                await queries.total_unread(conn, f"u{i % 20}")
                await queries.conversations(conn, f"u{i % 20}", 10, None, None)
                await Store().checkpoint(conn, i % PARTITIONS)
            except psycopg.Error as exc:
                errors.append(f"prepared: {exc!r}")
            counts["prepared"] += 1

    tampered = "SELECT count(*) FROM parley.conversations WHERE title = 'tampered'"
    async with (
        Reads(settings) as reads,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(settings, worker, reads)),
            base_url="http://projector",
        ) as client,
        await psycopg.AsyncConnection.connect(database_url, prepare_threshold=0, autocommit=True) as prep,
    ):
        assert (await (await prep.execute(tampered)).fetchone()) != (0,)
        loads = [asyncio.create_task(t) for t in (writer(), http_traffic(client), prepared_traffic(prep))]
        try:
            report = await asyncio.wait_for(rebuild(settings), 30)
            await asyncio.sleep(0.3)  # traffic on the swapped-in schema too
        finally:
            done.set()
            await asyncio.gather(*loads)
        # The very same prepared statement now reads the rebuilt schema.
        assert (await (await prep.execute(tampered)).fetchone()) == (0,)
    try:
        assert not errors, errors[:5]
        assert counts["http"] > 20 and counts["prepared"] > 20, counts
        assert report.from_archive > 0
        await workload.append(appender, 200)  # the live worker carries on in the swapped-in schema
        await wait_caught_up(worker)
        await assert_equal_to_fold(database_url, worker.log)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute("SELECT sum(events_applied) FROM parley.checkpoints")
            assert (await cur.fetchone()) == (len(await whole_log(worker.log)),)
        assert await schemas(database_url) == before == {"parley", "parley_store"}
        assert not any(p.stopped for p in worker.projectors.values())
    finally:
        stop.set()
        await task
        await worker.close()
        await appender.close()
