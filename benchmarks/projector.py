"""Projector throughput: `python -m benchmarks.projector [--events N]` (default 1,000,000).

Starts its own Redis (appendfsync everysec) and Postgres (durable settings) in a temp dir, writes N real
encoded envelopes of realistic conversations into the log (pipelined XADD), then measures: one worker
projecting them into empty read models (events/s); the raw ceiling (COPY of the same message rows into an
unindexed table); a full `rebuild` of the N events. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from benchmarks.machine import describe
from devstack.binaries import redis_server_binary
from devstack.process import tree_cpu_seconds
from devstack.servers import PostgresServer, RedisServer
from events import schema
from events.codec import encode
from events.ids import new_event_id, new_object_id
from events.log import EventLog
from events.redisclient import redis_client
from projector.rebuild import rebuild
from projector.settings import DEFAULT_BATCH, ProjectorSettings
from projector.worker import Worker
from servicekit.log_settings import LogSettings

WORDS = ("hello", "lunch", "deploy", "meeting", "coffee", "release", "bug", "friday", "budget", "pizza",
         "tomorrow", "review", "ship", "done", "thanks", "later", "call", "plan", "ok", "see")  # fmt: skip
# Durable (fsync, synchronous commit and full-page writes stay on), sized as a production server would be
# for this machine rather than Postgres's defaults (128 MB of shared buffers, 1 GB of WAL between checkpoints).
PG_SETTINGS = {"shared_buffers": "2GB", "max_wal_size": "8GB", "checkpoint_timeout": "15min"}


@dataclass(slots=True)
class Conv:
    id: str
    creator: str
    members: list[str]
    seq: int = 0
    live: list[tuple[str, str]] = field(default_factory=list)  # (message id, author)


@dataclass(slots=True)
class Generator:
    """Fold-valid events of many conversations: creates, sends, edits, deletes, reads, joins, leaves."""

    rng: random.Random
    users: int
    convs: list[Conv] = field(default_factory=list)
    at: datetime = field(default_factory=lambda: datetime(2025, 1, 1, tzinfo=UTC))
    messages: list[tuple[str, int, str, str, str, datetime]] = field(default_factory=list)

    def _text(self) -> str:
        return " ".join(self.rng.choices(WORDS, k=self.rng.randint(2, 14)))

    def _user(self) -> str:
        return f"user{self.rng.randrange(self.users)}"

    def next(self) -> schema.Envelope:
        rng = self.rng
        self.at += timedelta(milliseconds=3)
        if not self.convs or rng.random() < 0.01:
            creator = self._user()
            others = sorted({self._user() for _ in range(rng.randint(1, 5))} - {creator})
            conv = Conv(new_object_id(), creator, [creator, *others])
            self.convs.append(conv)
            return self._env(conv, creator, schema.ConversationCreated(self._text()[:60], tuple(others)))
        conv = rng.choice(self.convs)
        actor = rng.choice(conv.members)
        roll = rng.random()
        if roll < 0.6 or not conv.live:
            mid, body = new_object_id(), self._text()
            conv.live.append((mid, actor))
            env = self._env(conv, actor, schema.MessageSent(mid, body))
            self.messages.append((conv.id, env.seq, mid, actor, body, self.at))
            return env
        if roll < 0.7:
            mid, author = rng.choice(conv.live)
            return self._env(conv, author, schema.MessageEdited(mid, self._text()))
        if roll < 0.75:
            mid, author = conv.live.pop(rng.randrange(len(conv.live)))
            return self._env(conv, author, schema.MessageDeleted(mid))
        if roll < 0.95:
            return self._env(conv, actor, schema.MessagesRead(conv.seq))
        if roll < 0.97:
            user = self._user()
            if user not in conv.members:
                conv.members.append(user)
                return self._env(conv, actor, schema.ParticipantAdded(user))
        if roll < 0.98 and len(conv.members) > 2:
            user = rng.choice([m for m in conv.members if m != conv.creator])
            conv.members.remove(user)
            return self._env(conv, user, schema.ParticipantRemoved(user))
        return self._env(conv, actor, schema.ConversationArchived())

    def _env(self, conv: Conv, actor: str, payload: schema.AnyPayload) -> schema.Envelope:
        conv.seq += 1
        event_id = new_event_id()
        return schema.Envelope(
            seq=conv.seq, event_id=event_id, schema_version=payload.VERSION, occurred_at=self.at, actor=actor,
            conversation_id=conv.id, correlation_id=event_id, payload=payload,
        )  # fmt: skip


async def fill_log(
    redis_url: str, namespace: str, events: int, partitions: int, cluster: bool = False
) -> Generator:
    """Append `events` encoded envelopes, pipelined, each to its conversation's partition."""
    client = redis_client(redis_url, None, cluster=cluster)
    try:
        layout = LogSettings(redis_url, namespace, partitions, redis_cluster=cluster).layout()
        await EventLog(client, layout).open(create=True)
        gen = Generator(random.Random(42), users=max(50, events // 200))
        done = 0
        while done < events:
            pipe = client.pipeline(transaction=False)
            batch = min(5000, events - done)
            for _ in range(batch):
                env = gen.next()
                pipe.xadd(layout.stream_key(layout.partition_for(env.conversation_id)), {"e": encode(env)})
            done += batch
            await pipe.execute()
        return gen
    finally:
        await client.aclose()


@dataclass(slots=True)
class Cpu:
    """CPU seconds spent by this process (named `here`) and by each server's process tree, between two
    readings."""

    servers: dict[str, int]
    here: str = "worker"
    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)

    def _now(self) -> dict[str, float]:
        now = {name: tree_cpu_seconds(pgid) for name, pgid in self.servers.items()}
        return {self.here: time.process_time(), **now}

    def __enter__(self) -> Cpu:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._now()

    def spent(self) -> dict[str, float]:
        return {k: v - self.start[k] for k, v in self.end.items()}


async def project(settings: ProjectorSettings, events: int, limit_s: float) -> float:
    """Seconds for one worker to project the whole log into empty read models."""
    worker = Worker(settings, use_leases=False)
    await worker.start()
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    try:
        check, applied = started + 10, -1
        while not await worker.caught_up(range(settings.log.partitions)):
            if time.perf_counter() > check:  # no progress for 10 s: say where each partition is
                check += 10
                now = sum(pr.applied for pr in worker.projectors.values())
                if now == applied:
                    state = {p: (pr.position, pr.stopped, pr.retrying) for p, pr in worker.projectors.items()}
                    print(f"  stalled after {time.perf_counter() - started:.0f}s: {state}", flush=True)
                applied = now
            if time.perf_counter() - started > limit_s:
                raise SystemExit(f"projection not done after {limit_s:.0f}s")
            await asyncio.sleep(0.05)
        return time.perf_counter() - started
    finally:
        stop.set()
        await task
        await worker.close()


def pg_settings(default_memory: bool, statements: bool) -> dict[str, str]:
    settings = {} if default_memory else dict(PG_SETTINGS)
    if statements:
        settings["shared_preload_libraries"] = "pg_stat_statements"
    return settings


async def print_statements(database_url: str, top: int = 12) -> None:
    """Where Postgres spent its time (pg_stat_statements), biggest first."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT total_exec_time / 1000, calls, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) "
            "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT %s",
            (top,),
        )
        print("  Postgres time by statement (pg_stat_statements):")
        for seconds, calls, rows, query in await cur.fetchall():
            print(f"    {seconds:7.2f}s {calls:7d} calls {rows:9d} rows  {query}")


async def copy_ceiling(database_url: str, gen: Generator) -> float:
    """Seconds to COPY the same message rows into an unindexed table."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(
            "CREATE TABLE bench_messages (conversation_id text, seq bigint, message_id text, author text, "
            "body text, sent_at timestamptz)"
        )
        await conn.commit()
        started = time.perf_counter()
        async with conn.cursor().copy("COPY bench_messages FROM STDIN") as copy:
            for row in gen.messages:
                await copy.write_row(row)
        await conn.commit()
        return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projector")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--limit-s", type=float, default=600, help="bound on each phase")
    parser.add_argument(
        "--partitions", type=int, default=8, help="log partitions (PARLEY_PARTITIONS' default)"
    )
    parser.add_argument("--no-rebuild", action="store_true")
    parser.add_argument(
        "--pg-statements", action="store_true",
        help="load pg_stat_statements and print where Postgres spent its time while projecting",
    )  # fmt: skip
    parser.add_argument(
        "--pg-default-memory", action="store_true",
        help="run Postgres with its default memory and WAL sizes instead of the production-like ones",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(describe(str(redis_server_binary())))
    with tempfile.TemporaryDirectory(prefix="bench-projector-") as tmp:
        with (
            RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis_server,
            PostgresServer(
                Path(tmp) / "pg", fast=False, settings=pg_settings(args.pg_default_memory, args.pg_statements)
            ) as pg,
        ):
            database_url = pg.create_database("parley")
            if args.pg_statements:
                async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                    await conn.execute("CREATE EXTENSION pg_stat_statements")
            started = time.perf_counter()
            gen = await asyncio.wait_for(
                fill_log(redis_server.url, "bench", args.events, args.partitions), args.limit_s
            )
            seconds = time.perf_counter() - started
            print(f"log filled: {args.events} events, {len(gen.convs)} conversations, "
                  f"{len(gen.messages)} messages, in {seconds:.1f}s ({args.events / seconds:,.0f}/s)")  # fmt: skip
            # The generator's records (kept for the ceiling) are no part of a worker: keep them out of the
            # collector's passes over this process, which would otherwise charge them to the worker.
            gc.freeze()
            settings = ProjectorSettings(
                log=LogSettings(redis_server.url, "bench", args.partitions), database_url=database_url,
                batch=args.batch, block_ms=100, worker_id="bench",
            )  # fmt: skip
            assert redis_server.pid is not None and pg.pid is not None
            with Cpu({"postgres": pg.pid, "redis": redis_server.pid}) as cpu:
                seconds = await project(settings, args.events, args.limit_s)
            print(f"Postgres settings: {'defaults' if args.pg_default_memory else PG_SETTINGS}, durable")
            print(f"one worker: {args.events / seconds:,.0f} events/s ({seconds:.1f}s, batch {args.batch}, "
                  f"{args.partitions} partitions)")  # fmt: skip
            print("  CPU seconds while projecting: " + ", ".join(
                f"{name} {used:.1f} ({used / seconds:.0%} of a core, {used / args.events * 1e6:.1f} µs/event)"
                for name, used in cpu.spent().items()
            ))  # fmt: skip
            if args.pg_statements:
                await print_statements(database_url)
            ceiling_s = await copy_ceiling(database_url, gen)
            ceiling = len(gen.messages) / ceiling_s
            print(f"ceiling, COPY of the {len(gen.messages)} message rows into an unindexed table: "
                  f"{ceiling:,.0f} rows/s ({ceiling_s:.1f}s)")  # fmt: skip
            print(f"one worker / ceiling: {args.events / seconds / ceiling:.0%} (events/s against rows/s)")
            if not args.no_rebuild:
                report = await asyncio.wait_for(rebuild(settings), args.limit_s)
                print(f"rebuild of {args.events} events: {report.seconds:.1f}s "
                      f"({report.from_archive} from the archive, {report.from_log} from the log, "
                      f"writers paused {report.swap_ms:.0f} ms; archive fold {report.archive_s:.1f}s "
                      f"in {settings.rebuild_processes} processes, index builds {report.index_s:.1f}s)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
