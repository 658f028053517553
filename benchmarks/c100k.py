"""Many idle connections on one fanout process: memory per connection, idle Redis load, loop lag.

Starts Redis, Postgres, a projector and one fanout, creates the conversations (each user in
`--per-user` conversations of `--members` users), then opens `--connections` authenticated, subscribed
connections from `--processes` load-generator processes (benchmarks/c100k_load.py), each connection from
its own 127.x.y.z source address. With all of them live it watches the idle process for `--idle-s`
(presence heartbeats and sweeps, WebSocket pings) and prints: connections, RSS per connection, Redis
ops/s and CPU, the fanout's CPU, its event loop's lag p99 (its `parley_loop_lag_seconds`), the load
average, the machine and the date. Then (`--storm`) messages flow while every client drops at once and
while the fanout is killed and restarted; each storm's recovery is measured and every user's events are
checked against the log (benchmarks/storm.py). Bounded: every wait has a deadline; the run stops within
15 minutes.
Run: make bench-c100k   (BENCH_ARGS="--connections 10000" for a smaller run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.c100k_load import conversations_of
from benchmarks.fanout import SECRET, rss_bytes
from benchmarks.looplag import Buckets, gc_pauses, lag_buckets, lag_quantile_ms
from benchmarks.machine import describe
from benchmarks.processes import server
from benchmarks.storm import LoadProcess, Sender, Storm, ask_all, cpu_s, expected_spans, storm, total
from command_api import commands
from command_api.append import Appender
from command_api.bodies import CreateConversation
from command_api.commands import Context
from devstack.binaries import redis_server_binary
from devstack.ports import free_port
from devstack.servers import PostgresServer, RedisServer
from events.layout import LogLayout

PARTITIONS = 8
FDS_PER_PROCESS_RESERVE = 200
"""Descriptors the fanout needs besides its connections (Redis, Postgres, listening socket, files)."""
DEADLINE_S = 14 * 60


def memberships(users: int, per_user: int, members: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for user in range(users):
        for c in conversations_of(user, users, per_user, members):
            out.setdefault(c, []).append(f"u{user}")
    return out


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Scrape:
    """What one look at the running stack saw: lag histogram buckets, Redis and fanout counters."""

    at: float
    lag_buckets: Buckets
    redis_commands: int
    redis_cpu_s: float
    fanout_cpu_s: float
    redis_calls: dict[str, int]
    """Calls per command as clients sent them (a script's own commands are in `redis_commands` only)."""
    gc: dict[str, tuple[float, float]]
    """The fanout's scheduled collections by kind: (count, seconds paused)."""

    @staticmethod
    def take(fanout_port: int, fanout_pid: int, r: redis.Redis) -> Scrape:
        stats, cpu, calls = r.info("stats"), r.info("cpu"), r.info("commandstats")
        return Scrape(
            time.monotonic(), lag_buckets(fanout_port), int(stats["total_commands_processed"]),
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), cpu_s(fanout_pid),
            {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in calls.items()}, gc_pauses(fanout_port),
        )  # fmt: skip


def stages_of(args: argparse.Namespace, processes: int) -> list[list[int]]:
    """The load processes started together; profiled, one after the other (a snapshot after each)."""
    return [[p] for p in range(processes)] if args.profile else [list(range(processes))]


async def snapshot(pid: int, folder: Path, k: int) -> None:
    """Ask the profiled fanout for snapshot `k` and wait until it is written."""
    os.kill(pid, signal.SIGUSR1)
    for _ in range(6000):  # tracemalloc and gc.get_objects over a loaded process: minutes
        if (folder / f"sizes-{k}.json").exists():
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"snapshot {k} not written")


async def create_conversations(redis_url: str, namespace: str, members: dict[str, list[str]]) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    appender = Appender(client, LogLayout(namespace, PARTITIONS))
    await appender.open()
    items = list(members.items())
    for start in range(0, len(items), 512):
        await asyncio.gather(*(
            appender.append(commands.create_conversation_with_id(
                Context(actor=ids[0]), CreateConversation(title=c, participants=ids[1:]), c,
            ))
            for c, ids in items[start : start + 512]
        ))  # fmt: skip
    await appender.close()
    await client.aclose()


async def projector_caught_up(port: int, deadline: float) -> None:
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
            lags = [
                s.value
                for family in text_string_to_metric_families(text)
                if family.name == "parley_projector_lag_events"
                for s in family.samples
            ]
            if lags and sum(lags) == 0:
                return
            await asyncio.sleep(0.5)
    raise RuntimeError("the projector did not catch up in time")


async def storms_phase(
    storms: list[str], args: argparse.Namespace, loads: list[LoadProcess], r: redis.Redis,
    database_url: str, port: int, pid: int, redis_url: str, restart: Callable[[], Any],
    connect: tuple[float, float],
) -> list[str]:  # fmt: skip
    """Messages flow at `--storm-rate` while each storm runs; then every user's events are checked against
    the log: each conversation's messages from the first to the last, no gap, no duplicate."""
    members = memberships(sum(lp.count for lp in loads), args.per_user, args.members)
    sender = Sender(redis_url, "c100k", PARTITIONS, members)
    await sender.start(args.storm_rate)
    results: list[Storm] = []
    try:
        await asyncio.sleep(2.0)
        for n, kind in enumerate(storms):
            sent = sender.sent
            profiled = args.cprofile is not None and n == 0
            if profiled:
                os.kill(pid, signal.SIGUSR2)
            result, pid = await storm(kind, loads, r, database_url, port, pid, restart, args.storm_bound_s)
            if profiled:
                os.kill(pid, signal.SIGUSR2)
            result.sent = sender.sent - sent
            result.connect = connect
            results.append(result)
            print("\n".join(result.lines()), flush=True)
            await asyncio.sleep(3.0)
    finally:
        await sender.stop()
    want_live = total(await ask_all(loads, b"report"), "live")  # those that were live at first
    last, quiet_since, counts = -1, time.monotonic(), []
    for _ in range(480):  # until all are live and received nothing new for 2 s (at most two minutes)
        counts = await ask_all(loads, b"report")
        events = total(counts, "events")
        if events != last:
            last, quiet_since = events, time.monotonic()
        elif time.monotonic() - quiet_since > 2.0 and total(counts, "live_now") >= want_live:
            break
        await asyncio.sleep(0.25)
    if (live_now := total(counts, "live_now")) < want_live:
        print(f"NOTE: {want_live - live_now:,} clients were not live again when the log was checked")
    spans, holes = await expected_spans(redis_url, "c100k", PARTITIONS)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spans, f)
    checks = await ask_all(loads, f"check {f.name}".encode())
    os.unlink(f.name)
    counts = await ask_all(loads, b"report")
    lines = [
        f"\nstorm check against the log     {sender.sent:,} messages in {len(spans):,} conversations "
        f"({sender.failed} appends failed, {holes} seq holes in the log)",
        f"  users checked                  {total(checks, 'checked'):,}: {total(checks, 'wrong'):,} with a "
        f"conversation's messages not exactly first..last, {total(checks, 'missing'):,} conversations "
        f"missing, {total(checks, 'foreign'):,} foreign",
        f"  gaps {total(counts, 'gaps'):,}, duplicates {total(counts, 'duplicates'):,}, resyncs "
        f"{total(counts, 'resyncs'):,}, slow-consumer closes seen by clients {total(counts, 'slow_consumer'):,}",
    ]
    return [line for result in results for line in ["", *result.lines()]] + lines


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--per-user", type=int, default=3, help="conversations each user is in")
    parser.add_argument("--members", type=int, default=10, help="users per conversation")
    parser.add_argument("--processes", type=int, default=0, help="load processes (0: one per 10,000)")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight per load process")
    parser.add_argument("--idle-s", type=float, default=30.0, help="idle watch (heartbeats every TTL/3)")
    parser.add_argument(
        "--deflate", action="store_true", help="clients offer permessage-deflate (browsers do)"
    )
    parser.add_argument("--presence-scope", default="shared", choices=("engaged", "shared", "off"))
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="run the fanout under tracemalloc; snapshots in this folder after each load process",
    )  # fmt: skip
    parser.add_argument(
        "--storm", default="both", choices=("both", "drop", "kill", "none"),
        help="after the idle watch: every client drops at once (drop), the fanout is killed (kill), or both",
    )  # fmt: skip
    parser.add_argument(
        "--cprofile", type=Path, default=None,
        help="run the fanout under cProfile during the first storm; its stats (pstats) to this file",
    )  # fmt: skip
    parser.add_argument("--fanout-log", type=Path, default=None, help="append the fanout's stderr here")
    parser.add_argument(
        "--storm-rate", type=float, default=100.0, help="messages/s appended during the storms"
    )
    parser.add_argument("--storm-bound-s", type=float, default=120.0, help="longest wait for one storm")
    args = parser.parse_args()
    storms = (
        []
        if args.profile or args.storm == "none"
        else ["drop", "kill"]
        if args.storm == "both"
        else [args.storm]
    )
    started = time.monotonic()
    deadline = started + DEADLINE_S
    storm_lines: list[str] = []

    limit = raise_fd_limit()
    wanted = args.connections
    connections = min(wanted, limit - FDS_PER_PROCESS_RESERVE)
    print(f"machine: {describe(str(redis_server_binary()))}")
    if connections < wanted:
        print(
            f"NOTE: {wanted:,} connections asked, {connections:,} measured: one process may hold "
            f"{limit:,} descriptors here (RLIMIT_NOFILE hard limit; raising it needs CAP_SYS_RESOURCE)"
        )
    processes = args.processes or max(1, math.ceil(connections / 10_000))
    members = memberships(connections, args.per_user, args.members)
    print(
        f"load: {connections:,} connections from {processes} load processes; each user in {args.per_user} "
        f"of {len(members):,} conversations of {args.members}; presence {args.presence_scope}; "
        f"permessage-deflate {'offered' if args.deflate else 'not offered'} by the clients, "
        f"PARLEY_FANOUT_WS_DEFLATE={os.environ.get('PARLEY_FANOUT_WS_DEFLATE', '1')} on the server"
    )
    with tempfile.TemporaryDirectory() as tmp:
        with (
            RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis_server,
            PostgresServer(
                Path(tmp) / "pg", fast=True, settings={"shared_preload_libraries": "pg_stat_statements"}
            ) as postgres,
        ):
            database_url = postgres.create_database("parley")
            with psycopg.connect(database_url, autocommit=True) as conn:  # Postgres reads per resume
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            fanout_port, projector_port = free_port(), free_port()
            env = {
                **os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": database_url,
                "PARLEY_LOG_NAMESPACE": "c100k", "PARLEY_PARTITIONS": str(PARTITIONS),
                "PARLEY_JWT_SECRET": SECRET, "PARLEY_DEV_MODE": "1",
                "PARLEY_FANOUT_PORT": str(fanout_port), "PARLEY_PROJECTOR_HTTP_PORT": str(projector_port),
                "PARLEY_FANOUT_PRESENCE_SCOPE": args.presence_scope,
            }  # fmt: skip
            fanout_module = "realtime_fanout"
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                env["PARLEY_PROFILE_DIR"] = str(args.profile)
                fanout_module = "benchmarks.profiled_fanout"
            elif args.cprofile:
                env["PARLEY_CPROFILE_OUT"] = str(args.cprofile.resolve())
                fanout_module = "benchmarks.cprofiled_fanout"
            t = time.monotonic()
            await create_conversations(redis_server.url, "c100k", members)
            print(f"created {len(members):,} conversations in {time.monotonic() - t:.1f} s", flush=True)
            r = redis.Redis.from_url(redis_server.url)
            with contextlib.ExitStack() as processes_:
                processes_.enter_context(server(["projector"], projector_port, env))
                fanout = processes_.enter_context(
                    server([fanout_module], fanout_port, env, log_path=args.fanout_log)
                )
                await projector_caught_up(projector_port, deadline)
                await asyncio.sleep(1.0)
                rss_before = rss_bytes(fanout.pid)
                share = math.ceil(connections / processes)
                loads: list[LoadProcess] = []
                counts: list[dict[str, int]] = []
                t, cpu_before = time.monotonic(), cpu_s(fanout.pid)
                stages = stages_of(args, processes)
                reserve_s = args.idle_s + 90 + (args.storm_bound_s + 30) * len(storms)
                budget_s = max(10, int(deadline - time.monotonic() - reserve_s) // len(stages))
                try:
                    for stage in stages:
                        started_now = []
                        for p in stage:
                            first, count = p * share, min(share, connections - p * share)
                            proc = await asyncio.create_subprocess_exec(
                                sys.executable, "-m", "benchmarks.c100k_load",
                                *(str(a) for a in (fanout_port, first, count, p, args.concurrency, int(args.deflate), budget_s,
                                                    connections, args.per_user, args.members)),
                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
                                limit=1 << 24,
                            )  # fmt: skip
                            started_now.append(LoadProcess(proc, count))
                        loads += started_now
                        counts += await asyncio.gather(
                            *(lp.line(deadline - time.monotonic()) for lp in started_now)
                        )
                        if args.profile:
                            await snapshot(fanout.pid, args.profile, len(counts))
                    connect_s = time.monotonic() - t
                    live = total(counts, "live")
                    connect_cpu_ms = 1000 * (cpu_s(fanout.pid) - cpu_before) / max(live, 1)
                    if skipped := total(counts, "skipped"):
                        print(f"NOTE: {skipped:,} connections not attempted: the 15-minute bound came first")
                    print(
                        f"connected {live:,} live ({total(counts, 'failed'):,} failed) in {connect_s:.1f} s: "
                        f"{live / connect_s:,.0f} connections/s; fanout CPU {connect_cpu_ms:.2f} ms per "
                        "connection (handshake, auth, subscribe, unread seed, presence join)", flush=True,
                    )  # fmt: skip
                    await asyncio.sleep(3.0)
                    rss_live = rss_bytes(fanout.pid)
                    before = Scrape.take(fanout_port, fanout.pid, r)
                    await asyncio.sleep(min(args.idle_s, max(1.0, deadline - time.monotonic() - 60)))
                    after = Scrape.take(fanout_port, fanout.pid, r)
                    rss_after = rss_bytes(fanout.pid)
                    counts = [await lp.ask(b"report") for lp in loads]
                    if storms:
                        storm_lines = await storms_phase(
                            storms, args, loads, r, database_url, fanout_port, fanout.pid, redis_server.url,
                            lambda: processes_.enter_context(server([fanout_module], fanout_port, env, log_path=args.fanout_log)),
                            (connect_cpu_ms / 1000, live / connect_s),
                        )  # fmt: skip
                finally:
                    await asyncio.gather(*(lp.stop() for lp in loads))
    window = after.at - before.at
    lag_p99, probes = lag_quantile_ms(before.lag_buckets, after.lag_buckets, 0.99)
    lag_p50, _ = lag_quantile_ms(before.lag_buckets, after.lag_buckets, 0.5)
    live = total(counts, "live")
    kib = 1024 * max(live, 1)
    print(f"\nconnections live                 {live:,} (dropped while idle: {total(counts, 'dropped'):,})")
    print(
        f"fanout RSS                       {rss_after / 2**20:,.1f} MiB ({rss_before / 2**20:,.1f} MiB before)"
    )
    print(f"RSS per connection               {(rss_after - rss_before) / kib:,.2f} KiB growth; "
          f"{rss_after / kib:,.2f} KiB total RSS / connections")  # fmt: skip
    print(f"RSS growth while idle            {(rss_after - rss_live) / 2**20:+,.1f} MiB over {window:.0f} s")
    print(f"Redis while idle                 {(after.redis_commands - before.redis_commands) / window:,.1f} ops/s, "
          f"{100 * (after.redis_cpu_s - before.redis_cpu_s) / window:.2f} % of a core")  # fmt: skip
    calls = {k: (v - before.redis_calls.get(k, 0)) / window for k, v in after.redis_calls.items()}
    top = ", ".join(f"{k} {v:,.1f}/s" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:4] if v)
    print(f"  client calls                   {top} (commandstats: scripts' own commands included)")
    print(
        f"fanout CPU while idle            {100 * (after.fanout_cpu_s - before.fanout_cpu_s) / window:.2f} % of a core"
    )
    print(
        f"event loop lag while idle        p50 <= {lag_p50:.1f} ms, p99 <= {lag_p99:.1f} ms ({probes:,} probes)"
    )
    lag_max, _ = lag_quantile_ms(before.lag_buckets, after.lag_buckets, 1.0)
    print(f"event loop lag while idle, max   <= {lag_max:.1f} ms")
    for kind in ("young", "full"):
        count, paused = (
            a - b for a, b in zip(after.gc.get(kind, (0, 0)), before.gc.get(kind, (0, 0)), strict=True)
        )
        mean = f", {1000 * paused / count:.1f} ms each" if count else ""
        print(f"{kind} collections while idle   {count:.0f}{mean} (PARLEY_FANOUT_GC_FULL_EVERY_S="
              f"{os.environ.get('PARLEY_FANOUT_GC_FULL_EVERY_S', '600')})")  # fmt: skip
    print(
        f"load average (1, 5, 15 min)      {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )
    for text in storm_lines:
        print(text)
    print(f"run took                         {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
