"""History after a cursor: from the Postgres archive for what the streams trimmed, then from the streams.

Which of them serves what is the pure rule of `trimrule.py`; an archive that is behind is waited for
`archive_wait_s` (the projector may catch up), then HistoryGone is raised. Trimmers must only trim what is
archived (XTRIM MINID <= archive head). Page reads are shared across callers (`pageflights`): in flight
and for a short linger after.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

from events.log import EventLog
from realtime_fanout.archive import Archive
from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.exceptions import HistoryGone
from realtime_fanout.item import IndexedItems, Item, decode_entry
from realtime_fanout.metrics import HISTORY_COALESCED, HISTORY_READS
from realtime_fanout.pageflights import Page, PageFlights
from realtime_fanout.recent import RecentItems
from realtime_fanout.trimrule import Served, history_plan, stream_holds

_NO_LIVE: StreamKey = (1 << 64, 0)  # later than any stream id: only a fresh read serves a partial page


class History:
    """Pages of decoded items after a stream id, archive first when needed, coalesced across callers."""

    def __init__(
        self,
        log: EventLog,
        page: int = 500,
        archive: Archive | None = None,
        archive_wait_s: float = 2.0,
        flights: PageFlights[int] | None = None,
        recent: RecentItems | None = None,
    ) -> None:
        self.log = log
        self.page = page
        self.archive = archive
        self.archive_wait_s = archive_wait_s
        self.flights: PageFlights[int] = flights or PageFlights()
        self._infos: dict[int, asyncio.Future[Any]] = {}
        self.recent = recent

    @property
    def reads(self) -> int:
        return self.flights.reads

    async def check_held(self, epoch: str, partition: int, after_id: str) -> None:
        """Raise HistoryGone unless the archive and the stream together hold every entry after `after_id`."""
        await self.archive_until(epoch, partition, after_id)

    async def archive_until(self, epoch: str, partition: int, after_id: str) -> str | None:
        """None when the stream holds every entry after `after_id`; else the stream id up to which
        (inclusive) the archive must serve first (`trimrule.history_plan`). Raises HistoryGone when neither
        can serve, after waiting up to `archive_wait_s` for the archive to catch up."""
        after = stream_key(after_id)
        if self.recent is not None and self.recent.covers(partition, after):
            return None  # the hub read every entry after it since it started: nothing was trimmed before
        info = await self.stream_info(partition)
        if stream_holds(info, after):
            return None  # the archive is not asked: the common case costs one XINFO
        deadline = time.monotonic() + self.archive_wait_s
        while True:
            head = None if self.archive is None else await self.archive.head(epoch, partition)
            plan = history_plan(info, head, after)
            if isinstance(plan, Served):
                return plan.archive_until
            if self.archive is None or not plan.may_catch_up or time.monotonic() >= deadline:
                raise HistoryGone(
                    f"partition {partition} no longer holds entries after {after_id}: {plan.reason}"
                )
            await asyncio.sleep(0.1)

    async def stream_info(self, partition: int) -> Any:
        """`XINFO STREAM` of `partition` (None: no such stream). One call in flight per partition serves
        every caller that asks while it runs (a storm's resumes ask 2 per partition each); an answer is
        never kept after it arrived, so it is no older than a call of the caller's own would be, give or
        take that one round trip."""
        flight = self._infos.get(partition)
        if flight is None:
            flight = asyncio.ensure_future(self._xinfo(partition))
            self._infos[partition] = flight
            flight.add_done_callback(functools.partial(self._landed, partition))
        return await asyncio.shield(flight)

    def _landed(self, partition: int, flight: asyncio.Future[Any]) -> None:
        if self._infos.get(partition) is flight:
            del self._infos[partition]
        if not flight.cancelled():
            flight.exception()  # retrieved: every waiter re-raises it; none left is no warning

    async def _xinfo(self, partition: int) -> Any:
        return await self.log.info(partition)

    async def pages(
        self, epoch: str, partition: int, after_id: str, live_from: str | None = None
    ) -> AsyncIterator[list[Item]]:
        """Items of `partition` after `after_id` up to the current end, one page at a time; a page may start
        earlier (a shared read), so callers drop what they already have. `live_from` is where the caller's
        live feed starts (None: no live feed, every partial page is read afresh).

        Raises:
            HistoryGone: entries after `after_id` were trimmed and the archive does not hold them.
        """
        held = None if self.recent is None else self.recent.after(partition, stream_key(after_id))
        if held is not None:  # the hub's recent items: no read at all
            HISTORY_COALESCED.labels("memory").inc(len(held))
            for block in held:
                yield block
            return
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
        items = IndexedItems(i for i in map(decode_entry, entries) if i is not None)
        last_id = entries[-1].stream_id if entries else None
        last = stream_key(last_id) if last_id is not None else None
        return Page(items, stream_key(after_id), last_id, last, len(entries) >= self.page)
