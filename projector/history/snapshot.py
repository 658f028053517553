"""Time travel: every read model as it stood at a past position, built into a named schema for SQL.

`python -m projector snapshot --at POSITION|TIME --schema NAME` folds the archive, then the streams
beyond it, up to and including that point, with the worker's own fold and commit code (as a rebuild
does), into `NAME`; the live schema is not touched. `NAME.checkpoints` says where each partition
stands. Snapshots are marked by a schema comment, which is how `--list` finds them and `--drop` refuses
to drop anything else.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from events.log import LogEntry
from projector.exceptions import SelectionError
from projector.history import replay
from projector.history.reader import HistoryReader
from projector.history.selection import MAX_SEQ, Selection, StreamKey, parse_bound, parse_time
from projector.migrate import migrate
from projector.settings import ProjectorSettings
from projector.store import Store
from projector.worker import PartitionProjector, Worker

MARK = "parley snapshot at "
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_RESERVED = re.compile(r"^(parley|parley_store|parley_(rebuild|old)_[0-9]+|pg_.*|information_schema|public)$")


@dataclass(frozen=True, slots=True)
class SnapshotReport:
    schema: str
    at: str
    events: int
    seconds: float


def check_name(schema: str) -> None:
    """Raises SelectionError unless `schema` is a plain lowercase identifier the projector does not own."""
    if not _NAME.match(schema):
        raise SelectionError(f"schema name {schema!r}: use lowercase letters, digits and _ (at most 63)")
    if _RESERVED.match(schema):
        raise SelectionError(f"schema name {schema!r} is reserved")


def point(at: str, partitions: int) -> tuple[str | None, tuple[StreamKey, ...]]:
    """`--at` as (epoch or None, last included key per partition): a position token, a cursor or a time.

    Raises:
        SelectionError: it is none of them.
    """
    try:
        bound = parse_bound(at, partitions)
        return bound.epoch, bound.keys
    except SelectionError as exc:
        position_error = exc
    try:
        ms = parse_time(at)
    except SelectionError:
        raise SelectionError(f"--at: {position_error}, nor an ISO 8601 time") from None
    return None, ((ms, MAX_SEQ),) * partitions


async def take(settings: ProjectorSettings, at: str, schema: str) -> SnapshotReport:
    """Build schema `schema` holding the read models as they were at `at` (that point included).

    Raises:
        SelectionError: bad name or point, the schema exists, or the point is from another epoch.
        replay.HistoryUnavailable: a server cannot be reached.
    """
    started = time.perf_counter()
    check_name(schema)
    partitions = settings.log.partitions
    epoch, keys = point(at, partitions)
    selection = Selection(
        partitions=tuple(range(partitions)), after=((0, 0),) * partitions, until=keys, epoch=epoch
    )
    source = replay.Source(settings.log, settings.database_url)
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as admin:
        cur = await admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cur.fetchone() is not None:
            raise SelectionError(f"schema {schema} exists: drop it first (--drop {schema})")
        await migrate(admin)
        await migrate(admin, schema)
        worker = Worker(dataclasses.replace(settings, worker_id=f"snapshot-{schema}"), use_leases=False,
                        store=Store(schema, archive=False), observe=False)  # fmt: skip
        done = False
        try:
            await worker.pool.open(wait=True)
            async with replay.open_reader(source, selection) as reader:
                worker.epoch = reader.epoch
                async with worker.pool.connection() as conn:
                    await worker.store.ensure_checkpoints(conn, range(partitions))
                events = 0
                for p in range(partitions):
                    events += await _fold(PartitionProjector(worker, p), reader, p)
            comment = f"{MARK}{at} (taken {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})"
            await admin.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(schema), comment))
            done = True
        finally:
            await worker.close()
            if not done:
                await admin.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
    return SnapshotReport(schema, at, events, time.perf_counter() - started)


async def _fold(pr: PartitionProjector, reader: HistoryReader, partition: int) -> int:
    await pr.load()
    done = 0
    async for rows in reader.partition_pages(partition):
        done += await pr.apply([LogEntry(r[2], r[3], r[4]) for r in rows])
    return done


async def snapshots(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
    """Every snapshot schema with its description, by name."""
    cur = await conn.execute(
        "SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
        "WHERE obj_description(oid, 'pg_namespace') LIKE %s ORDER BY nspname",
        (MARK + "%",),
    )
    return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]


async def drop(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """Drop snapshot `schema`. Raises SelectionError when it is not a snapshot."""
    if schema not in dict(await snapshots(conn)):
        raise SelectionError(f"{schema} is not a snapshot (see --list)")
    await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
