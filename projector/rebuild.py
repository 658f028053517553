"""`python -m projector rebuild`: fresh read models built beside the live ones, then swapped in atomically.

Contract: the live schema `parley` keeps serving and updating until one transaction renames it away and
the rebuilt schema in (queries see one or the other, never a half-built model); then the old one is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from events.codec import decode
from events.exceptions import DecodeError
from events.log import LogEntry
from events.position import parse_stream_id
from projector.batch import archive_row
from projector.exceptions import LogGap, RebuildError
from projector.migrate import LIVE_SCHEMA, migrate
from projector.settings import ProjectorSettings
from projector.store import Store
from projector.worker import PartitionProjector, Worker

log = logging.getLogger(__name__)

REBUILD_LOCK_KEY = 0x7061726C657901  # one rebuild at a time (session advisory lock)
_LEFTOVER = r"^parley_(rebuild|old)_[0-9]+$"
_ARCHIVE_INSERT = (
    "INSERT INTO parley_store.event_archive (epoch, partition, stream_id, stream_ms, stream_seq, event_id, "
    "conversation_id, seq, type, actor, occurred_at, data) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)


@dataclass(slots=True)
class RebuildReport:
    """What a rebuild did: entries folded from the archive and from the streams, lock time, total time."""

    schema: str = ""
    from_archive: int = 0
    from_log: int = 0
    archived_at_swap: int = 0
    swap_ms: float = 0.0
    archive_s: float = 0.0
    index_s: float = 0.0
    seconds: float = 0.0


def _after(a: str, b: str) -> bool:
    return parse_stream_id(a) > parse_stream_id(b)


async def rebuild(settings: ProjectorSettings) -> RebuildReport:
    """Build `parley_rebuild_<n>` from the archive then the log, swap it in as `parley`, drop the old one.

    Raises RebuildError when another rebuild holds the lock, LogGap when the log lost unarchived entries.
    """
    started = time.perf_counter()
    report = RebuildReport()
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as admin:
        cur = await admin.execute("SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK_KEY,))
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise RebuildError("another rebuild is running (advisory lock held)")
        await migrate(admin)
        await _drop_leftovers(admin)
        n = int(time.time() * 1000)
        report.schema = name = f"parley_rebuild_{n}"
        await migrate(admin, name)
        indexes = await _drop_secondary_indexes(admin, name)
        worker = Worker(dataclasses.replace(settings, worker_id=f"rebuild-{n}"), use_leases=False,
                        store=Store(name, archive=False), observe=False)  # fmt: skip
        swapped = False
        try:
            await worker.pool.open(wait=True)
            worker.epoch = await worker.log.open(create=False)
            partitions = range(worker.layout.partitions)
            async with worker.pool.connection() as conn:
                await worker.store.ensure_checkpoints(conn, partitions)
                await Store().ensure_checkpoints(conn, partitions)
            projectors = {p: PartitionProjector(worker, p) for p in partitions}
            phase = time.perf_counter()
            async with worker.paced_gc():
                report.from_archive = await _archive_phase(settings, name, projectors)
            report.archive_s = time.perf_counter() - phase
            report.from_log += sum(await asyncio.gather(*(_from_log(pr) for pr in projectors.values())))
            phase = time.perf_counter()
            for text in indexes:
                await admin.execute(text.encode())
            report.index_s = time.perf_counter() - phase
            report.from_log += sum(await asyncio.gather(*(_from_log(pr) for pr in projectors.values())))
            await _swap(admin, worker, projectors, report, n)
            swapped = True
        finally:
            await worker.close()
            if not swapped:  # the live schema is untouched; do not leave the half-built one behind
                try:
                    drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                    await admin.execute(drop)
                except psycopg.Error as exc:
                    log.warning("could not drop %s (the next rebuild will): %s", name, exc)
            await admin.execute("SELECT pg_advisory_unlock(%s)", (REBUILD_LOCK_KEY,))
    report.seconds = time.perf_counter() - started
    log.info("rebuild done: %s", report)
    return report


async def _drop_leftovers(admin: psycopg.AsyncConnection[Any]) -> None:
    """Drop schemas a crashed rebuild left behind (safe: we hold the rebuild lock)."""
    cur = await admin.execute("SELECT nspname FROM pg_namespace WHERE nspname ~ %s", (_LEFTOVER,))
    for (schema,) in await cur.fetchall():
        log.warning("dropping schema %s left by an earlier rebuild", schema)
        await admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def _drop_secondary_indexes(admin: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    """Drop the indexes no constraint needs (bulk load is faster without them); return how to recreate."""
    cur = await admin.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_namespace n ON n.oid = i.relnamespace LEFT JOIN pg_constraint c ON c.conindid = i.oid "
        "WHERE n.nspname = %s AND c.oid IS NULL",
        (schema,),
    )
    found = await cur.fetchall()
    for index, _definition in found:
        await admin.execute(sql.SQL("DROP INDEX {}.{}").format(sql.Identifier(schema), sql.Identifier(index)))
    return [str(definition) for _index, definition in found]


async def _archive_phase(
    settings: ProjectorSettings, schema: str, projectors: dict[int, PartitionProjector]
) -> int:
    """Fold every partition's archive into `schema`: in this process, or split over child processes
    (`rebuild_processes`), since folding is CPU-bound and one process uses one core."""
    processes = min(settings.rebuild_processes, len(projectors))
    if processes <= 1:
        return sum(await asyncio.gather(*(_from_archive(pr) for pr in projectors.values())))
    groups = [list(projectors)[i::processes] for i in range(processes)]
    env = {**os.environ, **settings.child_env()}
    command = [sys.executable, "-m", "projector", "rebuild-archive", "--schema", schema, "--partitions"]
    children = [
        await asyncio.create_subprocess_exec(*command, ",".join(map(str, group)), env=env) for group in groups
    ]
    codes = await asyncio.gather(*(child.wait() for child in children))
    if any(codes):
        raise RebuildError(f"an archive fold process failed (exit codes {codes})")
    before = 0
    for pr in projectors.values():
        await pr.load()
        before += pr.applied
    return before


async def fold_archive_into(settings: ProjectorSettings, schema: str, partitions: list[int]) -> int:
    """The child side of `_archive_phase`: fold `partitions`' archives into `schema`; returns how many."""
    worker = Worker(settings, use_leases=False, store=Store(schema, archive=False), observe=False)
    try:
        await worker.pool.open(wait=True)
        worker.epoch = await worker.log.open(create=False)
        projectors = [PartitionProjector(worker, p) for p in partitions]
        async with worker.paced_gc():
            return sum(await asyncio.gather(*(_from_archive(pr) for pr in projectors)))
    finally:
        await worker.close()


async def _from_archive(pr: PartitionProjector) -> int:
    """Fold the partition's archived events of this epoch, in log order; returns how many."""
    w = pr.worker
    await pr.load()
    done = 0
    while True:
        ms, seq = parse_stream_id(pr.position)
        async with w.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT stream_id, data FROM parley_store.event_archive WHERE epoch = %s AND partition = %s "
                "AND (stream_ms, stream_seq) > (%s, %s) ORDER BY stream_ms, stream_seq LIMIT %s",
                (w.epoch, pr.partition, ms, seq, w.settings.batch),
            )
            rows = await cur.fetchall()
        if not rows:
            return done
        done += await pr.apply([LogEntry(pr.partition, r[0], bytes(r[1])) for r in rows])


async def _from_log(pr: PartitionProjector, until: str | None = None) -> int:
    """Fold stream entries after the partition's position until a short read (or past `until`)."""
    w = pr.worker
    first = await w.log.first_id(pr.partition)
    if first is not None and pr.position != "0-0" and _after(first, pr.position):
        raise LogGap(pr.partition, pr.position, first)
    done = 0
    while True:
        entries = await w.log.read_after(pr.partition, pr.position, w.settings.batch)
        if entries:
            done += await pr.apply(entries)
        if until is not None:
            if not entries or not _after(until, pr.position):
                return done
        elif len(entries) < w.settings.batch:
            return done


async def _swap(
    admin: psycopg.AsyncConnection[Any],
    worker: Worker,
    projectors: dict[int, PartitionProjector],
    report: RebuildReport,
    n: int,
) -> None:
    """Pause live writers (checkpoint rows FOR UPDATE), finish the catch-up, rename both schemas at once."""
    new, old = sql.Identifier(report.schema), sql.Identifier(f"parley_old_{n}")
    live = sql.Identifier(LIVE_SCHEMA)
    async with admin.transaction():
        locked_at = time.perf_counter()
        cur = await admin.execute(
            sql.SQL(
                "SELECT partition, epoch, stream_id, events_applied, version FROM {}.checkpoints "
                "ORDER BY partition FOR UPDATE"
            ).format(live)
        )
        checkpoints = {int(r[0]): r for r in await cur.fetchall()}
        # Workers blocked on these rows will see a new version and reload from the swapped-in schema.
        await admin.execute(sql.SQL("UPDATE {}.checkpoints SET version = version + 1").format(live))
        heads = {p: await worker.log.head(p) for p in projectors}
        counts = await asyncio.gather(*(_from_log(pr, heads[p]) for p, pr in projectors.items()))
        report.from_log += sum(counts)
        for p, pr in projectors.items():
            _, epoch, stream_id, applied, version = checkpoints[p]
            if epoch != worker.epoch:  # the live model follows another epoch (or none): none of it counts
                stream_id, applied = "0-0", 0
            # Entries the live workers have not reached: nobody archived them yet.
            entries = (
                await worker.log.read_range(p, f"({stream_id}", pr.position)
                if _after(pr.position, stream_id)
                else []
            )
            rows = []
            for entry in entries:
                try:
                    rows.append(archive_row(worker.epoch or "", entry, decode(entry.data)))
                except DecodeError:
                    continue
            async with admin.cursor() as acur:
                await acur.executemany(_ARCHIVE_INSERT, rows)
            report.archived_at_swap += len(rows)
            await admin.execute(
                sql.SQL(
                    "UPDATE {}.checkpoints SET epoch = %s, events_applied = %s, "
                    "version = greatest(version, %s), updated_at = now() WHERE partition = %s"
                ).format(new),
                (worker.epoch, applied + len(entries), version + 2, p),
            )
        await admin.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(live, old))
        await admin.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(new, live))
        report.swap_ms = (time.perf_counter() - locked_at) * 1000
    log.info("rebuilt read models swapped in (writers paused %.1f ms); dropping the old ones", report.swap_ms)
    await admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(old))
