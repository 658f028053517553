"""Where replayed events go: pages of rows in replay order, and the JSON Lines sink.

A page holds the rows as read (stored bytes); each sink renders them to the current schema itself, so
JSON Lines never builds what it does not write and tables never decode in Python what pyarrow parses
(`columns.rows_batch`). CSV and Parquet are `tables.TableSink`, fed by threads (`tables.TableThreadSink`);
this module imports no pyarrow, so a JSON Lines replay never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from events.codec import current_bytes

if TYPE_CHECKING:
    from projector.history.reader import Row

FORMATS = ("jsonl", "csv", "parquet")


@dataclass(slots=True)
class Page:
    """Rows of one log epoch in replay order, as the archive and the streams hold them."""

    epoch: str
    rows: list[Row]

    def position(self, row: Row) -> str:
        return f"{self.epoch}.{row[2]}.{row[3]}"


def positioned(epoch: str, row: Row) -> bytes:
    """`{"position":P,"event":E}`, E the row's current-schema JSON: the wrapped JSON Lines form."""
    return b'{"position":"%s.%d.%s","event":%s}' % (
        epoch.encode(), row[2], row[3].encode(), current_bytes(row[4]),
    )  # fmt: skip


class Sink(Protocol):
    """Takes pages in replay order: `write` writes (or queues) one, `drain` waits while too much is queued,
    `close` finishes the output."""

    def write(self, page: Page) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


class JsonLinesSink:
    """Each event as the log holds it (current schema), or wrapped as `{"position":P,"event":E}`."""

    def __init__(self, out: BinaryIO, *, with_position: bool = False, flush: bool = False) -> None:
        self.out = out
        self.with_position = with_position
        self.flush = flush

    def write(self, page: Page) -> None:
        if not page.rows:
            return
        if self.with_position:
            body = b"\n".join([positioned(page.epoch, r) for r in page.rows])
        else:
            body = b"\n".join([current_bytes(r[4]) for r in page.rows])
        self.out.write(body + b"\n")
        if self.flush:
            self.out.flush()

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        self.out.flush()
