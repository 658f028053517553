"""`python -m projector replay` and `snapshot`: events out of the archive and the streams, read models
as they were, for analysts.

stdout carries nothing but events (JSON Lines unless `--output` names a file); errors go to stderr, one
line, no traceback. Exit codes: 0 done (or interrupted while following), 2 bad request, 3 a server is
unreachable or the log missing, 4 the output could not be written.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import BinaryIO

from projector.exceptions import ExportError, SelectionError
from projector.history import replay
from projector.history.selection import select
from projector.history.sinks import FORMATS, JsonLinesSink, Sink
from projector.settings import ProjectorSettings
from servicekit.settings import Env

EXIT_BAD_REQUEST = 2
EXIT_UNAVAILABLE = 3
EXIT_UNWRITABLE = 4


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay events from the archive and the log (JSON Lines, CSV, Parquet)",
        description="Replay a range of the log, filtered, upcast to the current schema.",
    )
    p.add_argument("--from", dest="start", metavar="POSITION", help="after this position token or cursor")
    p.add_argument("--to", dest="end", metavar="POSITION", help="up to and including this position or cursor")
    p.add_argument("--since", metavar="TIME", help="log time at or after (ISO 8601; no zone = UTC)")
    p.add_argument("--until", metavar="TIME", help="log time before (ISO 8601)")
    p.add_argument("--conversation", action="append", default=[], metavar="ID", help="repeatable")
    p.add_argument("--type", dest="types", action="append", default=[], metavar="TYPE", help="repeatable")
    p.add_argument("--actor", action="append", default=[], metavar="USER", help="repeatable")
    p.add_argument("--format", choices=FORMATS, default="jsonl")
    p.add_argument("--output", metavar="PATH", help="a file (default: stdout), or a directory with --by-day")
    p.add_argument("--by-day", action="store_true", help="write DIR/day=YYYY-MM-DD/part-0.<format>")
    p.add_argument("--with-position", action="store_true", help='JSON Lines as {"position":P,"event":E}')
    p.add_argument("--follow", action="store_true", help="keep tailing new events until interrupted")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="a bar on stderr (auto: when writing a file or stderr is a terminal)")  # fmt: skip


def add_snapshot_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshot",
        help="build the read models as they were at a past position or time into a schema",
        description="Time travel: read models at a point of the log (included), in their own schema.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--at", metavar="POSITION|TIME", help="a position token, a fanout cursor or ISO 8601")
    what.add_argument("--list", action="store_true", help="list the snapshots")
    what.add_argument("--drop", metavar="NAME", help="drop snapshot NAME")
    p.add_argument("--schema", metavar="NAME", help="the schema to build (with --at)")


def _sink(args: argparse.Namespace) -> Sink:
    if args.by_day and not args.output:
        raise SelectionError("--by-day writes a directory: give it as --output")
    if args.by_day and args.format == "jsonl":
        raise SelectionError("--by-day is for --format csv or parquet")
    if args.format == "parquet" and not args.output:
        raise SelectionError("Parquet is written to a file or directory: give --output")
    if args.format == "jsonl":
        try:
            out: BinaryIO = open(args.output, "wb") if args.output else sys.stdout.buffer
        except OSError as exc:
            raise ExportError(f"cannot write {args.output}: {exc}") from None
        return JsonLinesSink(out, with_position=args.with_position, flush=args.follow)
    if args.by_day:
        try:
            Path(args.output).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create {args.output}: {exc}") from None
    import pyarrow as pa

    from projector.history.tables import TableSink, TableThreadSink

    # glibc's malloc, not pyarrow's default mimalloc: a page's buffers are allocated and freed by several
    # threads, and mimalloc's per-thread heaps gave the pages back and faulted them in again, which cost
    # a Parquet export 1-3 µs of system time per event (BENCHMARKS.md).
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        table = TableSink(args.format, args.output or sys.stdout.buffer, by_day=args.by_day)
    except OSError as exc:
        raise ExportError(f"cannot write {args.output}: {exc}") from None
    return TableThreadSink(table)


def _progress_wanted(args: argparse.Namespace) -> bool:
    if args.progress != "auto":
        return bool(args.progress == "always")
    return bool(args.output) or sys.stderr.isatty()


async def _run(args: argparse.Namespace, source: replay.Source) -> int:
    if args.follow and (args.end or args.until):
        raise SelectionError("--follow tails the log forever: it takes no --to or --until")
    layout = source.log.layout()
    selection = select(
        layout.partitions, layout.partition_for,
        start=args.start, end=args.end, since=args.since, until=args.until,
        conversations=args.conversation, types=args.types, actors=args.actor,
    )  # fmt: skip
    async with replay.open_reader(source, selection) as reader:
        sink = _sink(args)
        bar = None
        if _progress_wanted(args):
            from tqdm import tqdm

            total = None if args.follow else await replay.count(reader)
            bar = tqdm(total=total, unit=" events", unit_scale=True, file=sys.stderr, dynamic_ncols=True)
        try:
            async for page in replay.pages(reader, follow=args.follow):
                sink.write(page)
                await sink.drain()
                if bar is not None:
                    bar.update(len(page.rows))
        finally:
            await sink.close()
            if bar is not None:
                bar.close()
        if reader.undecodable:
            print(f"note: {reader.undecodable} undecodable stream entries left out (see dead letters)",
                  file=sys.stderr)  # fmt: skip
    return 0


async def _snapshot(args: argparse.Namespace, settings: ProjectorSettings) -> int:
    import psycopg

    from projector.history import snapshot

    if args.at is not None:
        if not args.schema:
            raise SelectionError("--at needs --schema NAME, the schema to build")
        report = await snapshot.take(settings, args.at, args.schema)
        print(f"{report.schema}: read models at {report.at}, {report.events} events, {report.seconds:.1f} s")
        return 0
    try:
        conn = await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise replay.HistoryUnavailable(f"cannot reach Postgres: {exc}") from None
    async with conn:
        if args.drop:
            await snapshot.drop(conn, args.drop)
            print(f"dropped {args.drop}")
        else:
            for name, description in await snapshot.snapshots(conn):
                print(f"{name}\t{description}")
    return 0


def main(args: argparse.Namespace, env: Env | None = None) -> int:
    """Run the replay or snapshot `args` ask for; exit codes as the module docstring says."""
    import os

    settings = ProjectorSettings.from_env(env or Env(), auth=False)
    source = replay.Source(settings.log, settings.database_url)
    try:
        if args.command == "snapshot":
            return asyncio.run(_snapshot(args, settings))
        return asyncio.run(_run(args, source))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `| head`: the reader went away; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except replay.HistoryUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SelectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNWRITABLE
