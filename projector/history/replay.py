"""Replay a selection of the log into a sink: connect, check the epoch, read pages, follow the head.

Pages hold the rows as stored; each sink renders them in the current schema (`events.codec.current_bytes`,
or `columns.rows_batch` for tables), so a replay is upcast and, for a bounded selection, byte-identical
however often it runs and whatever was trimmed.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import redis.exceptions

from events.exceptions import LogError
from events.log import EventLog
from events.position import parse_stream_id
from events.redisclient import redis_client
from projector.exceptions import SelectionError
from projector.history.reader import HistoryReader, Row
from projector.history.selection import Selection, StreamKey, check_epoch, key_text
from projector.history.sinks import Page
from servicekit.log_settings import LogSettings

T = TypeVar("T")
COUNT_SQL_LIMIT = 5_000_000  # past this a progress bar's total is not worth a full count


class HistoryUnavailable(SelectionError):
    """Raised when Redis or Postgres cannot be reached or the log does not exist."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where the history lives: the log's Redis (for its epoch and the unarchived tail) and Postgres."""

    log: LogSettings
    database_url: str


def _connect_blocking(database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url, autocommit=True)


@asynccontextmanager
async def open_reader(
    source: Source, selection: Selection, page: int = 10_000
) -> AsyncIterator[HistoryReader]:
    """A reader of `selection` in the log's current epoch.

    Raises:
        HistoryUnavailable: a server cannot be reached or the log does not exist.
        SelectionError: the selection's positions are from another epoch.
    """
    client = redis_client(source.log.redis_url, None, cluster=source.log.redis_cluster)
    try:
        log = EventLog(client, source.log.layout(), replica_reads=source.log.read_replicas)
        try:
            epoch = await log.open(create=False)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise HistoryUnavailable(f"cannot read the log at {source.log.redis_url}: {exc}") from None
        except LogError as exc:
            raise HistoryUnavailable(f"no log to replay: {exc}") from None
        check_epoch(selection, epoch)
        try:
            conn = await psycopg.AsyncConnection.connect(source.database_url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise HistoryUnavailable(f"cannot reach the archive's Postgres: {exc}") from None
        async with conn:
            try:
                archive = await asyncio.to_thread(_connect_blocking, source.database_url)
            except psycopg.OperationalError as exc:
                raise HistoryUnavailable(f"cannot reach the archive's Postgres: {exc}") from None
            try:
                yield HistoryReader(conn, log, epoch, selection, page, archive)
            finally:
                await asyncio.to_thread(archive.close)
    finally:
        await client.aclose()


async def count(reader: HistoryReader) -> int | None:
    """How many archived events the selection holds (None when over COUNT_SQL_LIMIT): a progress total."""
    total = 0
    sel = reader.selection
    for p in sel.partitions:
        until = sel.until[p] or await reader.head(p)
        cur = await reader.conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM parley_store.event_archive WHERE epoch = %s "
            "AND partition = %s AND (stream_ms, stream_seq) > (%s, %s) "
            "AND (stream_ms, stream_seq) <= (%s, %s) LIMIT %s) x",
            (reader.epoch, p, *sel.after[p], *until, COUNT_SQL_LIMIT),
        )
        row = await cur.fetchone()
        total += int(row[0]) if row else 0
        if total >= COUNT_SQL_LIMIT:
            return None
    return total


async def pages(reader: HistoryReader, *, follow: bool = False, block_ms: int = 1000) -> AsyncIterator[Page]:
    """Pages of the selection; with `follow`, then every new event as it is appended, forever."""
    sel = reader.selection
    if not follow:
        async for rows in reader.pages():
            yield Page(reader.epoch, rows)
        return
    heads = {p: await reader.head(p) for p in sel.partitions}
    async for rows in reader.pages(heads):
        yield Page(reader.epoch, rows)
    async for rows in _tail(reader, heads, block_ms):
        yield Page(reader.epoch, rows)


async def _tail(
    reader: HistoryReader, after: dict[int, StreamKey], block_ms: int
) -> AsyncIterator[list[Row]]:
    """New entries after `after`, read as they arrive (order across partitions: arrival)."""
    while True:
        entries = await reader.log.read_many(
            {p: key_text(k) for p, k in after.items()}, reader.page, block_ms
        )
        if not entries:
            continue
        for p in {e.partition for e in entries}:
            first = await reader.log.first_id(p)
            if first is not None and parse_stream_id(first) > after[p]:
                # Trimmed while we were away (a long pause): the archive holds what the stream lost.
                head = await reader.head(p)
                async for rows in reader.partition_pages(p, after=after[p], until=head):
                    yield rows
                after[p] = head
        fresh = [e for e in entries if parse_stream_id(e.stream_id) > after[e.partition]]
        rows = sorted(r for r in (reader.keep(e.partition, e.stream_id, e.data) for e in fresh) if r)
        for e in entries:
            after[e.partition] = max(after[e.partition], parse_stream_id(e.stream_id))
        if rows:
            yield rows


def iterate(pages_of: Callable[[], AsyncIterator[T]], buffered: int = 4) -> Iterator[T]:
    """Items of an async iterator, for synchronous callers (also where a loop already runs, as in Jupyter):
    a thread runs it on its own loop, at most `buffered` items ahead of the caller."""
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=buffered)
    stopped = threading.Event()

    async def drain() -> None:
        async for item in pages_of():
            while not stopped.is_set():
                try:
                    handoff.put(("item", item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stopped.is_set():
                return

    def target() -> None:
        try:
            asyncio.run(drain())
            handoff.put(("done", None))
        except BaseException as exc:  # handed to the caller's thread, raised there
            handoff.put(("error", exc))

    thread = threading.Thread(target=target, name="parley-history", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stopped.set()
        while thread.is_alive():
            try:
                handoff.get_nowait()
            except queue.Empty:
                thread.join(0.05)
