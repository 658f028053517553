"""CSV and Parquet files of replayed events (pyarrow): to one file or stream, or to a directory by day."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from projector.exceptions import ExportError
from projector.history import columns
from projector.history.sinks import Page


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
# zstd level 1 (pyarrow's default level): 40 bytes and 0.9 µs per event to write; snappy 75 bytes and
# 0.6 µs, lz4 77 bytes and 0.7 µs, zstd 3 41 bytes and 1.2 µs (BENCHMARKS.md). Half the file for 0.3 µs.
ZSTD_LEVEL = 1


class _Parquet:
    """Row groups of exactly `row_group_rows` rows (but the last), whatever the replay's pages, so the file
    depends on the events alone; dictionary encoding only for the columns whose values repeat."""

    def __init__(self, where: str | Path | BinaryIO, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.row_group_rows = row_group_rows
        self.writer = pq.ParquetWriter(
            where,
            columns.SCHEMA,
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            use_dictionary=list(columns.REPEATING),
        )
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.rows += batch.num_rows
        while self.rows >= self.row_group_rows:
            table = pa.Table.from_batches(self.pending, columns.SCHEMA)
            self._write(table.slice(0, self.row_group_rows))
            self.pending = table.slice(self.row_group_rows).to_batches()
            self.rows -= self.row_group_rows

    def _write(self, table: pa.Table) -> None:
        # One chunk per column: the writer's pages then depend on the values, not on where pages began.
        self.writer.write_table(table.combine_chunks(), row_group_size=max(table.num_rows, 1))

    def _flush(self) -> None:
        if self.rows:
            self._write(pa.Table.from_batches(self.pending, columns.SCHEMA))
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
        if page.rows:
            self.write_batch(columns.rows_batch(page.epoch, page.rows))

    def write_batch(self, batch: pa.RecordBatch) -> None:
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


class TableThreadSink:
    """A `TableSink` fed by threads: `builders` threads parse pages into batches (pyarrow releases the GIL
    while it parses), one thread writes them in page order, at most `depth` pages behind the replay, so
    the next pages are read meanwhile. Same pages, same order, same file.

    Raises (drain, close):
        ExportError: the output could not be written (the writer's OSError).
    """

    def __init__(self, sink: TableSink, depth: int = 4, builders: int = 2) -> None:
        self.sink = sink
        self.depth = depth
        self.builders = ThreadPoolExecutor(builders, thread_name_prefix="parley-table-batch")
        self.batches: queue.SimpleQueue[Future[pa.RecordBatch] | None] = queue.SimpleQueue()
        self.queued = 0
        self.error: BaseException | None = None
        self.room = asyncio.Event()
        self.thread: threading.Thread | None = None

    def write(self, page: Page) -> None:
        if not page.rows:
            return
        if self.thread is None:
            loop = asyncio.get_running_loop()
            self.thread = threading.Thread(
                target=self._run, args=(loop,), name="parley-table-writer", daemon=True
            )
            self.thread.start()
        self.queued += 1
        self.batches.put(self.builders.submit(columns.rows_batch, page.epoch, page.rows))

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while (batch := self.batches.get()) is not None:
                self.sink.write_batch(batch.result())
                loop.call_soon_threadsafe(self._written)
            self.sink.close()
        except BaseException as exc:  # raised in the replay's thread, by drain or close
            self.error = exc
            loop.call_soon_threadsafe(self.room.set)

    def _written(self) -> None:
        self.queued -= 1
        self.room.set()

    def _raise(self) -> None:
        if self.error is not None:
            if isinstance(self.error, OSError):
                raise ExportError(f"cannot write the output: {self.error}") from self.error
            raise self.error

    async def drain(self) -> None:
        while self.queued > self.depth and self.error is None:
            self.room.clear()
            await self.room.wait()
        self._raise()

    async def close(self) -> None:
        try:
            if self.thread is None:
                await asyncio.to_thread(self.sink.close)
                return
            self.batches.put(None)
            await asyncio.to_thread(self.thread.join)
        finally:
            self.builders.shutdown(cancel_futures=True)
        self._raise()
