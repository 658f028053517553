"""Replay throughput: `python -m benchmarks.history [--events N]` (default 1,000,000; `make bench-history`).

Starts its own Redis and Postgres, writes N events of the projector benchmark's generator into the log,
projects them with one worker (so the archive holds them all), then times, in the same run, one after another:
the raw ceiling, `COPY (SELECT <the archive rows a replay reads>) TO STDOUT` through psycopg, unparsed; then
`python -m projector replay` (a real process) to JSON Lines on stdout piped to /dev/null, and to a Parquet
file. Prints events/s side by side and each replay's ratio to the ceiling. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from benchmarks.machine import describe
from benchmarks.projector import fill_log, project
from devstack.binaries import redis_server_binary
from devstack.servers import PostgresServer, RedisServer
from projector.settings import ProjectorSettings
from servicekit.log_settings import LogSettings

NAMESPACE, PARTITIONS = "bench", 8
# The columns the replay's archive pages read (projector/history/reader.py), without its paging, its
# merge or its order: a sequential scan, the cheapest way Postgres can send those rows.
CEILING_SQL = "COPY (SELECT stream_ms, stream_seq, partition, stream_id, data FROM parley_store.event_archive) TO STDOUT"
FORMATS = {"text": "", "binary": " (FORMAT binary)"}  # text writes `data` (bytea) as hex


async def ceiling(database_url: str, fmt: str) -> tuple[float, int]:
    """Seconds to copy every archive row out in COPY format `fmt`, unparsed, and the bytes received."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        started = time.perf_counter()
        received = 0
        async with conn.cursor().copy(CEILING_SQL + FORMATS[fmt]) as copy:
            async for block in copy:
                received += len(block)
        return time.perf_counter() - started, received


def replay(env: dict[str, str], extra: list[str], limit_s: float) -> float:
    """Seconds `python -m projector replay` takes (the whole process: start, read, write, exit)."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        done = subprocess.run(
            [sys.executable, "-m", "projector", "replay", "--progress", "never", *extra],
            env=env, stdout=devnull, stderr=subprocess.PIPE, timeout=limit_s, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"replay {extra} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1, help="ceiling, JSONL, Parquet: this many times")
    parser.add_argument("--limit-s", type=float, default=600, help="bound on each phase")
    args = parser.parse_args()
    print(describe(str(redis_server_binary())))
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        with (
            RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis_server,
            PostgresServer(Path(tmp) / "pg", fast=False) as pg,
        ):
            database_url = pg.create_database("parley")
            started = time.perf_counter()
            await asyncio.wait_for(
                fill_log(redis_server.url, NAMESPACE, args.events, PARTITIONS), args.limit_s
            )
            settings = ProjectorSettings(
                log=LogSettings(redis_server.url, NAMESPACE, PARTITIONS), database_url=database_url,
                block_ms=100, worker_id="bench",
            )  # fmt: skip
            await project(settings, args.events, args.limit_s)
            print(f"archive filled: {args.events:,} events in {time.perf_counter() - started:.0f}s")
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                cur = await conn.execute("SELECT count(*) FROM parley_store.event_archive")
                archived = (await cur.fetchone() or (0,))[0]
            assert archived == args.events, f"the archive holds {archived} events"
            env = {
                **os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": database_url,
                "PARLEY_LOG_NAMESPACE": NAMESPACE, "PARLEY_PARTITIONS": str(PARTITIONS),
            }  # fmt: skip
            parquet = Path(tmp) / "replay.parquet"
            for _ in range(args.rounds):
                load_before = os.getloadavg()[0]
                copies = {
                    fmt: await asyncio.wait_for(ceiling(database_url, fmt), args.limit_s) for fmt in FORMATS
                }
                jsonl_s = replay(env, [], args.limit_s)
                parquet_s = replay(env, ["--format", "parquet", "--output", str(parquet)], args.limit_s)
                for fmt, (seconds, received) in copies.items():
                    print(f"ceiling, COPY (SELECT … archive rows) TO STDOUT{FORMATS[fmt]}, unparsed: "
                          f"{args.events / seconds:,.0f} rows/s ({seconds:.2f}s, {received / 1e6:,.0f} MB)")  # fmt: skip
                top = args.events / min(seconds for seconds, _ in copies.values())
                for name, seconds in (("JSON Lines to /dev/null", jsonl_s), ("Parquet file", parquet_s)):
                    rate = args.events / seconds
                    print(
                        f"replay, {name}: {rate:,.0f} events/s ({seconds:.2f}s), {rate / top:.0%} of the ceiling"
                    )
                print(f"  Parquet file: {parquet.stat().st_size / 1e6:,.0f} MB; load average (1 min) "
                      f"{load_before:.1f} before the ceiling, {os.getloadavg()[0]:.1f} after the replays",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
