"""The audit's I/O: gather one consistent `AuditInput` from a live deployment's Redis and Postgres.

Redis is read first (idempotency records, then each stream), Postgres after, in one REPEATABLE READ
snapshot: whatever the streams lost to trimming meanwhile was archived before, so the snapshot holds it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import redis.exceptions

from events.exceptions import LogError
from events.log import EventLog, LogEntry
from events.redisclient import RedisClient, redis_client
from projector.audit import AuditInput, IdempotencyRecord, PartitionInput, Window, choose_sample
from projector.audit import parse_idempotency_record as parse_record
from projector.exceptions import AuditRequestError, AuditUnreachable
from projector.settings import ProjectorSettings
from projector.snapshot import read_tables

PAGE = 10_000


def read_received(path: Path) -> list[dict[str, Any]]:
    """The JSONL a recording client wrote (README "Audit"); AuditRequestError when unreadable."""
    try:
        lines = [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]
    except (OSError, msgspec.DecodeError) as exc:
        raise AuditRequestError(f"cannot read {path}: {exc}") from None
    for i, line in enumerate(lines, 1):
        if not isinstance(line, dict) or "subscriber" not in line or "user" not in line:
            raise AuditRequestError(f"{path} line {i}: not a received-record line")
    return lines


async def _idempotency(redis: RedisClient, log: EventLog) -> list[IdempotencyRecord]:
    records: list[IdempotencyRecord] = []
    for p in range(log.layout.partitions):
        prefix = log.layout.idempotency_key(p, "", "")[:-1]  # `{ns}:{pN}:idem:`
        keys = [k async for k in redis.scan_iter(match=re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*",
                                                  count=1000)]  # fmt: skip
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            for key, value in zip(chunk, await redis.mget(chunk), strict=True):
                if value is None:  # expired meanwhile
                    continue
                name = key.decode() if isinstance(key, bytes) else str(key)
                user, _, idem = name[len(prefix) :].partition(":")
                raw = value if isinstance(value, bytes) else value.encode()
                try:
                    records.append(parse_record(p, user, idem, raw))
                except ValueError as exc:
                    raise AuditUnreachable(f"idempotency record {key!r} is not readable: {exc}") from None
    return records


async def _stream(log: EventLog, p: int) -> tuple[list[LogEntry], int | None, str]:
    info: Any = await log.info(p)
    if info is None:  # no stream yet
        return [], 0 if _has_entries_added(await log.redis.info("server")) else None, "0-0"
    added = info.get("entries-added")
    last = info.get("last-generated-id", b"0-0")
    last = last.decode() if isinstance(last, bytes) else str(last)
    entries: list[LogEntry] = []
    start = "-"
    while True:
        page = await log.read_range(p, start, "+", PAGE)
        entries += page
        if len(page) < PAGE:
            break
        start = f"({page[-1].stream_id}"
    return entries, None if added is None else int(added), last


def _has_entries_added(info: Any) -> bool:
    return int(str(info.get("redis_version", "0")).split(".")[0]) >= 7


async def gather(
    settings: ProjectorSettings,
    *,
    sample: int | None = None,
    seed: int = 0,
    window: Window | None = None,
    received: Path | None = None,
) -> AuditInput:
    """Read everything the checks need. Raises AuditUnreachable when Redis, Postgres or the log is missing."""
    lines = None if received is None else read_received(received)
    client = redis_client(settings.log.redis_url, 30, cluster=settings.log.redis_cluster)
    try:
        log = EventLog(client, settings.log.layout())
        epoch = await log.open(create=False)
        idem = await _idempotency(client, log)
        streams = [await _stream(log, p) for p in range(log.layout.partitions)]
    except (
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError,
        redis.exceptions.TryAgainError, LogError,
    ) as exc:  # fmt: skip
        raise AuditUnreachable(f"Redis at {settings.log.redis_url}: {exc}") from None
    finally:
        await client.aclose()
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=5) as conn:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
            async with conn.transaction():
                audit = await _from_postgres(conn, epoch, log, streams, idem)
                audit.window = window or Window()
                audit.received = lines
                if sample is not None:
                    audit.sample = choose_sample(audit, sample, seed)
                audit.tables = await read_tables(conn, "parley", audit.sample)
    except psycopg.OperationalError as exc:
        raise AuditUnreachable(f"Postgres: {exc}") from None
    return audit


async def _from_postgres(
    conn: psycopg.AsyncConnection[Any],
    epoch: str,
    log: EventLog,
    streams: list[tuple[list[LogEntry], int | None, str]],
    idem: list[IdempotencyRecord],
) -> AuditInput:
    cur = await conn.execute("SELECT partition, epoch, stream_id, events_applied FROM parley.checkpoints")
    checkpoints = {int(r[0]): r for r in await cur.fetchall()}
    parts = []
    for p, (stream, added, last) in enumerate(streams):
        cur = await conn.execute(
            "SELECT stream_id, data FROM parley_store.event_archive WHERE epoch = %s AND partition = %s "
            "ORDER BY stream_ms, stream_seq",
            (epoch, p),
        )
        archive = [LogEntry(p, str(r[0]), bytes(r[1])) for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT stream_id, data FROM parley_store.dead_letters WHERE epoch = %s AND partition = %s",
            (epoch, p),
        )
        dead = {str(r[0]): bytes(r[1]) for r in await cur.fetchall()}
        _, cp_epoch, cp_id, applied = checkpoints.get(p, (p, None, "0-0", 0))
        checkpoint = str(cp_id)
        part = PartitionInput(p, stream, archive, dead, checkpoint, cp_epoch, int(applied), added, last)
        parts.append(part)
    cur = await conn.execute(
        "SELECT count(*) FROM parley_store.dead_letters WHERE epoch = %s AND redriven_at IS NOT NULL",
        (epoch,),
    )
    row = await cur.fetchone()
    return AuditInput(epoch, log.layout, parts, {}, idem, redriven=int(row[0]) if row else 0)


def parse_window(since: str | None, until: str | None) -> Window:
    """`--since`/`--until` as unix milliseconds or ISO 8601 times; AuditRequestError otherwise."""
    return Window(_ms(since), _ms(until))


def _ms(text: str | None) -> int | None:
    from datetime import datetime

    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise AuditRequestError(f"not a time (unix ms or ISO 8601): {text!r}") from None
    if at.tzinfo is None:
        raise AuditRequestError(f"give the time zone of {text!r} (e.g. +00:00)")
    return int(at.timestamp() * 1000)
