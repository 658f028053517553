"""`python -m projector snapshot`: the read models as they stood at a past point, in their own schema,
equal to the fold of the log up to that point and to what the live models held then."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from events.cursor import encode_cursor
from events.position import parse_stream_id
from projector import queries
from projector.model import fold_entries
from projector.snapshot import read_tables
from projector.worker import Worker
from tests.test_history_replay import projector_cli, trim_to_archive
from tests.test_projector_store import settings_for, wait_caught_up, whole_log
from tests.workload import Workload

pytestmark = pytest.mark.slow


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    code, out, err = await projector_cli(env, "snapshot", *args)
    return code, out.decode(), err


async def answers(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
    """What the query API's SQL answers for a few users, from whatever schema is named `parley`."""
    out: list[Any] = []
    for user in ("u1", "u2", "u3", "u7"):
        convs = await queries.conversations(conn, user, 50, None, None)
        out.append(convs)
        out.append(await queries.total_unread(conn, user))
        out.append(await queries.search(conn, user, "pizza", 50))
        for c in convs[:3]:
            out.append(
                await queries.messages(conn, user, c.conversation_id, 50, after_seq=0, before_seq=None)
            )
    return out


async def test_snapshot_equals_the_fold_and_the_live_models_then(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    settings = settings_for(redis_server_url, log_namespace, database_url)
    env = {**os.environ, **settings.child_env()}
    appender = Appender(redis_client, settings.log.layout())
    epoch = await appender.open()
    workload = Workload(seed=3)
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await workload.append(appender, 400)
        await wait_caught_up(worker)
        at_x = await whole_log(worker.log)
        heads = ["0-0"] * settings.log.partitions
        for e in at_x:
            heads[e.partition] = max(heads[e.partition], e.stream_id, key=parse_stream_id)
        cursor = encode_cursor(epoch, heads)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            live_then = await read_tables(conn, "parley")
            answers_then = await answers(conn)
        await workload.append(appender, 300)
        await wait_caught_up(worker)
    finally:
        stop.set()
        await task
        await worker.close()
    entries = await whole_log(appender.log)
    await trim_to_archive(redis_client, settings)  # the snapshot must come from the archive

    code, out, err = await cli(env, "--at", cursor, "--schema", "snap_x")
    assert code == 0, err
    assert "snap_x" in out
    model = fold_entries(at_x)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        snap = await read_tables(conn, "snap_x")
        assert snap == live_then == model.tables
        assert snap != await read_tables(conn, "parley")  # the live models moved on, untouched
        # The query API's own SQL, run against the snapshot in the live schema's place.
        await conn.execute("ALTER SCHEMA parley RENAME TO parley_live_aside")
        await conn.execute("ALTER SCHEMA snap_x RENAME TO parley")
        try:
            assert await answers(conn) == answers_then
        finally:
            await conn.execute("ALTER SCHEMA parley RENAME TO snap_x")
            await conn.execute("ALTER SCHEMA parley_live_aside RENAME TO parley")

    # A point in time: everything logged at or before that millisecond.
    middle = sorted(parse_stream_id(e.stream_id)[0] for e in entries)[len(entries) // 2]
    from datetime import UTC, datetime

    at_time = datetime.fromtimestamp(middle / 1000, UTC).isoformat(timespec="milliseconds")
    code, _, err = await cli(env, "--at", at_time, "--schema", "snap_t")
    assert code == 0, err
    upto = [e for e in entries if parse_stream_id(e.stream_id)[0] <= middle]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await read_tables(conn, "snap_t") == fold_entries(upto).tables

    code, out, _ = await cli(env, "--list")
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["snap_t", "snap_x"]
    for args, message in (
        (["--at", cursor, "--schema", "snap_x"], "exists"),
        (["--at", cursor, "--schema", "parley"], "reserved"),
        (["--at", "yesterday", "--schema", "s1"], "nor an ISO 8601 time"),
        (["--at", "feed.1.1-0", "--schema", "s1"], "epoch"),
        (["--drop", "parley"], "not a snapshot"),
    ):
        code, _, err = await cli(env, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    code, _, err = await cli(env, "--drop", "snap_x")
    assert code == 0, err
    code, out, _ = await cli(env, "--list")
    assert [line.split("\t")[0] for line in out.splitlines()] == ["snap_t"]
    await appender.close()
