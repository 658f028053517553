"""The Postgres adapter against real servers: read models equal the in-memory fold; positions refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from events.log import EventLog, LogEntry
from projector.batch import Batch
from projector.exceptions import CheckpointMoved, EpochMismatch
from projector.migrate import migrate
from projector.model import fold_entries
from projector.settings import ProjectorSettings
from projector.snapshot import read_tables
from projector.store import Store
from projector.worker import Worker
from servicekit.log_settings import LogSettings
from tests.storeprobe import archive_keys, check_search_column, dead_letter_keys
from tests.workload import Workload

PARTITIONS = 4


def settings_for(redis_url: str, namespace: str, database_url: str, **extra: Any) -> ProjectorSettings:
    return ProjectorSettings(
        log=LogSettings(redis_url, namespace, PARTITIONS), database_url=database_url, batch=200,
        block_ms=100, lease_ttl_s=2.0, worker_id="test-worker", **extra,
    )  # fmt: skip


async def whole_log(log: EventLog) -> list[LogEntry]:
    entries: list[LogEntry] = []
    for p in range(log.layout.partitions):
        entries += await log.read_range(p, "-", "+")
    return entries


async def wait_caught_up(worker: Worker) -> None:
    async def loop() -> None:
        while not await worker.caught_up(range(PARTITIONS)):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), 30)


@contextlib.asynccontextmanager
async def caught_up_worker(settings: ProjectorSettings) -> AsyncIterator[Worker]:
    """A running worker that has projected (and archived) everything in the log; stopped on exit."""
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_caught_up(worker)
        yield worker
    finally:
        stop.set()
        await task
        await worker.close()


async def project_until_caught_up(settings: ProjectorSettings) -> None:
    """Run a worker until it has projected (and archived) everything in the log, then stop it."""
    async with caught_up_worker(settings):
        pass


async def assert_equal_to_fold(database_url: str, log: EventLog) -> None:
    await assert_equal_to_fold_of(database_url, await whole_log(log))


async def assert_equal_to_fold_of(database_url: str, entries: list[LogEntry]) -> None:
    """The read models, dead letters and archive equal the fold of `entries` (a log's whole history)."""
    model = fold_entries(entries)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await read_tables(conn, "parley") == model.tables
        assert await dead_letter_keys(conn) == set(model.dead_letters)
        assert await archive_keys(conn) == model.archived
        assert await check_search_column(conn, "parley") == 0


MIGRATIONS = Path(__file__).resolve().parent.parent / "projector" / "migrations"


async def test_migrations_are_recorded_once(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        first = await migrate(conn)
        again = await migrate(conn)
    store = sorted(f.stem for f in (MIGRATIONS).glob("*.sql"))
    read_models = sorted(f.stem for f in (MIGRATIONS / "read_models").glob("*.sql"))
    assert first == [f"parley_store:{n}" for n in store] + [f"parley:{n}" for n in read_models]
    assert "parley:0001_read_models" in first
    assert again == []


async def test_concurrent_migrations_do_not_race(database_url: str) -> None:
    async def one() -> list[str]:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            return await migrate(conn)

    results = await asyncio.gather(*(one() for _ in range(4)))
    total = len(list(MIGRATIONS.glob("*.sql"))) + len(list((MIGRATIONS / "read_models").glob("*.sql")))
    assert sorted(len(r) for r in results) == [0, 0, 0, total]


async def test_worker_projects_real_log_equal_to_fold(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    workload = Workload(seed=7)
    await workload.append(appender, 600)
    # A poison entry: not an event at all. It must become a dead letter; everything else carries on.
    await redis_client.xadd(settings.log.layout().stream_key(1), {"e": b"\xffnot an event"})
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await workload.append(appender, 400)
        await asyncio.wait_for(worker.ready.wait(), 10)
        await wait_caught_up(worker)
        await assert_equal_to_fold(database_url, worker.log)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            assert len(await dead_letter_keys(conn)) >= 1
    finally:
        stop.set()
        await task
        await worker.close()
        await appender.close()


@pytest.mark.parametrize(("state_messages", "cache_messages"), [(1_000, 12), (2, 12), (1, 500_000)])
async def test_a_capped_state_cache_evicts_and_reloads_and_still_equals_the_fold(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str,
    state_messages: int, cache_messages: int,
) -> None:  # fmt: skip
    """PARLEY_PROJECTOR_CACHE_MESSAGES 12: conversations are evicted after nearly every batch and loaded
    again; PARLEY_PROJECTOR_STATE_MESSAGES 1 or 2: a state holds its newest messages only, so edits and
    deletes of older ones and read markers set anywhere (the workload's) load them first. The read models
    still equal the fold (of whole states), and no state or cache holds more than its cap."""
    settings = dataclasses.replace(
        settings_for(redis_server_url, log_namespace, database_url, cache_messages=cache_messages),
        batch=20, state_messages=state_messages,
    )  # fmt: skip
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    try:
        workload = Workload(seed=11, read_anywhere=True)
        await workload.append(appender, 400)
        async with caught_up_worker(settings) as worker:
            await workload.append(appender, 400)
            await wait_caught_up(worker)
            await assert_equal_to_fold(database_url, worker.log)
            for projector in worker.projectors.values():
                assert projector.held_total == sum(len(s.messages) for s in projector.cache.values())
                assert projector.held_total <= cache_messages
                assert all(
                    len(s.messages) <= state_messages and not s.older for s in projector.cache.values()
                )
            if state_messages < 1_000:
                assert any(s.held_after for p in worker.projectors.values() for s in p.cache.values())
    finally:
        await appender.close()


async def test_repeated_or_older_position_is_refused(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    appender = Appender(redis_client, settings.log.layout())
    epoch = await appender.open()
    await Workload(seed=3).append(appender, 50)
    log = EventLog(redis_client, settings.log.layout())
    entries = await whole_log(log)
    assert entries
    p = entries[0].partition
    store = Store()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await migrate(conn)
        await store.prepare_connection(conn)
        batch = Batch(p, epoch, "0-0", last=entries[0].stream_id, entries=1)
        await store.commit(conn, batch)
        with pytest.raises(CheckpointMoved):
            await store.commit(conn, batch)  # the same position again
        with pytest.raises(CheckpointMoved):
            await store.commit(conn, Batch(p, epoch, "0-0", 1, last="0-1", entries=1))  # older
        with pytest.raises(EpochMismatch):
            await store.commit(conn, Batch(p, "other-epoch", entries[0].stream_id, 1, "99-0", 1))
        cp = await store.checkpoint(conn, p)
    assert (cp.stream_id, cp.events_applied, cp.epoch) == (entries[0].stream_id, 1, epoch)
    await appender.close()
