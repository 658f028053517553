"""Where replayed events go: JSON Lines, CSV or Parquet, to a stream, a file, or a directory by day.

A sink takes pages of event lines (the current schema's JSON, one per event, newline-terminated) with
their positions; tables are made from the same lines, so every format holds exactly the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from projector.history import columns

FORMATS = ("jsonl", "csv", "parquet")


@dataclass(slots=True)
class Page:
    """Rendered events: `lines` holds one JSON line per event, in replay order."""

    lines: list[bytes]
    positions: list[str]
    partitions: list[int]
    stream_ids: list[str]


class Sink(Protocol):
    def write(self, page: Page) -> None: ...

    def close(self) -> None: ...


class JsonLinesSink:
    """Each event as the log holds it (current schema), or wrapped as `{"position":P,"event":E}`."""

    def __init__(self, out: BinaryIO, *, with_position: bool = False, flush: bool = False) -> None:
        self.out = out
        self.with_position = with_position
        self.flush = flush

    def write(self, page: Page) -> None:
        if self.with_position:
            body = b"".join(
                b'{"position":"%s","event":%s}\n' % (p.encode(), line.rstrip(b"\n"))
                for p, line in zip(page.positions, page.lines, strict=True)
            )
        else:
            body = b"".join(page.lines)
        self.out.write(body)
        if self.flush:
            self.out.flush()

    def close(self) -> None:
        self.out.flush()


def _batch(page: Page) -> pa.RecordBatch:
    return columns.record_batch(b"".join(page.lines), page.positions, page.partitions, page.stream_ids)


class _TableWriter(Protocol):
    def write_batch(self, batch: pa.RecordBatch) -> None: ...

    def close(self) -> None: ...


class _Csv:
    def __init__(self, where: str | Path | BinaryIO) -> None:
        self.writer = pa_csv.CSVWriter(where, columns.csv_schema())

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(columns.csv_ready(batch))

    def close(self) -> None:
        self.writer.close()


ROW_GROUP_ROWS = 131_072  # rows gathered into one Parquet row group (a replay page holds fewer)


class _Parquet:
    """Row groups of at least `row_group_rows` rows (but the last), fewer and larger than a replay's pages;
    dictionary encoding only for the columns whose values repeat."""

    def __init__(self, where: str | Path | BinaryIO, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.row_group_rows = row_group_rows
        self.writer = pq.ParquetWriter(
            where, columns.SCHEMA, compression="zstd", use_dictionary=list(columns.REPEATING)
        )
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.rows += batch.num_rows
        if self.rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.Table.from_batches(self.pending, columns.SCHEMA)
            self.writer.write_table(table, row_group_size=max(self.rows, 1))
        self.pending, self.rows = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


_WRITERS: dict[str, type[_Csv] | type[_Parquet]] = {"csv": _Csv, "parquet": _Parquet}


class TableSink:
    """CSV or Parquet to one file (or stream), or with `by_day` to `DIR/day=YYYY-MM-DD/part-0.<format>`
    (Hive-style, which DuckDB, pandas and Polars read as a `day` column)."""

    def __init__(self, fmt: str, where: str | Path | BinaryIO, *, by_day: bool = False) -> None:
        self.fmt = fmt
        self.where = where
        self.by_day = by_day
        self.days: dict[str, _TableWriter] = {}
        self.single: _TableWriter | None = None
        if not by_day:
            self.single = _WRITERS[fmt](where)

    def write(self, page: Page) -> None:
        if not page.lines:
            return
        batch = _batch(page)
        if self.single is not None:
            self.single.write_batch(batch)
            return
        days = columns.day_of(batch)
        for day in pc.unique(days).to_pylist():
            if day not in self.days:
                folder = Path(str(self.where)) / f"day={day}"
                folder.mkdir(parents=True, exist_ok=True)
                self.days[day] = _WRITERS[self.fmt](folder / f"part-0.{self.fmt}")
            self.days[day].write_batch(batch.filter(pc.equal(days, day)))

    def close(self) -> None:
        if self.single is not None:
            self.single.close()
        for writer in self.days.values():
            writer.close()
