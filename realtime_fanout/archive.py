"""The Postgres event archive, written by the projector and read by the fanout through the view the
projector's migrations own (`parley_store.archived_events`), which marks the entries the fold refused.

Rows are the log's exact bytes per (epoch, partition, stream id), inserted in stream order per partition,
so the archive holds every entry of a partition up to its head: it serves history the streams trimmed.
Page reads are shared across connections (`pageflights`). Until the projector has created the table, the
archive reads as empty.
"""

from __future__ import annotations

from typing import Any

from psycopg import errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from events.log import LogEntry
from events.membership import MEMBERSHIP_TYPES, PRIVATE_TYPES
from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.item import IndexedItems, decode_entry
from realtime_fanout.metrics import HISTORY_COALESCED, HISTORY_READS
from realtime_fanout.pageflights import Page, PageFlights
from realtime_fanout.pooltimeout import forget_pool_wait

# A page counts refused entries too (`full` and `last_id` are about the archive's rows), so the next page
# starts after them; they carry no data.
_PAGE_SQL = """
SELECT stream_id, CASE WHEN refused THEN NULL ELSE data END FROM parley_store.archived_events
WHERE epoch = %s AND partition = %s AND (stream_ms, stream_seq) > (%s, %s)
  AND (stream_ms, stream_seq) <= (%s, %s)
ORDER BY stream_ms, stream_seq LIMIT %s
"""
_HEAD_SQL = """
SELECT stream_id FROM parley_store.archived_events WHERE epoch = %s AND partition = %s
ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1
"""
_MEMBERSHIP_SQL = """
SELECT stream_id, data FROM parley_store.archived_events
WHERE epoch = %s AND partition = %s AND (stream_ms, stream_seq) < (%s, %s) AND type = ANY(%s) AND NOT refused
ORDER BY stream_ms, stream_seq
"""
_ACTS_SQL = """
SELECT conversation_id, actor, max(seq) FROM parley_store.archived_events
WHERE epoch = %s AND partition = %s AND (stream_ms, stream_seq) < (%s, %s) AND type <> ALL(%s) AND NOT refused
GROUP BY conversation_id, actor
"""
_LAST_SEQS_SQL = """
SELECT conversation_id, max(seq) FROM parley_store.archived_events
WHERE epoch = %s AND partition = %s AND (stream_ms, stream_seq) < (%s, %s) AND NOT refused
GROUP BY conversation_id
"""


class Archive:
    """Pages of one log epoch's archived entries; `head` is the last archived stream id of a partition."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        page: int = 500,
        flights: PageFlights[tuple[str, int, str]] | None = None,
    ) -> None:
        self.pool = pool
        self.page = page
        self.flights: PageFlights[tuple[str, int, str]] = flights or PageFlights()

    @property
    def reads(self) -> int:
        return self.flights.reads

    async def _rows(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection() as conn:
                rows: list[tuple[Any, ...]] = await (await conn.execute(query, args)).fetchall()
                return rows
        except errors.UndefinedTable:  # the projector has not migrated yet: nothing is archived
            return []
        except PoolTimeout as exc:
            forget_pool_wait(exc)
            raise

    async def head(self, epoch: str, partition: int) -> StreamKey | None:
        """The key of the newest archived entry of `partition`, or None when nothing is archived."""
        rows = await self._rows(_HEAD_SQL, (epoch, partition))
        return stream_key(rows[0][0]) if rows else None

    async def read_page(self, epoch: str, partition: int, after_id: str, until_id: str) -> Page:
        """Up to `page` entries with `after_id < id <= until_id`, oldest first (a shared page may start
        earlier); a partial page holds everything up to `until_id`."""
        scope = (epoch, partition, until_id)
        page, shared = await self.flights.read(
            scope, stream_key(after_id), None, lambda: self._read(epoch, partition, after_id, until_id)
        )
        (HISTORY_COALESCED if shared else HISTORY_READS).labels("archive").inc()
        return page

    async def _read(self, epoch: str, partition: int, after_id: str, until_id: str) -> Page:
        after, until = stream_key(after_id), stream_key(until_id)
        args = (epoch, partition, *after, *until, self.page)
        rows = await self._rows(_PAGE_SQL, args)
        entries = [LogEntry(partition, sid, bytes(data)) for sid, data in rows if data is not None]
        items = IndexedItems(i for i in map(decode_entry, entries) if i is not None)
        last_id = rows[-1][0] if rows else None
        last = stream_key(last_id) if last_id is not None else None
        return Page(items, after, last_id, last, len(rows) >= self.page)

    async def membership_entries(self, epoch: str, partition: int, before: StreamKey) -> list[LogEntry]:
        """Archived membership events of `partition` older than `before`, oldest first (hub bootstrap)."""
        rows = await self._rows(_MEMBERSHIP_SQL, (epoch, partition, *before, list(MEMBERSHIP_TYPES)))
        return [LogEntry(partition, sid, bytes(data)) for sid, data in rows]

    async def last_seqs(self, epoch: str, partition: int, before: StreamKey) -> list[tuple[str, int]]:
        """Per conversation, the seq of its last event archived before `before` (hub bootstrap)."""
        rows = await self._rows(_LAST_SEQS_SQL, (epoch, partition, *before))
        return [(cid, int(seq)) for cid, seq in rows]

    async def acts(self, epoch: str, partition: int, before: StreamKey) -> list[tuple[str, str, int]]:
        """Per (conversation, actor), the seq of the actor's latest engaging act archived before `before`."""
        rows = await self._rows(_ACTS_SQL, (epoch, partition, *before, list(PRIVATE_TYPES)))
        return [(cid, actor, int(seq)) for cid, actor, seq in rows]
