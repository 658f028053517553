"""Shared history page reads: a read in flight, or done less than `linger_s` ago, serves every caller it
covers, so a reconnect storm (many resumes from the same or nearby cursors) reads each page once.

A page starting at or before a caller's position serves it, earlier items included: sessions drop what
is at or before their cursor. A partial page (the read reached the end) only serves a caller whose live
feed starts at or before the page's end, since entries appended after the read arrive live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from realtime_fanout.cursor import StreamKey
from realtime_fanout.item import Item

S = TypeVar("S", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Page:
    """Entries of one partition after `after` (exclusive), oldest first; `full`: the read hit its limit."""

    items: list[Item]
    after: StreamKey
    last_id: str | None
    last: StreamKey | None
    full: bool

    @property
    def end(self) -> StreamKey:
        """The last key this read covered (its last entry, else its start)."""
        return self.last if self.last is not None else self.after

    def serves(self, after: StreamKey, horizon: StreamKey | None) -> bool:
        """True when this page is a valid next page after `after` for a caller whose live feed covers
        everything after `horizon` (None: the range was bounded, so a partial page is complete)."""
        if self.after > after:
            return False
        if self.full:
            return after < self.end  # it holds at least one entry after `after`
        return horizon is None or horizon <= self.end


@dataclass(slots=True)
class _Flight:
    after: StreamKey
    future: asyncio.Future[Page]
    done_at: float | None = None


class PageFlights(Generic[S]):
    """Page reads per scope (e.g. partition), shared while in flight and for `linger_s` after."""

    def __init__(
        self, linger_s: float = 2.0, max_pages: int = 64, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.linger_s = linger_s
        self.max_pages = max(0, max_pages)
        self.clock = clock
        self.reads = 0
        self.shared = 0
        self._flights: dict[S, list[_Flight]] = {}

    async def read(
        self, scope: S, after: StreamKey, horizon: StreamKey | None, make: Callable[[], Awaitable[Page]]
    ) -> tuple[Page, bool]:
        """A page serving `after` (see `Page.serves`), and whether it was shared (True) or read by this call.

        Failures of a shared read propagate to every caller that joined it.
        """
        self._expire()
        best = max(
            (f for f in self._flights.get(scope, ()) if f.after <= after), key=lambda f: f.after, default=None
        )
        if best is not None:
            page = await asyncio.shield(best.future)
            if page.serves(after, horizon):
                self.shared += 1
                return page, True
        return await self._own(scope, after, make), False

    async def _own(self, scope: S, after: StreamKey, make: Callable[[], Awaitable[Page]]) -> Page:
        future: asyncio.Future[Page] = asyncio.get_running_loop().create_future()
        flight = _Flight(after, future)
        flights = self._flights.setdefault(scope, [])
        flights.append(flight)
        self.reads += 1
        try:
            page = await make()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: joiners re-raise it, no "never retrieved" warning
            self._drop(scope, flight)
            del future, flight  # the error's traceback holds this frame: else a cycle through the future
            raise
        future.set_result(page)
        flight.done_at = self.clock()
        if self.linger_s <= 0:
            self._drop(scope, flight)
        return page

    def _drop(self, scope: S, flight: _Flight) -> None:
        flights = self._flights.get(scope)
        if flights is not None and flight in flights:
            flights.remove(flight)
            if not flights:
                del self._flights[scope]

    def _expire(self) -> None:
        oldest = self.clock() - self.linger_s
        done: list[tuple[float, S, _Flight]] = []
        for scope, flights in list(self._flights.items()):
            for flight in list(flights):
                if flight.done_at is None:
                    continue
                if flight.done_at < oldest:
                    self._drop(scope, flight)
                else:
                    done.append((flight.done_at, scope, flight))
        done.sort(key=lambda entry: entry[0])
        for _, scope, flight in done[: max(0, len(done) - self.max_pages)]:
            self._drop(scope, flight)
