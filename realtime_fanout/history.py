"""History after a cursor: from the Postgres archive for what the streams trimmed, then from the streams.

Rule (sound on Redis 6.2 and 7): a stream holds every entry after cursor C
when C is at or after its first entry (or, on an empty stream, its last-generated id). Otherwise entries in
(C, F) may be trimmed, F being that first/last id; the archive serves them when its head for the partition
is at or after F (it holds every entry up to its head), else we wait `archive_wait_s` for the projector,
then raise HistoryGone. On Redis 7, entries-added == length means nothing was ever removed; on Redis 6 a
cursor of "0-0" with nothing archived is assumed served.
Trimmers must only trim what is archived (XTRIM MINID <= archive head). Page reads are shared across callers
(`pageflights`): in flight and for a short linger after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions

from events.log import EventLog
from realtime_fanout.archive import Archive
from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.exceptions import HistoryGone
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.metrics import HISTORY_COALESCED, HISTORY_READS
from realtime_fanout.pageflights import Page, PageFlights

_NO_LIVE: StreamKey = (1 << 64, 0)  # later than any stream id: only a fresh read serves a partial page


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class History:
    """Pages of decoded items after a stream id, archive first when needed, coalesced across callers."""

    def __init__(
        self,
        log: EventLog,
        page: int = 500,
        archive: Archive | None = None,
        archive_wait_s: float = 2.0,
        flights: PageFlights[int] | None = None,
    ) -> None:
        self.log = log
        self.page = page
        self.archive = archive
        self.archive_wait_s = archive_wait_s
        self.flights: PageFlights[int] = flights or PageFlights()

    @property
    def reads(self) -> int:
        return self.flights.reads

    async def check_held(self, epoch: str, partition: int, after_id: str) -> None:
        """Raise HistoryGone unless the archive and the stream together hold every entry after `after_id`."""
        await self.archive_until(epoch, partition, after_id)

    async def archive_until(self, epoch: str, partition: int, after_id: str) -> str | None:
        """None when the stream holds every entry after `after_id`; else the stream id up to which
        (inclusive) the archive must serve first. Raises HistoryGone when neither can serve."""
        after = stream_key(after_id)
        try:
            info: Any = await self.log.redis.xinfo_stream(self.log.layout.stream_key(partition))
        except redis.exceptions.ResponseError:  # no such key: the partition has no stream (yet)
            if after != (0, 0):
                raise HistoryGone(f"partition {partition} has no stream, cursor at {after_id}") from None
            return None
        first = info.get("first-entry")
        bound = _text(first[0]) if first else _text(info.get("last-generated-id", "0-0"))
        # Redis 7 counts every entry ever added: equal to the length, nothing was ever trimmed or deleted.
        # (max-deleted-entry-id does not help: XTRIM leaves it at 0-0 on 7.0.)
        added = info.get("entries-added")
        if stream_key(bound) <= after or (added is not None and int(added) == int(info.get("length", -1))):
            return None
        deadline = time.monotonic() + self.archive_wait_s
        while True:
            head = None if self.archive is None else await self.archive.head(epoch, partition)
            if head is not None and head >= stream_key(bound):
                return bound
            if head is None and after == (0, 0) and added is None:
                return None  # Redis 6 cannot tell whether "0-0" lost anything: assumed served
            if self.archive is None or time.monotonic() >= deadline:
                raise HistoryGone(f"partition {partition} no longer holds entries after {after_id}")
            await asyncio.sleep(0.1)

    async def pages(
        self, epoch: str, partition: int, after_id: str, live_from: str | None = None
    ) -> AsyncIterator[list[Item]]:
        """Items of `partition` after `after_id` up to the current end, one page at a time; a page may start
        earlier (a shared read), so callers drop what they already have. `live_from` is where the caller's
        live feed starts (None: no live feed, every partial page is read afresh).

        Raises:
            HistoryGone: entries after `after_id` were trimmed and the archive does not hold them.
        """
        until = await self.archive_until(epoch, partition, after_id)
        if until is not None and self.archive is not None:
            while True:
                page = await self.archive.read_page(epoch, partition, after_id, until)
                if page.items:
                    yield page.items
                if not page.full or page.last_id is None:
                    break
                after_id = page.last_id
            after_id = until
        horizon = stream_key(live_from) if live_from is not None else _NO_LIVE
        while True:
            page = await self.read_page(partition, after_id, horizon)
            if page.items:
                yield page.items
            if not page.full or page.last_id is None:
                return
            after_id = page.last_id

    async def read_page(self, partition: int, after_id: str, horizon: StreamKey = (0, 0)) -> Page:
        """A stream page serving a read after `after_id` (see `Page.serves`), shared when one is at hand."""
        page, shared = await self.flights.read(
            partition, stream_key(after_id), horizon, lambda: self._read(partition, after_id)
        )
        (HISTORY_COALESCED if shared else HISTORY_READS).labels("redis").inc()
        return page

    async def _read(self, partition: int, after_id: str) -> Page:
        entries = await self.log.read_range(partition, f"({after_id}", "+", self.page)
        items = [i for i in map(decode_entry, entries) if i is not None]
        last_id = entries[-1].stream_id if entries else None
        last = stream_key(last_id) if last_id is not None else None
        return Page(items, stream_key(after_id), last_id, last, len(entries) >= self.page)
