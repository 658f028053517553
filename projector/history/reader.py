"""Reads a selection of the log: the archive first, then the streams beyond it, with no gap and no repeat.

Per partition, entries come in stream order: archive pages up to the archive's head, then stream pages.
The archive holds every entry of a partition up to its head and trimmers only remove what it holds, so
when the stream's oldest entry is past our position the reader goes back to the archive, which must then
have moved on (a stream trimmed by hand past the archive is the projector's `LogGap`, reported there).
Across partitions, pages are merged by log time (stream id), then partition: a bounded selection always
comes out in the same order, byte for byte, whether its entries were still in Redis or only archived.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Mapping
from typing import Any

import psycopg

from events.codec import decode
from events.exceptions import DecodeError
from events.log import EventLog
from events.position import parse_stream_id
from projector.history.selection import Selection, StreamKey, key_text

AsyncConn = psycopg.AsyncConnection[Any]
BlockingConn = psycopg.Connection[Any]
# (stream ms, stream seq, partition, stream id, log bytes): tuples sort in replay order.
Row = tuple[int, int, int, str, bytes]

_HEAD_SQL = (
    "SELECT stream_ms, stream_seq FROM parley_store.event_archive WHERE epoch = %s AND partition = %s "
    "ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1"
)


def _page_sql(selection: Selection) -> str:
    where = [
        "epoch = %(epoch)s AND partition = %(partition)s",
        "(stream_ms, stream_seq) > (%(after_ms)s, %(after_seq)s)",
        "(stream_ms, stream_seq) <= (%(until_ms)s, %(until_seq)s)",
    ]
    if selection.conversations:
        where.append("conversation_id = ANY(%(conversations)s)")
    if selection.types:
        where.append("type = ANY(%(types)s)")
    if selection.actors:
        where.append("actor = ANY(%(actors)s)")
    return (
        "SELECT stream_ms, stream_seq, partition, stream_id, data FROM parley_store.event_archive "
        f"WHERE {' AND '.join(where)} ORDER BY stream_ms, stream_seq LIMIT %(limit)s"
    )


class HistoryReader:
    """Pages of rows of one selection in one log epoch; `undecodable` counts stream entries left out.

    With `archive`, a blocking connection, archive pages are fetched on a worker thread, the next while the
    last is handed out: psycopg's blocking fetch waits in C and takes half the CPU of its asyncio one, which
    is most of a bulk replay's reading.
    """

    def __init__(
        self, conn: AsyncConn, log: EventLog, epoch: str, selection: Selection, page: int = 10_000,
        archive: BlockingConn | None = None,
    ) -> None:  # fmt: skip
        self.conn = conn
        self.archive = archive
        self.log = log
        self.epoch = epoch
        self.selection = selection
        self.page = page
        self.undecodable = 0
        self._page_sql = _page_sql(selection)
        self._filters = {
            "conversations": sorted(selection.conversations),
            "types": sorted(selection.types),
            "actors": sorted(selection.actors),
        }

    async def archive_head(self, partition: int) -> StreamKey | None:
        cur = await self.conn.execute(_HEAD_SQL, (self.epoch, partition))
        row = await cur.fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    async def head(self, partition: int) -> StreamKey:
        """The newest entry of `partition` in the stream or, if the stream is empty, in the archive."""
        stream = parse_stream_id(await self.log.head(partition))
        return max(stream, await self.archive_head(partition) or stream)

    async def _fetch(self, partition: int, after: StreamKey, until: StreamKey) -> list[Row]:
        params = {
            "epoch": self.epoch, "partition": partition, "after_ms": after[0], "after_seq": after[1],
            "until_ms": until[0], "until_seq": until[1], "limit": self.page, **self._filters,
        }  # fmt: skip
        if self.archive is not None:
            return await asyncio.to_thread(self._fetch_blocking, self.archive, params)
        cur = self.conn.cursor(binary=True)
        await cur.execute(self._page_sql, params)
        rows: list[Row] = await cur.fetchall()
        return rows

    def _fetch_blocking(self, archive: BlockingConn, params: dict[str, Any]) -> list[Row]:
        cur = archive.cursor(binary=True)
        cur.execute(self._page_sql, params)
        rows: list[Row] = cur.fetchall()
        return rows

    async def _archive_pages(
        self, partition: int, after: StreamKey, until: StreamKey
    ) -> AsyncIterator[list[Row]]:
        fetching: asyncio.Future[list[Row]] | None = None
        try:
            while after < until:
                rows = await (fetching or self._fetch(partition, after, until))
                fetching = None
                full = len(rows) == self.page
                if rows:
                    after = (rows[-1][0], rows[-1][1])
                if full and after < until and self.archive is not None:
                    fetching = asyncio.ensure_future(self._fetch(partition, after, until))
                if rows:
                    yield rows
                if not full:
                    return
        finally:
            if fetching is not None:  # the thread finishes with the connection before anyone closes it
                await asyncio.wait([fetching])
                if not fetching.cancelled():
                    fetching.exception()

    def keep(self, partition: int, stream_id: str, data: bytes) -> Row | None:
        try:
            event = decode(data)
        except DecodeError:
            self.undecodable += 1  # never archived either, so the output is the same after a trim
            return None
        if not self.selection.keeps(event.conversation_id, event.type, event.actor):
            return None
        ms, seq = parse_stream_id(stream_id)
        return (ms, seq, partition, stream_id, data)

    async def partition_pages(
        self, partition: int, *, after: StreamKey | None = None, until: StreamKey | None = None
    ) -> AsyncIterator[list[Row]]:
        """Every selected row of `partition` after `after` (default: the selection's start) up to `until`
        (default: the selection's end, else the log's head when the read starts), oldest first."""
        after = self.selection.after[partition] if after is None else after
        end = until if until is not None else self.selection.until[partition]
        if end is None:
            end = await self.head(partition)
        while after < end:
            head = await self.archive_head(partition)
            if head is not None and head > after:
                stop = min(head, end)
                async for rows in self._archive_pages(partition, after, stop):
                    yield rows
                after = stop
                continue
            entries = await self.log.read_range(partition, f"({key_text(after)}", key_text(end), self.page)
            first = await self.log.first_id(partition)
            if first is not None and parse_stream_id(first) > after:
                # Entries after us may have been archived and trimmed since the archive was read: only
                # archived entries are trimmed, so if the archive has not moved past us, none were.
                moved = await self.archive_head(partition)
                if moved is not None and moved > after:
                    continue
            rows = [r for r in (self.keep(partition, e.stream_id, e.data) for e in entries) if r is not None]
            if rows:
                yield rows
            if len(entries) < self.page:
                return
            after = parse_stream_id(entries[-1].stream_id)

    async def pages(self, until: Mapping[int, StreamKey] | None = None) -> AsyncIterator[list[Row]]:
        """Every selected row of every selected partition, merged by (log time, partition); `until`
        overrides the selection's end per partition."""
        partitions = self.selection.partitions
        ends = until or {}
        if len(partitions) == 1:
            async for rows in self.partition_pages(partitions[0], until=ends.get(partitions[0])):
                yield rows
            return
        iterators = {p: aiter(self.partition_pages(p, until=ends.get(p))) for p in partitions}
        buffers: dict[int, list[Row]] = {p: [] for p in partitions}
        while iterators or any(buffers.values()):
            for p in list(iterators):
                if not buffers[p]:
                    page = await anext(iterators[p], None)
                    if page is None:
                        del iterators[p]
                    else:
                        buffers[p] = page
            # Rows at or before the least "last buffered row" of a partition still reading are final.
            horizon = min((buffers[p][-1] for p in iterators), default=None)
            merged: list[Row] = []
            for p, rows in buffers.items():
                cut = len(rows) if horizon is None else bisect.bisect_right(rows, horizon)
                merged += rows[:cut]
                buffers[p] = rows[cut:]
            if merged:
                merged.sort()  # runs already sorted: a C merge
                yield merged
