"""Event history for analysts: replay any range of the log, filtered, as typed events or an Arrow table.

    from projector import history
    for position, event in history.events(types=["message_sent"], since="2026-12-01"):
        ...
    table = history.table(conversation=["welcome"])   # pyarrow.Table: polars.from_arrow(table), duckdb

Both read the archive in Postgres, then the live streams in Redis, from `DATABASE_URL` / `REDIS_URL`
(and `PARLEY_LOG_NAMESPACE`, `PARLEY_PARTITIONS`) unless given a `Source`. Filters as the CLI's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from events.codec import decode
from events.schema import Envelope
from projector.history import replay
from projector.history.replay import Source
from projector.history.selection import select
from projector.history.sinks import Page
from projector.settings import ProjectorSettings

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Source", "events", "table"]


def _source(source: Source | None) -> Source:
    if source is not None:
        return source
    settings = ProjectorSettings.from_env(auth=False)
    return Source(settings.log, settings.database_url)


def _pages(source: Source | None, filters: dict[str, Any]) -> Iterator[Page]:
    src = _source(source)
    layout = src.log.layout()
    selection = select(layout.partitions, layout.partition_for, **filters)

    async def pages() -> AsyncIterator[Page]:
        async with replay.open_reader(src, selection) as reader:
            async for page in replay.pages(reader):
                yield page

    return replay.iterate(pages)


def _filters(
    start: str | None, end: str | None, since: str | None, until: str | None,
    conversation: Iterable[str], types: Iterable[str], actor: Iterable[str],
) -> dict[str, Any]:  # fmt: skip
    return {"start": start, "end": end, "since": since, "until": until,
            "conversations": list(conversation), "types": list(types), "actors": list(actor)}  # fmt: skip


def events(
    *, start: str | None = None, end: str | None = None, since: str | None = None, until: str | None = None,
    conversation: Iterable[str] = (), types: Iterable[str] = (), actor: Iterable[str] = (),
    source: Source | None = None,
) -> Iterator[tuple[str, Envelope]]:  # fmt: skip
    """Every selected event as (position token, typed current-schema envelope), in replay order.

    Raises:
        SelectionError: the selection is malformed (`HistoryUnavailable`: a server is unreachable).
    """
    for page in _pages(source, _filters(start, end, since, until, conversation, types, actor)):
        for row in page.rows:
            yield page.position(row), decode(row[4])


def table(
    *, start: str | None = None, end: str | None = None, since: str | None = None, until: str | None = None,
    conversation: Iterable[str] = (), types: Iterable[str] = (), actor: Iterable[str] = (),
    source: Source | None = None,
) -> pa.Table:  # fmt: skip
    """The selected events as a pyarrow Table with the export's columns (`projector.history.columns`)."""
    import pyarrow as pa

    from projector.history import columns

    batches = [
        columns.rows_batch(page.epoch, page.rows)
        for page in _pages(source, _filters(start, end, since, until, conversation, types, actor))
        if page.rows
    ]
    return pa.Table.from_batches(batches, schema=columns.SCHEMA)
