"""Soak (`make bench-soak`): a bounded steady mixed load with random kill -9 faults, memory sampled over time.

The whole stack as real processes (Redis AOF always, Postgres, the command API, a projector, two fanouts),
writers with idempotent retries and subscribers that drop and resume, for `--duration` seconds; every
`--fault-every` seconds a projector or a fanout is killed with SIGKILL and restarted. Every `--sample-every`
seconds it samples each process's RSS, Redis `used_memory`, entries not yet projected and dead letters. At
the end it runs the audit (clients' records included) and prints memory at start/middle/end per process:
a Parley process is flat when its RSS at the end is under `--growth` times the middle (the start is
warm-up; a process restarted since the sample before the middle is not judged; Redis and Postgres are
reported, not judged: they hold the data). Exit 0 only when the audit is green, every judged process is
flat, and no dead letter or backlog is left.

The harness (stack, writers, subscribers, audit) is the fault suite's (tests/test_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis.asyncio as aioredis

from benchmarks.machine import describe
from devstack.servers import PostgresServer, RedisServer
from projector.settings import ProjectorSettings
from realtime_fanout.client import Recorder, write_received
from servicekit.settings import Env
from tests.test_faults import USERS, Load, Stack, run_audit, stack, subscriber, wait_projected

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


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def processes(k: Soak) -> dict[str, int | None]:
    found: dict[str, int | None] = {"redis": k.s.redis.pid, "postgres": k.pg.pid}
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
    async with httpx.AsyncClient() as http:
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
    return Sample(time.monotonic() - k.started, memory(k, pids), pids, used, backlog, dead, accepted)


async def writer_loop(load: Load, user: str, until: float) -> None:
    """`Load.writer` rounds (a new conversation, 60 mixed commands) until `until`."""
    while time.monotonic() < until:
        await load.writer(user)


async def faults(k: Soak, every_s: float, until: float, rng: random.Random) -> None:
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        victim = rng.choice([*k.s.projectors, *k.s.fanouts])
        await victim.kill()
        await victim.start()
        k.faults.append(f"{time.monotonic() - k.started:.0f}s kill -9 {Path(victim.log).stem}")


async def sampler(k: Soak, load: Load, every_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        k.samples.append(await sample(k, len(load.accepted)))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def report(k: Soak, growth: float) -> bool:
    first, middle, last = k.samples[0], k.samples[len(k.samples) // 2], k.samples[-1]
    print(
        f"\nmemory (RSS MiB) at {first.at_s:.0f}s / {middle.at_s:.0f}s / {last.at_s:.0f}s; flat: end < {growth:.2f} x middle"
    )
    flat = True
    for name in first.rss_kib:
        values = [s.rss_kib.get(name) for s in (first, middle, last)]
        shown = " / ".join("-" if v is None else f"{v / 1024:.1f}" for v in values)
        warm = k.samples[max(len(k.samples) // 2 - 1, 0)]
        if name in NOT_JUDGED:
            verdict = NOT_JUDGED[name]
        elif not warm.pids.get(name) == middle.pids.get(name) == last.pids.get(name):
            verdict = "restarted since the sample before the middle (not judged)"
        elif values[1] and values[2]:
            ok = values[2] < growth * values[1]
            flat &= ok
            verdict = "flat" if ok else "GROWS"
        else:
            verdict = "not sampled"
        print(f"  {name:<12} {shown:<28} {verdict}")
    mib = [s.used_memory / 2**20 for s in (first, middle, last)]
    print("  redis used_memory " + " / ".join(f"{m:.1f}" for m in mib) + " MiB (grows with the retained log)")
    print("  backlog (entries not projected): " + " / ".join(str(s.backlog) for s in (first, middle, last))
          + f", max {max(s.backlog for s in k.samples)}")  # fmt: skip
    print("  dead letters: " + " / ".join(str(s.dead_letters) for s in (first, middle, last)))
    rate = (last.accepted - first.accepted) / max(last.at_s - first.at_s, 1)
    print(f"  commands accepted: {last.accepted} ({rate:.0f}/s); faults: {len(k.faults)}")
    for line in k.faults:
        print(f"    {line}")
    return flat and last.dead_letters == 0


async def soak(
    duration_s: float, fault_every_s: float, sample_every_s: float, growth: float, seed: int
) -> int:
    print(describe())
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="parley-soak-"))
    ok = await run(tmp, duration_s, fault_every_s, sample_every_s, growth, rng)
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs and clients' records kept in {tmp}")
    return 0 if ok else 1


async def run(tmp: Path, duration_s: float, fault_every_s: float, sample_every_s: float, growth: float,
              rng: random.Random) -> bool:  # fmt: skip
    with (
        RedisServer(tmp / "redis", appendfsync="always") as redis,
        PostgresServer(tmp / "pg", fast=True) as pg,
    ):
        database_url = pg.create_database("parley")
        async with stack(redis, database_url, tmp) as s:
            k = Soak(s, pg, database_url)
            load = Load(f"http://127.0.0.1:{s.api.port}", s.token, rng)
            recorders = [Recorder(f"sub-{user}", user) for user in USERS[:4]]
            done, stop = asyncio.Event(), asyncio.Event()
            subs = [
                asyncio.create_task(subscriber(s, r, done, random.Random(i))) for i, r in enumerate(recorders)
            ]
            await asyncio.sleep(1.0)  # every subscriber live before the load: a null cursor starts at `live`
            watch = asyncio.create_task(sampler(k, load, sample_every_s, stop))
            until = time.monotonic() + duration_s
            await asyncio.gather(faults(k, fault_every_s, until, rng),
                                 *(writer_loop(load, u, until) for u in USERS[:4]))  # fmt: skip
            done.set()
            await asyncio.wait_for(asyncio.gather(*subs), 120)
            await wait_projected(ProjectorSettings.from_env(Env(s.env), auth=False), 120)
            stop.set()
            await watch
            k.samples.append(await sample(k, len(load.accepted)))
            flat = report(k, growth)
            received = tmp / "received.jsonl"
            write_received(received, recorders)
            code, audit = await run_audit(s, received)
            checks = audit["checks"] if isinstance(audit, dict) else []
            print(
                f"audit: exit {code}; "
                + ", ".join(f"{c['name']} {'ok' if c['ok'] else 'FAIL'} ({c['checked']})" for c in checks)
            )
            ok = code == 0 and flat and k.samples[-1].backlog == 0
            if code != 0:
                print(audit)
            return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument(
        "--fault-every", type=float, default=60.0, help="seconds between kill -9 (default 60)"
    )
    parser.add_argument(
        "--sample-every", type=float, default=10.0, help="seconds between samples (default 10)"
    )
    parser.add_argument("--growth", type=float, default=1.2, help="flat: end RSS under this times the middle")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return asyncio.run(soak(args.duration, args.fault_every, args.sample_every, args.growth, args.seed))


if __name__ == "__main__":
    sys.exit(main())
