"""History after a cursor, read from the Redis streams in pages; concurrent identical reads share one call.

A reconnect storm asks for the same pages many times: each (partition, after, page size) read is in
flight at most once per process, and every waiter gets the same decoded items.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions

from events.log import EventLog
from realtime_fanout.cursor import stream_key
from realtime_fanout.exceptions import HistoryGone
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.metrics import HISTORY_READS

PageKey = tuple[int, str, int]
Page = tuple[list[Item], str | None, int]  # decodable items, last stream id read, entries read


class History:
    """Pages of decoded items after a stream id, coalesced across callers."""

    def __init__(self, log: EventLog, page: int = 500) -> None:
        self.log = log
        self.page = page
        self._inflight: dict[PageKey, asyncio.Future[Page]] = {}
        self.reads = 0

    async def check_held(self, partition: int, after_id: str) -> None:
        """Raise HistoryGone when entries after `after_id` were trimmed from the stream.

        Uses XINFO's max-deleted-entry-id (Redis 7+); on older servers, a stream whose first held entry
        is after a cursor that named a real entry. A cursor of "0-0" on Redis 6 is assumed served.
        """
        after = stream_key(after_id)
        try:
            info: Any = await self.log.redis.xinfo_stream(self.log.layout.stream_key(partition))
        except redis.exceptions.ResponseError:  # no such key: the partition has no stream (yet)
            if after != (0, 0):
                raise HistoryGone(
                    f"partition {partition} has no stream, the cursor names {after_id}"
                ) from None
            return
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None:
            text = deleted.decode() if isinstance(deleted, bytes) else str(deleted)
            if stream_key(text) > after:
                raise HistoryGone(f"partition {partition} was trimmed past {after_id}")
            return
        first = await self.log.first_id(partition)
        if first is not None and after != (0, 0) and stream_key(first) > after:
            raise HistoryGone(f"partition {partition} no longer holds entries after {after_id}")

    async def pages(self, partition: int, after_id: str) -> AsyncIterator[list[Item]]:
        """Items of `partition` after `after_id` up to the current end, one page at a time."""
        while True:
            items, last_id, count = await self.read_page(partition, after_id)
            if items:
                yield items
            if count < self.page or last_id is None:
                return
            after_id = last_id

    async def read_page(self, partition: int, after_id: str) -> Page:
        """One page after `after_id`; a caller asking for a page already in flight shares its result."""
        key = (partition, after_id, self.page)
        shared = self._inflight.get(key)
        if shared is not None:
            HISTORY_READS.labels("true").inc()
            return await asyncio.shield(shared)
        future: asyncio.Future[Page] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        HISTORY_READS.labels("false").inc()
        self.reads += 1
        try:
            entries = await self.log.read_range(partition, f"({after_id}", "+", self.page)
            page: Page = (
                [i for i in map(decode_entry, entries) if i is not None],
                entries[-1].stream_id if entries else None,
                len(entries),
            )
            future.set_result(page)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]
        return page
