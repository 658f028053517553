"""Replay throughput: `python -m benchmarks.history [--events N]` (default 1,000,000; `make bench-history`).

Starts its own Redis and Postgres, writes N events of the projector benchmark's generator into the log,
projects them with one worker (so the archive holds them all), then times, in the same run, `--rounds`
(at least 3) rounds of: the raw ceiling, `COPY (SELECT <the archive rows a replay reads>) TO STDOUT (FORMAT
binary)` through psycopg, unparsed; `python -m projector replay` (a real process) to JSON Lines on stdout
piped to /dev/null; the ceiling again; the replay to a Parquet file. Each replay's ratio is to the ceiling
run just before it; prints events/s side by side, then each format's min and median ratio. Every phase is
bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
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
FORMAT = " (FORMAT binary)"  # the faster: text writes `data` (bytea) as hex


async def ceiling(database_url: str) -> tuple[float, int]:
    """Seconds to copy every archive row out in binary COPY format, unparsed, and the bytes received."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        started = time.perf_counter()
        received = 0
        async with conn.cursor().copy(CEILING_SQL + FORMAT) as copy:
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
    parser.add_argument(
        "--rounds", type=int, default=3, help="ceiling, JSONL, ceiling, Parquet: this many times"
    )
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
            runs = {
                "JSON Lines to /dev/null": [],
                "Parquet file": ["--format", "parquet", "--output", str(parquet)],
            }
            ratios: dict[str, list[float]] = {name: [] for name in runs}
            for n in range(1, max(args.rounds, 3) + 1):
                for name, extra in runs.items():
                    load = os.getloadavg()[0]
                    seconds, received = await asyncio.wait_for(ceiling(database_url), args.limit_s)
                    top = args.events / seconds
                    replay_s = replay(env, extra, args.limit_s)
                    rate = args.events / replay_s
                    ratios[name].append(rate / top)
                    print(f"round {n}: ceiling, COPY (SELECT … archive rows) TO STDOUT{FORMAT}, unparsed: "
                          f"{top:,.0f} rows/s ({seconds:.2f}s, {received / 1e6:,.0f} MB); replay, {name}: "
                          f"{rate:,.0f} events/s ({replay_s:.2f}s), {rate / top:.0%} of the ceiling; load "
                          f"average (1 min) {load:.1f} → {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
            print(f"Parquet file: {parquet.stat().st_size / 1e6:,.0f} MB")
            for name, got in ratios.items():
                print(f"{name}: ratio to the ceiling min {min(got):.0%}, median {statistics.median(got):.0%}")


if __name__ == "__main__":
    asyncio.run(main())
