"""Soak (`make bench-soak`): a bounded steady mixed load with random faults, every process's memory judged.

The whole stack as real processes (Redis AOF always, Postgres, the command API, a projector, two fanouts),
writers with idempotent retries and subscribers that drop and resume, for `--duration` seconds, with a
random fault every `--fault-every` seconds. Until `--restarts-until` (a fraction of the run, default 0.4) a
fault is a kill -9 and restart of the command API, the projector or a fanout; after it, a fault leaves every
process alive (all Redis client connections cut, or a service frozen with SIGSTOP for 2-4 s), so that each
process lives through the whole judged second half. Every `--sample-every` seconds it samples each process's
RSS, Redis `used_memory`, entries not yet projected and dead letters, and prints a row a minute; and each
service's heap as the interpreter and glibc see it (servicekit.memstats: blocks the interpreter holds,
malloc's bytes in use and free-but-kept), so RSS growth can be told apart as live objects or allocator
retention (reported, not judged).

Verdict (exit 0 only when all hold), the first half being warm-up (caches fill, restarted processes
bootstrap): every service process is flat, i.e. the median RSS of the last 3 samples is under the median of
the first 3 of the second half times (1 + `--growth`) (default 5%: an unbounded per-connection or per-event
leak grows far faster under this load; a fanout leaked +70 MiB in 4 minutes); dead letters do not grow
(none at all); entries not projected do not grow (the backlog's least-squares slope over the second half is
under 1% of the command rate, and it is 0 once the load stops); the audit (clients' records included) is
green. Redis and Postgres are reported, not judged: they hold the data, which grows with the log. The load
is steady: each writer goes round 5 conversations of its own (`--conversations-per-writer`; 0 makes a new
one every round, and then what every process holds per conversation, and each connection per conversation
of its user, grows with the log by design). The fanouts' entry-check message ids are capped at 5,000
(`--ledger-ids`) and the projector's cached conversation states at 5,000 messages (`--cache-messages`), so
those caps are reached in the warm-up half and their plateau is what is judged.

The harness (stack, writers, subscribers, audit) is the fault suite's (tests/test_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis.asyncio as aioredis

from benchmarks.machine import describe
from benchmarks.profiling import top_growth
from devstack.servers import PostgresServer, RedisServer
from projector.settings import ProjectorSettings
from realtime_fanout.client import Recorder, write_received
from servicekit.settings import Env
from tests.test_faults import USERS, Load, Service, Stack, run_audit, stack, subscriber, wait_projected

HEAP_GAUGES = re.compile(r'^parley_(python_allocated_blocks|malloc_bytes\{field="\w+"\}) (\S+)$', re.M)
HEAP_COLUMNS = {  # gauge -> column, scale
    "python_allocated_blocks": ("blocks k", 1e3),
    'malloc_bytes{field="uordblks"}': ("malloc in use MiB", 2**20),
    'malloc_bytes{field="fordblks"}': ("malloc free MiB", 2**20),
    'malloc_bytes{field="arena"}': ("malloc heap MiB", 2**20),
    'malloc_bytes{field="hblkhd"}': ("malloc mmap MiB", 2**20),
    "rss_heap": ("RSS brk heap MiB", 2**20),
    "rss_anon_mmap": ("RSS anon mmap MiB", 2**20),  # less malloc mmap: pymalloc arenas (and stacks)
}
NOT_JUDGED = {
    "redis": "reported (grows with the retained log up to the retention window)",
    "postgres": "reported (shared buffers fill as the database grows; summed over backends)",
}


@dataclass
class Sample:
    at_s: float
    rss_kib: dict[str, int | None]
    pids: dict[str, int | None]
    used_memory: int
    backlog: int
    dead_letters: int
    accepted: int
    heap: dict[str, dict[str, float]] = field(default_factory=dict)  # service -> memstats gauges


@dataclass
class Soak:
    s: Stack
    pg: PostgresServer
    database_url: str
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mappings_kib(pid: int | None) -> dict[str, float]:
    """RSS of the brk heap (glibc's main arena) and of anonymous mmaps (pymalloc's 1 MiB arenas, glibc's
    other arenas and large blocks, thread stacks), from /proc/PID/smaps; {} when gone."""
    heap = anon = 0
    name = ""
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                head = line.split()
                if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                    name = head[5] if len(head) > 5 else ""
                elif head and head[0] == "Rss:":
                    if name == "[heap]":
                        heap += int(head[1])
                    elif name == "":
                        anon += int(head[1])
    except (OSError, ValueError):
        return {}
    return {"rss_heap": heap * 1024.0, "rss_anon_mmap": anon * 1024.0}


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def processes(k: Soak) -> dict[str, int | None]:
    redis = k.s.redis.pid if isinstance(k.s.redis, RedisServer) else None  # the soak runs one Redis
    found: dict[str, int | None] = {"redis": redis, "postgres": k.pg.pid}
    for service in k.s.services():
        found[Path(service.log).stem] = service.proc.pid if service.proc else None
    return found


def memory(k: Soak, pids: dict[str, int | None]) -> dict[str, int | None]:
    out = {name: rss_kib(pid) for name, pid in pids.items()}
    if k.pg.pid is not None:  # the postmaster and its backends (shared buffers counted in each)
        out["postgres"] = sum(rss_kib(p) or 0 for p in [k.pg.pid, *children(k.pg.pid)])
    return out


async def sample(k: Soak, accepted: int) -> Sample:
    client = aioredis.Redis.from_url(k.s.redis.url)
    try:
        used = int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()
    backlog = 0
    heap: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient() as http:
        for service in k.s.services():
            try:
                text = (await http.get(f"http://127.0.0.1:{service.port}/metrics", timeout=5)).text
            except httpx.HTTPError:
                continue
            gauges = {name: float(value) for name, value in HEAP_GAUGES.findall(text)}
            heap[Path(service.log).stem] = {
                **gauges,
                **mappings_kib(service.proc.pid if service.proc else None),
            }
        for service in k.s.projectors:
            try:
                text = (await http.get(f"http://127.0.0.1:{service.port}/metrics", timeout=5)).text
            except httpx.HTTPError:
                continue
            backlog += int(
                sum(float(v) for v in re.findall(r"^parley_projector_lag_events\{.*\} (\S+)", text, re.M))
            )
    async with await psycopg.AsyncConnection.connect(k.database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM parley_store.dead_letters")
        row = await cur.fetchone()
        dead = int(row[0]) if row else 0
    pids = processes(k)
    return Sample(time.monotonic() - k.started, memory(k, pids), pids, used, backlog, dead, accepted, heap)


async def writer_loop(load: Load, user: str, until: float) -> None:
    """`Load.writer` rounds (a new conversation, 60 mixed commands) until `until`."""
    while time.monotonic() < until:
        await load.writer(user)


async def faults(k: Soak, every_s: float, restarts_until: float, until: float, rng: random.Random) -> None:
    """A kill -9 and restart before `restarts_until`; after it, a fault every process survives."""
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        if time.monotonic() < restarts_until:
            victim = rng.choice(k.s.services())
            await victim.kill()
            await victim.start()
            what = f"kill -9 {Path(victim.log).stem}"
        elif rng.random() < 0.5:
            client = aioredis.Redis.from_url(k.s.redis.url)
            try:
                cut = await client.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
                )
            finally:
                await client.aclose()
            what = f"Redis connections cut ({cut})"
        else:
            victim, frozen_s = rng.choice(k.s.services()), rng.uniform(2.0, 4.0)
            victim.signal(signal.SIGSTOP)
            await asyncio.sleep(frozen_s)
            victim.signal(signal.SIGCONT)
            what = f"SIGSTOP {Path(victim.log).stem} for {frozen_s:.1f}s"
        k.faults.append(f"{time.monotonic() - k.started:.0f}s {what}")


async def sampler(k: Soak, load: Load, every_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        k.samples.append(await sample(k, len(load.accepted)))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def table(k: Soak, names: list[str], every_s: float) -> None:
    """A row per `every_s` of the samples (and the last): RSS per process, Redis used_memory, backlog."""
    head = ["t s", "accepted", *names, "redis used", "backlog", "dead"]
    print("\nRSS MiB per process (Redis used_memory MiB; entries not projected; dead letters):")
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    shown = -every_s
    for sample in k.samples:
        if sample.at_s - shown < every_s and sample is not k.samples[-1]:
            continue
        shown = sample.at_s
        rss = [sample.rss_kib.get(n) for n in names]
        cells = [f"{sample.at_s:.0f}", str(sample.accepted), *("-" if v is None else f"{v / 1024:.1f}" for v in rss),
                 f"{sample.used_memory / 2**20:.1f}", str(sample.backlog), str(sample.dead_letters)]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def heap_table(k: Soak, half: list[Sample], every_s: float) -> None:
    """Per service, a row per `every_s`: RSS beside the interpreter's blocks and glibc's bytes; then each
    column's change over the second half (live objects grow with `blocks` and `in use`, retention with
    `free` or with RSS alone)."""
    for name in sorted({n for s in k.samples for n in s.heap}):
        rows = [s for s in k.samples if name in s.heap]
        head = ["t s", "RSS MiB", *(column for column, _ in HEAP_COLUMNS.values())]
        print(f"\n{name}: RSS beside the live heap (interpreter blocks, glibc mallinfo2):")
        print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
        shown = -every_s
        for sample in rows:
            if sample.at_s - shown < every_s and sample is not rows[-1]:
                continue
            shown = sample.at_s
            rss = sample.rss_kib.get(name)
            cells = [f"{sample.at_s:.0f}", "-" if rss is None else f"{rss / 1024:.1f}",
                     *(f"{sample.heap[name].get(g, 0) / scale:.1f}" for g, (_, scale) in HEAP_COLUMNS.items())]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        judged = [s for s in half if name in s.heap and s.rss_kib.get(name)]
        window = min(3, max(len(judged) // 2, 1))
        if len(judged) < 2:
            continue

        def change(
            value: Callable[[Sample], float], unit: str, scale: float, rows: list[Sample] = judged
        ) -> str:
            start = statistics.median(value(s) for s in rows[:window])  # noqa: B023  (called at once)
            end = statistics.median(value(s) for s in rows[-window:])  # noqa: B023
            per_min = slope([(s.at_s, value(s)) for s in rows]) * 60 / scale
            return f"{start / scale:.1f} -> {end / scale:.1f} {unit} ({per_min:+.2f}/min)"

        parts = [f"RSS {change(lambda s: float(s.rss_kib[name] or 0) * 1024, 'MiB', 2**20)}"]  # noqa: B023
        for gauge, (column, scale) in HEAP_COLUMNS.items():
            unit = "k" if scale == 1e3 else "MiB"
            value = functools.partial(lambda s, g: s.heap[name].get(g, 0.0), g=gauge)  # noqa: B023
            parts.append(f"{column.rsplit(' ', 1)[0]} {change(value, unit, scale)}")
        print(f"  second half: {'; '.join(parts)}")


def report(k: Soak, growth: float, load_end_s: float) -> bool:
    """Print the table and the verdict per process; True when every judged criterion holds."""
    loaded = [s for s in k.samples if s.at_s <= load_end_s]
    half = [s for s in loaded if s.at_s >= load_end_s / 2]
    first, last = loaded[0], loaded[-1]
    names = list(first.rss_kib)
    table(k, names, 60.0)
    window = min(3, max(len(half) // 2, 1))
    print(f"\nsecond half {half[0].at_s:.0f}-{half[-1].at_s:.0f}s ({len(half)} samples): flat when the median of "
          f"the last {window} is under (1 + {growth:.0%}) x the median of the first {window}")  # fmt: skip
    ok = True
    for name in names:
        values = [s.rss_kib.get(name) for s in half]
        pids = {s.pids.get(name) for s in half}
        if name in NOT_JUDGED:
            verdict = NOT_JUDGED[name]
        elif None in values or len(pids) != 1:
            verdict, ok = "RESTARTED OR GONE in the second half", False
        else:
            start = statistics.median(v for v in values[:window] if v is not None) / 1024
            end = statistics.median(v for v in values[-window:] if v is not None) / 1024
            flat = end < start * (1 + growth)
            ok &= flat
            per_min = slope([(s.at_s, (s.rss_kib[name] or 0) / 1024) for s in half]) * 60
            verdict = (f"{start:.1f} -> {end:.1f} MiB ({end / start - 1:+.1%}, {per_min:+.2f} MiB/min): "
                       + ("flat" if flat else "GROWS"))  # fmt: skip
        print(f"  {name:<12} {verdict}")
    mib = [s.used_memory / 2**20 for s in (first, half[0], last)]
    print(
        "  redis used_memory " + " / ".join(f"{m:.1f}" for m in mib) + " MiB at start / middle / end of load"
    )
    rate = (last.accepted - first.accepted) / max(last.at_s - first.at_s, 1)
    backlog_slope = slope([(s.at_s, float(s.backlog)) for s in half])
    drained = k.samples[-1].backlog == 0
    pending_ok = backlog_slope < 0.01 * max(rate, 1) and drained
    print(f"  entries not projected: max {max(s.backlog for s in half)} in the second half, slope "
          f"{backlog_slope:+.2f}/s (bound {0.01 * max(rate, 1):.2f}/s), {k.samples[-1].backlog} after the load: "
          + ("no growth" if pending_ok else "GROWS"))  # fmt: skip
    dead = [s.dead_letters for s in k.samples]
    print(f"  dead letters: max {max(dead)}, at the end {dead[-1]}" + ("" if max(dead) == 0 else ": FAIL"))
    print(f"  commands accepted: {last.accepted} ({rate:.0f}/s); faults: {len(k.faults)}")
    for line in k.faults:
        print(f"    {line}")
    heap_table(k, half, 60.0)
    return ok and pending_ok and max(dead) == 0


@dataclass(frozen=True)
class Plan:
    duration_s: float
    fault_every_s: float
    restarts_until: float  # fraction of the run
    sample_every_s: float
    growth: float
    service_env: tuple[tuple[str, str, str], ...] = ()  # (service, variable, value)
    service_module: tuple[tuple[str, str], ...] = ()  # (service, module run with -m)
    profile: Path | None = None  # tracemalloc snapshots of the services run under benchmarks.profiled_*
    ledger_ids: int = 5_000
    keep: int = 5
    cache_messages: int = 5_000


async def soak(plan: Plan, seed: int) -> int:
    print(describe())
    print("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="parley-soak-"))
    ok = await run(tmp, plan, rng)
    print("load average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs and clients' records kept in {tmp}")
    return 0 if ok else 1


async def run(tmp: Path, plan: Plan, rng: random.Random) -> bool:
    with (
        RedisServer(tmp / "redis", appendfsync="always") as redis,
        PostgresServer(tmp / "pg", fast=True) as pg,
    ):
        database_url = pg.create_database("parley")
        async with stack(
            redis, database_url, tmp, PARLEY_FANOUT_LEDGER_IDS=str(plan.ledger_ids),
            PARLEY_PROJECTOR_CACHE_MESSAGES=str(plan.cache_messages),
        ) as s:  # fmt: skip
            # A client keeps its token (valid an hour) across commands and reconnects. A fresh one per call
            # would grow each service's cache of verified tokens (4,096) all through the run: bounded, but
            # not the steady state the soak judges.
            s.keep_tokens()
            await configure(s, plan)
            k = Soak(s, pg, database_url)
            load = Load(f"http://127.0.0.1:{s.api.port}", s.token, rng, keep=plan.keep)
            recorders = [Recorder(f"sub-{user}", user) for user in USERS[:4]]
            done, stop = asyncio.Event(), asyncio.Event()
            subs = [
                asyncio.create_task(subscriber(s, r, done, random.Random(i))) for i, r in enumerate(recorders)
            ]
            await asyncio.sleep(1.0)  # every subscriber live before the load: a null cursor starts at `live`
            k.started = time.monotonic()
            watch = asyncio.create_task(sampler(k, load, plan.sample_every_s, stop))
            profiled = [v for v in s.services() if v.module.startswith("benchmarks.profiled")]
            halfway = asyncio.get_running_loop().call_later(plan.duration_s / 2, snapshot, profiled)
            until = k.started + plan.duration_s
            restarts_until = k.started + plan.restarts_until * plan.duration_s
            await asyncio.gather(faults(k, plan.fault_every_s, restarts_until, until, rng),
                                 *(writer_loop(load, u, until) for u in USERS[:4]))  # fmt: skip
            k.samples.append(await sample(k, len(load.accepted)))
            load_end_s = k.samples[-1].at_s
            halfway.cancel()
            snapshot(profiled)
            done.set()
            await asyncio.wait_for(asyncio.gather(*subs), 120)
            await wait_projected(ProjectorSettings.from_env(Env(s.env), auth=False), 120)
            stop.set()
            await watch
            k.samples.append(await sample(k, len(load.accepted)))
            judged = report(k, plan.growth, load_end_s)
            if plan.profile is not None:
                await asyncio.sleep(5.0)  # each dump collects and writes a snapshot
                for v in profiled:
                    print(
                        f"\n{Path(v.log).stem}: traced growth from the second half's start to the load's end"
                    )
                    print("\n".join(top_growth(plan.profile / Path(v.log).stem, 1, 2)))
            received = tmp / "received.jsonl"
            write_received(received, recorders)
            code, audit = await run_audit(s, received)
            checks = audit["checks"] if isinstance(audit, dict) else []
            print(
                f"audit: exit {code}; "
                + ", ".join(f"{c['name']} {'ok' if c['ok'] else 'FAIL'} ({c['checked']})" for c in checks)
            )
            if code != 0:
                print(audit)
            return code == 0 and judged


def snapshot(services: list[Service]) -> None:
    for service in services:
        service.signal(signal.SIGUSR1)


async def configure(s: Stack, plan: Plan) -> None:
    """Each named service's module and variables; those changed restart (both are read at start)."""
    by_name = {Path(v.log).stem: v for v in s.services()}
    if unknown := {n for n, *_ in (*plan.service_env, *plan.service_module)} - by_name.keys():
        raise SystemExit(f"no such service: {', '.join(sorted(unknown))} (one of {', '.join(by_name)})")
    for name, module in plan.service_module:
        by_name[name].module = module
        if plan.profile is not None:
            by_name[name].env["PARLEY_PROFILE_DIR"] = str(plan.profile / name)
    for name, variable, value in plan.service_env:
        by_name[name].env[variable] = value
    for name in {e[0] for e in plan.service_env} | {m[0] for m in plan.service_module}:
        await by_name[name].stop()
        await by_name[name].start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults (default 60)")
    parser.add_argument("--restarts-until", type=float, default=0.4,
                        help="fraction of the run with kill -9 faults; later faults kill nothing (default 0.4)")  # fmt: skip
    parser.add_argument(
        "--sample-every", type=float, default=10.0, help="seconds between samples (default 10)"
    )
    parser.add_argument("--growth", type=float, default=0.05,
                        help="flat: RSS grows by less than this fraction over the second half (default 0.05)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--service-env", action="append", default=[], metavar="NAME:VAR=VALUE",
                        help="set VAR for one service (api, projector0, fanout0, fanout1: an A/B of a setting "
                             "in one run); repeatable")  # fmt: skip
    parser.add_argument("--service-module", action="append", default=[], metavar="NAME:MODULE",
                        help="run a service as `python -m MODULE` (benchmarks.profiled_fanout, "
                             "benchmarks.profiled_projector: under tracemalloc); repeatable")  # fmt: skip
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="snapshots of the profiled services at half time and at the load's end into "
                             "DIR/NAME, and the lines that grew between them")  # fmt: skip
    parser.add_argument("--ledger-ids", type=int, default=5_000,
                        help="the fanouts' PARLEY_FANOUT_LEDGER_IDS (default 5000, reached in the warm-up half; "
                             "the shipped 250,000 fills for hours at this rate, so its plateau is not judged)")  # fmt: skip
    parser.add_argument("--cache-messages", type=int, default=5_000,
                        help="the projector's PARLEY_PROJECTOR_CACHE_MESSAGES (default 5000, reached in the warm-up "
                             "half; the shipped 500,000 takes hours here)")  # fmt: skip
    parser.add_argument("--conversations-per-writer", type=int, default=5,
                        help="each writer goes round this many conversations of its own, so what a user is in "
                             "stops growing (a steady state); 0: a new conversation every round (default 5)")  # fmt: skip
    args = parser.parse_args(argv)
    service_module = tuple((n, m) for n, m in (spec.split(":", 1) for spec in args.service_module))
    service_env = tuple(
        (name, *pair.split("=", 1)) for name, pair in (spec.split(":", 1) for spec in args.service_env)
    )
    plan = Plan(args.duration, args.fault_every, args.restarts_until, args.sample_every, args.growth,
                service_env, service_module, args.profile, args.ledger_ids, args.conversations_per_writer,
                args.cache_messages)  # fmt: skip
    return asyncio.run(soak(plan, args.seed))


if __name__ == "__main__":
    sys.exit(main())
