"""Faults against real servers: redrive, entry isolation, epoch change, trimmed stream, Postgres down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from command_api import bodies, commands
from command_api.append import Appender
from devstack.servers import PostgresServer, RedisServer
from events import schema
from events.codec import encode
from events.log import EventLog, LogEntry
from events.position import parse_stream_id
from projector.app import create_app
from projector.reads import Reads
from projector.redrive import redrive
from projector.settings import ProjectorSettings
from projector.store import Store
from projector.worker import Worker
from servicekit.log_settings import LogSettings
from tests.test_projector_api import AUTH
from tests.test_projector_fold import T0, envelope
from tests.test_projector_query_limits import projector_running
from tests.test_projector_store import assert_equal_to_fold
from tests.workload import Workload

PARTITIONS = 2


def settings_for(redis_url: str, namespace: str, database_url: str, **extra: Any) -> ProjectorSettings:
    return ProjectorSettings(
        log=LogSettings(redis_url, namespace, PARTITIONS), database_url=database_url, auth=AUTH, batch=200,
        block_ms=50, lease_ttl_s=2.0, worker_id="fault-worker", retry_max_s=0.5, **extra,
    )  # fmt: skip


@asynccontextmanager
async def running(settings: ProjectorSettings) -> AsyncIterator[tuple[Worker, httpx.AsyncClient]]:
    """A started worker running its loop, with an in-process client of its HTTP app."""
    async with (
        projector_running(settings) as (worker, _reads, app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://projector") as client,
    ):
        yield worker, client


async def xadd_events(redis: aioredis.Redis, settings: ProjectorSettings, *events: schema.Envelope) -> None:
    layout = settings.log.layout()
    for event in events:
        await redis.xadd(layout.stream_key(layout.partition_for(event.conversation_id)), {"e": encode(event)})


async def until(predicate: Any, limit_s: float = 15) -> None:
    deadline = time.monotonic() + limit_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def fetch(database_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        return await (await conn.execute(query, args)).fetchall()


async def test_redrive_applies_a_refused_event_once_its_conversation_exists(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    await EventLog(redis_client, settings.log.layout()).open(create=True)
    early = envelope("ghost", 2, "ann", schema.MessageSent("m-early", "before its conversation"))
    await xadd_events(redis_client, settings, early)  # the fold refuses: unknown conversation
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
        letters = await fetch(database_url, "SELECT error, redriven_at FROM parley_store.dead_letters")
        assert len(letters) == 1 and "unknown conversation" in letters[0][0] and letters[0][1] is None
        # "The fix": the conversation's creation shows up; now the letter applies.
        created = envelope("ghost", 1, "ann", schema.ConversationCreated("late", ("ann", "bob")))
        await xadd_events(redis_client, settings, created)
        await wait_caught_up(worker)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            assert await redrive(conn, Store()) == (1, 0)
            assert await redrive(conn, Store()) == (0, 0)  # idempotent: done letters are not re-applied
        later = envelope("ghost", 3, "bob", schema.MessageSent("m-later", "after"), T0 + timedelta(seconds=1))
        await xadd_events(redis_client, settings, later)
        await wait_caught_up(worker)  # the running worker reloaded the state the redrive changed
        assert not any(p.stopped for p in worker.projectors.values())
    messages = await fetch(database_url, "SELECT seq, body FROM parley.messages ORDER BY seq")
    assert messages == [(2, "before its conversation"), (3, "after")]
    (letter,) = await fetch(database_url, "SELECT redriven_at, attempts FROM parley_store.dead_letters")
    assert letter[0] is not None and letter[1] == 1
    (inbox,) = await fetch(database_url, "SELECT unread_count FROM parley.inbox WHERE user_id = 'ann'")
    assert inbox == (1,)  # ann did not read bob's message; her own re-driven one is not unread


async def test_entry_postgres_refuses_is_isolated_and_the_rest_of_the_batch_applies(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    await EventLog(redis_client, settings.log.layout()).open(create=True)
    second = T0 + timedelta(seconds=1)
    await xadd_events(
        redis_client, settings,
        envelope("iso", 1, "ann", schema.ConversationCreated("t", ("ann", "bob"))),
        envelope("iso", 2, "ann", schema.MessageSent("m2", "fine")),
        envelope("iso", 3, "ann", schema.MessageSent("m3", "NUL \x00 is no text for Postgres"), second),
        envelope("iso", 4, "bob", schema.MessageSent("m4", "also fine"), second),
    )  # fmt: skip
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
        projector = worker.projectors[settings.log.layout().partition_for("iso")]
        assert projector.stopped is None and projector.applied == 4
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            assert await redrive(conn, Store()) == (0, 1)  # still refused: the letter stays, attempts + 1
    assert await fetch(database_url, "SELECT seq FROM parley.messages ORDER BY seq") == [(2,), (4,)]
    ((error, attempts, data),) = await fetch(
        database_url, "SELECT error, attempts, data FROM parley_store.dead_letters WHERE redriven_at IS NULL"
    )
    assert "NUL" in error, error  # refused at decode time, before any COPY
    assert attempts == 2
    assert b"NUL" in bytes(data)
    counts = await fetch(database_url, "SELECT message_count, last_seq FROM parley.conversations")
    assert counts == [(2, 4)]


async def test_entries_that_cannot_be_stored_are_dead_letters_and_the_partition_moves_on(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    """Issue 8 item 8: a decodable `message_sent` with seq 2^63 made psycopg's int8 dumper raise
    OverflowError in the archive COPY and stopped the partition for good."""
    settings = settings_for(redis_server_url, log_namespace, database_url)
    layout = settings.log.layout()
    await EventLog(redis_client, layout).open(create=True)
    key = layout.stream_key(layout.partition_for("big"))
    second = T0 + timedelta(seconds=1)
    hostile = [
        envelope("big", 2**63, "ann", schema.MessageSent("m-huge", "seq beyond bigint")),
        envelope("big", 2, "ann", schema.MessagesRead(up_to_seq=2**63)),
        envelope("big", 0, "ann", schema.MessageSent("m-zero", "seq 0")),
        envelope("big", 2, "ann\x00", schema.MessageSent("m-nul", "NUL in the actor")),
        envelope("big", 2, "ann", schema.ConversationCreated("t", ("ann", "b\x00b"))),
    ]
    await xadd_events(
        redis_client, settings, envelope("big", 1, "ann", schema.ConversationCreated("t", ("ann",)))
    )
    for bad in hostile:
        await redis_client.xadd(key, {"e": encode(bad)})
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
        # A valid event whose stream id (set by hand: XADD accepts any increasing id) is beyond the archive's
        # bigint columns: it decodes, and only the write fails (OverflowError, not a DatabaseError).
        last_ms = parse_stream_id(await worker.log.head(layout.partition_for("big")))[0]
        unwritable = f"{last_ms + 1}-{2**64 - 1}"
        await redis_client.xadd(key, {"e": encode(envelope("big", 2, "ann", schema.MessageSent("m2", "lost")))},
                                id=unwritable)  # fmt: skip
        await xadd_events(
            redis_client, settings, envelope("big", 2, "ann", schema.MessageSent("m2", "kept"), second)
        )
        await wait_caught_up(worker)
        projector = worker.projectors[layout.partition_for("big")]
        assert projector.stopped is None and projector.applied == 8
    assert await fetch(database_url, "SELECT seq, body FROM parley.messages") == [(2, "kept")]
    letters = await fetch(database_url, "SELECT stream_id, error FROM parley_store.dead_letters ORDER BY id")
    assert len(letters) == 6, letters
    errors = [error for _sid, error in letters]
    assert "9223372036854775807" in errors[0] and "seq" in errors[0]  # refused at decode: out of range
    assert "up_to_seq" in errors[1] and "seq" in errors[2]
    assert "NUL" in errors[3] and "actor" in errors[3] and "participants" in errors[4]
    assert letters[5] == (unwritable, letters[5][1]) and letters[5][1].startswith("OverflowError"), letters[5]
    # A restarted worker does not trip over them again.
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
        assert not any(p.stopped for p in worker.projectors.values())


async def test_an_entry_whose_fold_crashes_is_isolated_as_a_dead_letter(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    await EventLog(redis_client, settings.log.layout()).open(create=True)
    await xadd_events(
        redis_client, settings, envelope("bug", 1, "ann", schema.ConversationCreated("t", ("ann", "bob")))
    )
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
    # A state the fold cannot have made (bob is a participant without an inbox row) stands for a bug.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("DELETE FROM parley.inbox WHERE user_id = 'bob'")
        await conn.commit()
    await xadd_events(
        redis_client, settings,
        envelope("bug", 2, "ann", schema.MessageSent("m2", "crashes the fold")),
        envelope("bug", 3, "ann", schema.ConversationArchived()),
    )  # fmt: skip
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
        projector = worker.projectors[settings.log.layout().partition_for("bug")]
        assert projector.stopped is None and projector.applied == 3
    assert await fetch(database_url, "SELECT error FROM parley_store.dead_letters") == [("KeyError: 'bob'",)]
    assert await fetch(database_url, "SELECT count(*) FROM parley.messages") == [(0,)]
    archived = await fetch(database_url, "SELECT archived, read_seq FROM parley.inbox WHERE user_id = 'ann'")
    assert archived == [(True, 0)]  # the entry after the culprit applied


async def test_epoch_change_under_a_running_worker_stops_the_partition(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    layout = settings.log.layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    await Workload(seed=5).append(appender, 100)
    async with running(settings) as (worker, client):
        await wait_caught_up(worker)
        r = await client.get("/readyz")
        assert r.status_code == 200
        lags = r.json()["details"]["partitions"]
        assert {p: (lag["lag_events"], lag["lag_seconds"]) for p, lag in lags.items()} == {
            "0": (0, 0),
            "1": (0, 0),
        }
        text = (await client.get("/metrics")).text
        for name in (
            "lag_events",
            "lag_seconds",
            "events_applied_total",
            "batch_size_bucket",
            "batch_seconds_bucket",
        ):
            assert f"parley_projector_{name}" in text
        before = await fetch(
            database_url, "SELECT partition, stream_id, events_applied FROM parley.checkpoints"
        )
        # The log is lost and recreated: a new epoch, and new entries in partition 1.
        await redis_client.delete(
            layout.meta_key(), *(layout.partition_meta_key(p) for p in range(PARTITIONS))
        )
        await EventLog(redis_client, layout).open(create=True)
        await redis_client.xadd(
            layout.stream_key(1), {"e": encode(envelope("new", 1, "x", schema.ConversationCreated("n", ())))}
        )

        async def stopped() -> bool:
            return worker.projectors[1].stopped is not None

        await until(stopped)
        r = await client.get("/readyz")
        assert r.status_code == 503 and "partition 1" in r.json()["detail"] and "epoch" in r.json()["detail"]
        assert 'parley_projector_epoch_mismatch{partition="1"} 1.0' in (await client.get("/metrics")).text
        after = await fetch(
            database_url, "SELECT partition, stream_id, events_applied FROM parley.checkpoints"
        )
        assert after == before  # nothing skipped, nothing applied from the other log
    await appender.close()


async def test_trimmed_stream_after_the_checkpoint_stops_the_partition_loudly(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    layout = settings.log.layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    log = EventLog(redis_client, layout)
    workload = Workload(seed=9)
    await workload.append(appender, 100)
    async with running(settings) as (worker, _client):
        await wait_caught_up(worker)
    checkpoints = dict(await fetch(database_url, "SELECT partition, stream_id FROM parley.checkpoints"))
    await workload.append(appender, 100)
    heads = {p: await log.head(p) for p in range(PARTITIONS)}
    # The workload's conversation ids are random, so which partition got entries both before and after its
    # checkpoint varies from run to run: trim one that did.
    grown = [
        p for p, cp in checkpoints.items() if cp != "0-0" and parse_stream_id(heads[p]) > parse_stream_id(cp)
    ]
    assert grown, (checkpoints, heads)
    gap = grown[0]
    # A trimmer breaking its contract: exactly (`~` keeps whole nodes, maybe the checkpoint's), head only.
    await redis_client.xtrim(layout.stream_key(gap), minid=heads[gap], approximate=False)
    async with running(settings) as (worker, client):
        await until(lambda: asyncio.sleep(0, worker.projectors[gap].stopped is not None))
        assert "trimmed" in (worker.projectors[gap].stopped or "")
        assert f'parley_projector_log_gap{{partition="{gap}"}} 1.0' in (await client.get("/metrics")).text
        assert f"partition {gap}" in (await client.get("/readyz")).json()["detail"]
        for other in set(range(PARTITIONS)) - {gap}:
            await wait_caught_up_partition(worker, other)
    query = "SELECT stream_id FROM parley.checkpoints WHERE partition = %s"
    assert await fetch(database_url, query, gap) == [(checkpoints[gap],)]
    await appender.close()


async def wait_caught_up_partition(worker: Worker, partition: int) -> None:
    async def done() -> bool:
        return await worker.caught_up([partition])

    await until(done)


async def wait_caught_up(worker: Worker) -> None:
    async def done() -> bool:
        return await worker.caught_up(range(PARTITIONS))

    await until(done)


@pytest.mark.slow
async def test_postgres_down_then_back_worker_retries_and_resumes(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, pg_root: Path
) -> None:
    server = PostgresServer(pg_root / "pg", fast=False)
    await asyncio.to_thread(server.start)
    try:
        database_url = await asyncio.to_thread(server.create_database, "parley")
        settings = settings_for(redis_server_url, log_namespace, database_url)
        appender = Appender(redis_client, settings.log.layout())
        await appender.open()
        workload = Workload(seed=13)
        await workload.append(appender, 200)
        async with running(settings) as (worker, client):
            await wait_caught_up(worker)
            await asyncio.to_thread(server.stop)
            await workload.append(appender, 200)

            async def retrying() -> bool:
                return any(p.retrying for p in worker.projectors.values())

            await until(retrying)
            r = await client.get("/readyz")
            assert r.status_code == 503
            failures = r.json()["failures"]
            assert "postgres" in failures and "retrying" in failures["projection"], failures
            await asyncio.to_thread(server.start)
            await wait_caught_up(worker)
            await until(lambda: asyncio.sleep(0, not any(p.retrying for p in worker.projectors.values())))
            assert (await client.get("/readyz")).status_code == 200
            assert not any(p.stopped for p in worker.projectors.values())
        await assert_equal_to_fold(database_url, EventLog(redis_client, settings.log.layout()))
        await appender.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_lost_lease_stops_the_partition_until_the_worker_wins_it_back(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    workload = Workload(seed=17)
    await workload.append(appender, 100)
    worker = Worker(settings)
    await worker.start()
    try:
        await worker._manage()  # one lease round by hand: no round runs unless the test says so
        await wait_caught_up(worker)
        before = dict(worker.projectors)
        # Our renewals stalled past the TTL and another worker took every partition (its leases are now over).
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await conn.execute("UPDATE parley_store.leases SET owner = 'thief', expires_at = now()")
            await conn.commit()
        await workload.append(appender, 200)  # a partition that gets entries finds out at its next commit

        async def lost() -> bool:
            return any(p.lease_lost for p in before.values())

        await until(lost)
        gone = {p for p, pr in before.items() if pr.lease_lost}
        assert all(before[p].stopped is None for p in gone)  # not a loud stop: the lease decides who projects

        async def resumed() -> bool:  # each round wins the expired leases back and restarts what stopped
            await worker._manage()
            return await worker.caught_up(range(PARTITIONS))

        await until(resumed)
        assert all(worker.projectors[p] is not before[p] for p in gone)
        assert not any(p.stopped for p in worker.projectors.values())
    finally:
        await worker._stop_all()
        await worker.close()
    await assert_equal_to_fold(database_url, EventLog(redis_client, settings.log.layout()))
    await appender.close()


async def test_a_partition_that_crashes_stops_loudly_instead_of_vanishing(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    await EventLog(redis_client, settings.log.layout()).open(create=True)
    worker = Worker(settings)
    await worker.start()

    async def bug(*_args: object, **_kwargs: object) -> list[LogEntry]:
        raise RuntimeError("a bug in the read path")

    worker.log.read_many = bug  # type: ignore[method-assign]  # the poller's read; stands for any bug
    try:
        await worker._manage()

        async def stopped() -> bool:
            return all(p.stopped for p in worker.projectors.values())

        await until(stopped)
        assert all(
            p.stopped == "crashed: RuntimeError: a bug in the read path" for p in worker.projectors.values()
        )
        async with Reads(settings) as reads:
            transport = httpx.ASGITransport(app=create_app(settings, worker, reads))
            async with httpx.AsyncClient(transport=transport, base_url="http://p") as client:
                r = await client.get("/readyz")
        assert r.status_code == 503 and "crashed" in r.json()["detail"]
    finally:
        await worker._stop_all()
        await worker.close()


async def test_after_a_redis_restart_no_partition_fails_on_a_dead_pooled_connection(
    redis_proc: RedisServer, log_namespace: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarts between two steps of the worker (the test blocks the loop meanwhile), so every
    pooled connection it holds is dead when it next runs: none of them may surface as an error."""
    settings = settings_for(redis_proc.url, log_namespace, database_url)
    writer = aioredis.Redis.from_url(redis_proc.url)  # the test's own writer: not under test
    appender = Appender(writer, settings.log.layout())
    await appender.open()
    ann = commands.Context("ann")
    ids = [f"r{i}" for i in range(4)]
    try:
        async with running(settings) as (worker, client):
            for cid in ids:
                await appender.append(
                    commands.create_conversation_with_id(ann, bodies.CreateConversation("t"), cid)
                )
            await until(lambda: projected(worker, len(ids)))
            assert (await client.get("/readyz")).status_code == 200  # its checks use pooled connections too
            with caplog.at_level(logging.WARNING, "projector"):
                redis_proc.stop()
                redis_proc.start()
                await writer.connection_pool.disconnect()
                for cid in ids:
                    await appender.append(commands.send_message(ann, cid, bodies.SendMessage("after")))
                await until(lambda: projected(worker, 2 * len(ids)))
                assert (await client.get("/readyz")).status_code == 200
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
            assert all(p.retrying is None for p in worker.projectors.values())
    finally:
        await appender.close()
        await writer.aclose()


async def projected(worker: Worker, events: int) -> bool:
    async with worker.pool.connection() as conn:
        checkpoints = await worker.store.checkpoints(conn)
    return sum(c.events_applied for c in checkpoints.values()) >= events
