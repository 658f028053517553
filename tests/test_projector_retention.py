"""Stream retention: the pure trim decision (table tests), then the task and `python -m projector trim`
against real Redis and Postgres: never past an unarchived entry, resumes with the projector, rebuild exact."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from command_api import commands
from command_api.append import Appender
from command_api.bodies import CreateConversation, SendMessage
from command_api.commands import Context
from events.log import EventLog, LogEntry
from events.position import parse_stream_id
from projector.exceptions import CheckpointMoved
from projector.migrate import migrate
from projector.rebuild import REBUILD_LOCK_KEY, rebuild
from projector.retention import Bound, Decision, Retention, StreamInfo, Window, settle, trim_bound
from projector.settings import ProjectorSettings
from projector.worker import PartitionProjector, Worker
from servicekit.metrics import TASK_FAILURES
from tests.test_projector_faults import fetch, running, settings_for, until, wait_caught_up
from tests.test_projector_store import assert_equal_to_fold_of, whole_log

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_000_000_000  # ms
DAY = 86_400.0
S = StreamInfo


def at(ms: int, seq: int = 0) -> str:
    return f"{ms}-{seq}"


# (archive head, checkpoint, stream, window) -> the bound: how far the archive and the age let it go.
BOUNDS = [
    pytest.param(None, None, S(None, None, 0), Window(DAY, 10), Bound(None, "the stream is empty"), id="empty"),
    pytest.param(
        at(900), at(900), S(at(100), at(900), 10), Window(0, 10),
        Bound(None, "the stream holds 10 entries, the window keeps 10"), id="count-keeps-all",
    ),
    pytest.param(
        at(900), at(900), S(at(NOW - 5_000), at(NOW), 50), Window(10, 0),
        Bound(None, "no entry is older than 10s"), id="nothing-old-enough",
    ),
    pytest.param(
        None, "0-0", S(at(100), at(900), 50), Window(0, 10),
        Bound(None, "nothing is archived yet: waiting for the projector", blocked=True), id="nothing-archived",
    ),
    pytest.param(
        at(500), None, S(at(100), at(900), 50), Window(0, 10),
        Bound(None, "nothing is archived yet: waiting for the projector", blocked=True),
        id="checkpoint-of-another-epoch",
    ),
    pytest.param(
        at(900), at(900), S(at(100), at(900), 50), Window(0, 10),
        Bound(at(900), "archived up to 900-0", 40, blocked=False), id="caught-up-count-only",
    ),
    pytest.param(
        at(500), at(900), S(at(100), at(900), 50), Window(0, 10),
        Bound(at(500), "archived up to 500-0", 40, blocked=True), id="archive-behind-checkpoint",
    ),
    pytest.param(
        at(900), at(500), S(at(100), at(900), 50), Window(0, 10),
        Bound(at(500), "archived up to 500-0", 40, blocked=True), id="checkpoint-behind-archive",
    ),
    pytest.param(
        at(NOW - 1000), at(NOW - 1000), S(at(NOW - 20_000), at(NOW), 50), Window(10, 0),
        Bound(at(NOW - 10_000), "older than 10s", None), id="age-binds",
    ),
    pytest.param(
        at(NOW - 15_000), at(NOW - 15_000), S(at(NOW - 20_000), at(NOW), 50), Window(10, 5),
        Bound(at(NOW - 15_000), f"archived up to {NOW - 15_000}-0", 45, blocked=True), id="archive-binds-age",
    ),
    pytest.param(
        at(NOW - 15_000), at(NOW - 15_000), S(at(NOW - 20_000), at(NOW - 15_000), 50), Window(10, 0),
        Bound(at(NOW - 15_000), f"archived up to {NOW - 15_000}-0", None, blocked=False),
        id="quiet-stream-all-archived",
    ),
    pytest.param(
        at(100), at(100), S(at(100), at(900), 50), Window(0, 10),
        Bound(None, "every entry from 100-0 on is unarchived (archive head 100-0)", blocked=True),
        id="stopped-projector",
    ),
    pytest.param(
        at(900, 2), at(900, 2), S(at(900, 0), at(900, 5), 50), Window(0, 0),
        Bound(at(900, 2), "archived up to 900-2", None, blocked=True), id="both-bounds-off-seq-order",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("archive", "checkpoint", "stream", "window", "expected"), BOUNDS)
def test_trim_bound(archive: str | None, checkpoint: str | None, stream: StreamInfo, window: Window,
                    expected: Bound) -> None:  # fmt: skip
    assert trim_bound(archive, checkpoint, stream, NOW, window) == expected


# (bound, ids below it, step) -> the XTRIM.
SETTLES = [
    pytest.param(Bound(None, "why", blocked=True), [], 10, Decision(None, "why", blocked=True), id="no-bound"),
    pytest.param(Bound(at(9), "r", 5), [], 10, Decision(None, "no entry below 9-0"), id="raced"),
    pytest.param(Bound(at(9), "r", 5), [at(1), at(2)], 10, Decision(at(9), "r", 2), id="all-below-go"),
    pytest.param(
        Bound(at(9), "r", 2), [at(1), at(2), at(3)], 10, Decision(at(3), "the window keeps the newest entries", 2),
        id="count-binds",
    ),
    pytest.param(
        Bound(at(9), "r", None), [at(1), at(2), at(3)], 2, Decision(at(3), "r (at most 2 entries per step)", 2,
                                                                   more=True),
        id="step-limit",
    ),
    pytest.param(
        Bound(at(9), "r", 5, blocked=True), [at(1)], 10, Decision(at(9), "r", 1, blocked=True),
        id="archive-holds-more-than-the-window",
    ),
    pytest.param(
        Bound(at(9), "r", 1, blocked=True), [at(1)], 10, Decision(at(9), "r", 1, blocked=False),
        id="archive-and-count-agree",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("bound", "below", "step", "expected"), SETTLES)
def test_settle(bound: Bound, below: list[str], step: int, expected: Decision) -> None:
    assert settle(bound, below, step) == expected


# --- against real servers ---------------------------------------------------------------------------------


KEEP = 20


def retention_settings(redis_url: str, namespace: str, database_url: str, **extra: Any) -> ProjectorSettings:
    fields: dict[str, Any] = dict(retain_stream_s=0, retain_stream_events=KEEP, retention_interval_s=0.05)
    return settings_for(redis_url, namespace, database_url, rebuild_processes=1, **(fields | extra))


async def stream_ids(redis: aioredis.Redis, settings: ProjectorSettings, partition: int) -> list[str]:
    entries = await EventLog(redis, settings.log.layout()).read_range(partition, "-", "+")
    return [e.stream_id for e in entries]


class Writes:
    """Messages in one conversation per partition, through the command side's appender."""

    def __init__(self, appender: Appender, partitions: range) -> None:
        self.appender = appender
        layout = appender.layout
        self.cids = [
            next(c for n in range(1000) if layout.partition_for(c := f"c{n}") == p) for p in partitions
        ]
        self.sent = 0

    async def create(self) -> None:
        for cid in self.cids:
            body = CreateConversation(title="t", participants=["bob"])
            await self.appender.append(commands.create_conversation_with_id(Context(actor="ann"), body, cid))

    async def send(self, per_conversation: int) -> None:
        for _ in range(per_conversation):
            self.sent += 1
            for cid in self.cids:
                body = SendMessage(body=f"m{self.sent}")
                await self.appender.append(commands.send_message(Context(actor="ann"), cid, body))


def in_log_order(history: dict[tuple[int, str], LogEntry]) -> list[LogEntry]:
    return sorted(history.values(), key=lambda e: (e.partition, parse_stream_id(e.stream_id)))


async def test_retention_never_trims_an_unarchived_entry_and_resumes_with_the_projector(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = retention_settings(redis_server_url, log_namespace, database_url)
    layout = settings.log.layout()
    log = EventLog(redis_client, layout)
    appender = Appender(redis_client, layout)
    await appender.open()
    partitions = range(layout.partitions)
    writes = Writes(appender, partitions)
    await writes.create()
    await writes.send(100)
    history = {(e.partition, e.stream_id): e for e in await whole_log(log)}

    async def trimmed_to_window() -> bool:
        return all([await redis_client.xlen(layout.stream_key(p)) == KEEP for p in partitions])

    async with running(settings) as (worker, client):
        await wait_caught_up(worker)
        await until(trimmed_to_window)
        text = (await client.get("/metrics")).text
        assert 'parley_retention_blocked_by_archive{partition="0"} 0.0' in text
        assert "parley_retention_trimmed_entries_total" in text and "parley_retention_trim_point_ms" in text
    # The projector is stopped; the log grows past the window.
    await writes.send(100)
    history.update({(e.partition, e.stream_id): e for e in await whole_log(log)})
    checkpoints = dict(await fetch(database_url, "SELECT partition, stream_id FROM parley.checkpoints"))
    backlog = {
        p: [sid for (q, sid) in history if q == p and parse_stream_id(sid) > parse_stream_id(checkpoints[p])]
        for p in partitions
    }
    assert all(len(b) > KEEP for b in backlog.values()), {p: len(b) for p, b in backlog.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(REDIS_URL=redis_server_url, PARLEY_LOG_NAMESPACE=log_namespace, DATABASE_URL=database_url,
               PARLEY_PARTITIONS=str(layout.partitions), PARLEY_RETAIN_STREAM_S="0",
               PARLEY_RETAIN_STREAM_EVENTS=str(KEEP))  # fmt: skip
    lengths = [await redis_client.xlen(layout.stream_key(p)) for p in partitions]
    dry = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "projector", "trim", "--dry-run"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert [await redis_client.xlen(layout.stream_key(p)) for p in partitions] == lengths
    # The window asks for the last 20; only the archived ones before the checkpoint may go.
    assert dry.stdout.count(f"would trim {KEEP - 1} entries") == layout.partitions, dry.stdout
    assert dry.stdout.count("[held back by the archive]") == layout.partitions, dry.stdout
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    try:
        statuses = await Retention.of(settings, redis_client, pool).trim_once()  # what `trim` does
    finally:
        await pool.close()
    assert all(s.blocked and s.trimmed == KEEP - 1 and s.error is None for s in statuses), statuses
    for p in partitions:  # every entry after the checkpoint (= the archive's head) is still in the stream
        ids = await stream_ids(redis_client, settings, p)
        assert ids[0] == checkpoints[p] and ids[1:] == backlog[p]
    async with running(settings) as (worker, client):
        await wait_caught_up(worker)  # no LogGap: nothing it had not seen was trimmed
        await until(trimmed_to_window)
        await until(lambda: asyncio.sleep(0, not any(s.blocked for s in worker.retention.statuses.values())))
        details = (await client.get("/readyz")).json()["details"]["retention"]
        assert {d["blocked_by_archive"] for d in details.values()} == {False}, details
        assert not any(p.stopped for p in worker.projectors.values())
    await assert_equal_to_fold_of(database_url, in_log_order(history))
    # A rebuild after the trims still rebuilds every read model exactly: the archive is the history.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("UPDATE parley.conversations SET title = 'tampered'")
        await conn.commit()
    report = await rebuild(settings)
    assert (report.from_archive, report.from_log) == (len(history), 0)  # the streams hold only archived ones
    await assert_equal_to_fold_of(database_url, in_log_order(history))
    await appender.close()


async def test_a_failing_pass_is_logged_and_retried_until_it_succeeds(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    settings = retention_settings(redis_server_url, log_namespace, database_url)
    appender = Appender(redis_client, settings.log.layout())
    await appender.open()
    await Writes(appender, range(settings.log.partitions)).create()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    retention = Retention.of(settings, redis_client, pool)
    stop = asyncio.Event()
    task = asyncio.create_task(retention.run(stop))
    try:  # the database has no store yet: every pass fails, loudly, and is retried
        await until(lambda: asyncio.sleep(0, any(s.error for s in retention.statuses.values())))
        assert "UndefinedTable" in (retention.statuses[0].error or "")
        assert any("retention of partition 0 failed" in r.message for r in caplog.records)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await migrate(conn)
        await until(lambda: asyncio.sleep(0, all(s.error is None for s in retention.statuses.values())), 5)
        assert retention.statuses[0].reason == "the stream holds 1 entries, the window keeps 20"
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await pool.close()
        await appender.close()


async def test_a_checkpoint_moved_on_under_an_idle_worker_reloads_instead_of_a_log_gap(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    """A rebuild's swap moves the live checkpoint on (to where the rebuild got) while the worker waits on
    XREAD; retention may then trim up to it before the worker's next batch. That is no gap: reload."""
    settings = retention_settings(redis_server_url, log_namespace, database_url, retention=False)
    layout = settings.log.layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    writes = Writes(appender, range(layout.partitions))
    await writes.create()
    worker = Worker(settings, use_leases=False)
    await worker.start()
    try:
        partition = layout.partition_for(writes.cids[0])
        projector = PartitionProjector(worker, partition)
        await projector.load()
        await projector.step()
        await writes.send(3)
        head = await worker.log.head(partition)
        # What a swap does when the rebuild got further than this worker, then a trim up to the new checkpoint.
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await conn.execute(
                "UPDATE parley.checkpoints SET stream_id = %s, version = version + 2 WHERE partition = %s",
                (head, partition),
            )
            await conn.commit()
        await redis_client.xtrim(layout.stream_key(partition), minid=head, approximate=False)
        await writes.send(1)
        with pytest.raises(CheckpointMoved):
            await projector.step()
        await projector.load()
        assert await projector.step() == 1
    finally:
        await worker.close()
        await appender.close()


async def test_nothing_is_trimmed_while_a_rebuild_runs(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = retention_settings(redis_server_url, log_namespace, database_url, retain_stream_events=1)
    layout = settings.log.layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    writes = Writes(appender, range(layout.partitions))
    await writes.create()
    await writes.send(5)
    async with running(dataclasses.replace(settings, retention=False)) as (worker, _client):
        await wait_caught_up(worker)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    retention = Retention.of(settings, redis_client, pool)
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as rebuild_session:
            await rebuild_session.execute("SELECT pg_advisory_lock(%s)", (REBUILD_LOCK_KEY,))
            statuses = await retention.trim_once()
            assert {(s.reason, s.trimmed) for s in statuses} == {("a rebuild is running", 0)}
        statuses = await retention.trim_once()  # the lock went with its session
        assert {(s.trimmed, s.length) for s in statuses} == {(5, 1)}, statuses
    finally:
        await pool.close()
        await appender.close()


async def test_a_bug_around_the_passes_is_logged_and_the_task_restarted(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    settings = retention_settings(redis_server_url, log_namespace, database_url)
    await EventLog(redis_client, settings.log.layout()).open(create=True)
    passes: list[int] = []
    trim_once = Retention.trim_once

    async def buggy(self: Retention, *, dry_run: bool = False) -> Any:
        passes.append(1)
        if len(passes) == 1:
            raise RuntimeError("a bug around the passes")  # stands for any unforeseen exception
        return await trim_once(self, dry_run=dry_run)

    monkeypatch.setattr(Retention, "trim_once", buggy)
    failures = TASK_FAILURES.labels("projector", "retention", "restart")._value.get()
    worker = Worker(settings, use_leases=False)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await until(lambda: asyncio.sleep(0, len(passes) >= 3))
        assert "projector task retention crashed" in caplog.text and "a bug around the passes" in caplog.text
        assert TASK_FAILURES.labels("projector", "retention", "restart")._value.get() == failures + 1
        worker.supervisor.check()  # restarted: the projector stays ready
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await worker.close()
