"""Fanout benchmark: Parley vs a bare `websockets` broadcast ceiling vs the Django Channels seed stack.

Phases (same machine, same run, each bounded in time):
  1. ceiling      bare websockets server broadcasting prebuilt frames to each message's members
  2. saturation   Parley: messages appended straight to the log as fast as possible, deliveries/s
  3. end to end   Parley: messages sent over HTTP to the command API at a fixed rate, latency p50/p99
  4. seed stack   Django Channels + channels_redis + daphne: the same fixed-rate load, then saturation
  5. idle memory  Parley: RSS growth of the fanout process per idle authenticated connection
  6. resume       Parley: one client resumes 10,000 missed events from its cursor
Run: make bench-fanout   (python -m benchmarks.fanout --help for the knobs)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import websockets

from benchmarks.fanout_load import FanoutLoad, Tally, wait_quiet
from benchmarks.looplag import gc_pauses, lag_buckets, lag_quantile_ms
from benchmarks.machine import HostShare, describe
from benchmarks.processes import server
from benchmarks.projector import Cpu
from command_api import commands
from command_api.append import Appender
from command_api.bodies import CreateConversation, SendMessage
from command_api.commands import Context
from devstack.binaries import redis_server_binary
from devstack.ports import free_port
from devstack.servers import PostgresServer, RedisServer
from events.cursor import decode_cursor
from events.layout import LogLayout
from events.redisclient import redis_client
from servicekit.auth_settings import AuthSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token

SECRET = "bench-secret-" + "x" * 32
PARTITIONS = 8
_decoder = msgspec.json.Decoder()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def service(module: str, env: dict[str, str], port: int) -> AbstractContextManager[subprocess.Popen[bytes]]:
    return server([module], port, env)


class Stack:
    """Environment of one Parley log: namespace, tokens, and an appender for direct appends."""

    def __init__(self, redis_url: str, database_url: str, namespace: str, cluster: bool = False) -> None:
        self.namespace = namespace
        self.env = {
            **os.environ, "REDIS_URL": redis_url, "PARLEY_REDIS_CLUSTER": "1" if cluster else "0",
            "DATABASE_URL": database_url,
            "PARLEY_LOG_NAMESPACE": namespace, "PARLEY_PARTITIONS": str(PARTITIONS),
            "PARLEY_JWT_SECRET": SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_RATE_LIMIT_PER_S": "0",
            "PARLEY_FANOUT_MAX_BUFFER_BYTES": str(8 << 20),
        }  # fmt: skip
        self.auth = AuthSettings.from_env(Env(self.env))
        self.redis = redis_client(redis_url, 30, cluster=cluster)
        self.appender = Appender(self.redis, LogLayout(namespace, PARTITIONS))

    def token(self, user: str) -> str:
        return mint_token(self.auth, user, ttl_s=3600)

    async def create_conversations(self, load: FanoutLoad) -> None:
        await self.appender.open()
        members = load.members_of()
        await asyncio.gather(*(
            self.appender.append(commands.create_conversation_with_id(
                Context(actor=f"u{ids[0]}"), CreateConversation(title=c, participants=[f"u{i}" for i in ids]), c,
            ))
            for c, ids in members.items()
        ))  # fmt: skip

    async def close(self) -> None:
        await self.appender.close()
        await self.redis.aclose()


def _message_ids(frame: dict[str, Any]) -> Iterator[tuple[str, float, float]]:
    """(message id, when the sender sent it, when the command API built the event) of each message."""
    events = frame["events"] if frame["type"] == "events" else [frame["event"]]
    for event in events:
        payload = event["payload"]
        if payload["type"] == "message_sent":
            message_id, sent = payload["body"].split("|")
            logged = datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00")).timestamp()
            yield message_id, float(sent), logged


SPLIT_EVERY = 10
"""Every this many subscribers also split each delivery's latency at its append (decoding cursors costs)."""
_LAYOUT = LogLayout("split", PARTITIONS)


def appended_at(cursor: str, conversation_id: str) -> float:
    """When Redis appended the last event a frame's cursor is after: its stream id's milliseconds."""
    position = decode_cursor(cursor).positions[_LAYOUT.partition_for(conversation_id)]
    return int(position.split("-", 1)[0]) / 1000


async def parley_subscriber(
    port: int, stack: Stack, index: int, tally: Tally, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    try:
        await _parley_subscriber(port, stack, index, tally, ready, stop)
    except websockets.ConnectionClosed:
        tally.disconnects += 1  # reported: a dropped subscriber shows up as lost deliveries


async def _parley_subscriber(
    port: int, stack: Stack, index: int, tally: Tally, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/v1/stream",
        compression=None,
        max_queue=None,
        open_timeout=30,
        ping_interval=None,  # the server sends the heartbeats; a busy measuring loop must not time out
    ) as ws:
        await ws.send(msgspec.json.encode({"type": "auth", "token": stack.token(f"u{index}")}).decode())
        await ws.send('{"type":"subscribe"}')
        async for raw in ws:
            frame = _decoder.decode(raw)
            if frame["type"] == "live":
                ready.set()
            elif frame["type"] in ("event", "events"):
                logged = 0.0
                for message_id, sent, logged in _message_ids(frame):
                    tally.record(index, message_id, sent, logged)
                if logged and index % SPLIT_EVERY == 0:
                    last = frame["events"][-1] if frame["type"] == "events" else frame["event"]
                    tally.record_append(logged, appended_at(frame["cursor"], last["conversation_id"]))


async def connect_all(starters: list[Any], timeout_s: float) -> list[asyncio.Task[Any]]:
    tasks = []
    for start in starters:
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(start(ready)))
        await asyncio.wait_for(ready.wait(), timeout_s)
    return tasks


class OwnLag:
    """The benchmark process's own event loop lag (it runs every receiving client): a probe sleeping
    `every_s`, its lateness kept, so a latency tail that is the harness's shows as such."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s = every_s
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.every_s)
            self.lags_s.append(max(0.0, time.perf_counter() - started - self.every_s))

    def __enter__(self) -> OwnLag:
        self._task = asyncio.get_running_loop().create_task(self._probe())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.lags_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def parley_phase(
    load: FanoutLoad,
    stack: Stack,
    fanout_port: int,
    api_port: int | None,
    tag: str,
    measure: Sequence[AbstractContextManager[Any]] = (),
) -> tuple[Tally, int, float]:
    """Subscribe everyone, send the load (over HTTP when `api_port`), count what arrives; each of
    `measure` is entered once everyone is subscribed and left once the deliveries arrived."""
    tally, stop = Tally(), asyncio.Event()
    tasks = await connect_all(
        [
            lambda r, i=i: parley_subscriber(fanout_port, stack, i, tally, r, stop)
            for i in range(load.subscribers)
        ],
        30,
    )
    members = load.members_of()
    # The measuring client's own collector pauses would be counted as server latency: pause it while
    # measuring (its garbage is freed by reference counting; it is re-enabled right after).
    gc.collect()
    gc.disable()
    with ExitStack() as measuring:
        for probe in measure:
            measuring.enter_context(probe)
        started = time.perf_counter()
        if api_port is None:
            pending: list[Any] = []
            for n, (c, message_id) in enumerate(load.sends()):
                message_id = f"{tag}-{message_id}"
                actor = f"u{members[c][n % len(members[c])]}"
                body = SendMessage(body=f"{message_id}|{time.time()}", message_id=message_id)
                pending.append(stack.appender.append(commands.send_message(Context(actor=actor), c, body)))
                if len(pending) >= 512:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
        else:
            sends = []
            for n, (c, message_id) in enumerate(load.sends()):
                sender = f"u{members[c][n % len(members[c])]}"
                sends.append([c, stack.token(sender), f"{tag}-{message_id}"])
            plan = {"port": api_port, "rate_per_s": load.rate_per_s, "connections": 32, "sends": sends}
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(plan, f)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.sender", f.name, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            os.unlink(f.name)
            statuses = json.loads(out)
            if set(statuses) != {"202"}:
                raise RuntimeError(f"sender got {statuses}")
        publish_s = time.perf_counter() - started
        expected = load.expected_deliveries()
        await wait_quiet(tally, expected, quiet_s=3.0, deadline=time.perf_counter() + load.max_seconds)
    gc.enable()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally, expected, publish_s


async def ceiling_phase(load: FanoutLoad) -> Tally:
    port = free_port()
    args = [str(x) for x in (port, load.subscribers, load.conversations, load.per_subscriber, load.messages)]
    tally, stop = Tally(), asyncio.Event()
    with server(["benchmarks.baselines.ws_broadcast", *args], port, ready_path=None):

        async def subscriber(index: int, ready: asyncio.Event) -> None:
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/?i={index}", compression=None, max_queue=None, ping_interval=None
            ) as ws:
                ready.set()
                async for raw in ws:
                    message = _decoder.decode(raw)
                    tally.record(index, message["id"], message["sent"])

        tasks = await connect_all([lambda r, i=i: subscriber(i, r) for i in range(load.subscribers)], 30)
        await asyncio.sleep(0.5)
        gc.collect()
        gc.disable()  # as in parley_phase: the measuring client's pauses are not the server's
        async with websockets.connect(f"ws://127.0.0.1:{port}/start") as control:
            await wait_quiet(
                tally,
                load.expected_deliveries(),
                quiet_s=3.0,
                deadline=time.perf_counter() + load.max_seconds,
            )
            await control.recv()
        gc.enable()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally


async def idle_memory_phase(stack: Stack, connections: int) -> float:
    """Bytes of fanout RSS per idle authenticated, subscribed connection."""
    port = free_port()
    env = {**stack.env, "PARLEY_FANOUT_PORT": str(port)}
    with service("realtime_fanout", env, port) as proc:
        await asyncio.sleep(1.0)
        before = rss_bytes(proc.pid)
        sockets: list[Any] = []

        async def open_one(i: int) -> None:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/v1/stream", compression=None, open_timeout=60
            )
            await ws.send(msgspec.json.encode({"type": "auth", "token": stack.token(f"idle{i}")}).decode())
            await ws.send('{"type":"subscribe"}')
            while _decoder.decode(await ws.recv())["type"] != "live":
                pass
            sockets.append(ws)

        for start in range(0, connections, 250):
            await asyncio.gather(*(open_one(i) for i in range(start, min(connections, start + 250))))
        await asyncio.sleep(2.0)
        after = rss_bytes(proc.pid)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return (after - before) / connections


async def resume_phase(stack: Stack, fanout_port: int, missed: int) -> float:
    """Seconds from a reconnect with a cursor until all `missed` events arrived."""
    await stack.appender.append(commands.create_conversation_with_id(
        Context(actor="resumer"), CreateConversation(title="r"), "resume-conv"
    ))  # fmt: skip
    url = f"ws://127.0.0.1:{fanout_port}/v1/stream"
    auth = msgspec.json.encode({"type": "auth", "token": stack.token("resumer")}).decode()
    async with websockets.connect(url, compression=None) as ws:
        await ws.send(auth)
        await ws.send('{"type":"subscribe"}')
        while (frame := _decoder.decode(await ws.recv()))["type"] != "live":
            pass
        cursor = frame["cursor"]
    for start in range(0, missed, 512):
        await asyncio.gather(*(
            stack.appender.append(commands.send_message(
                Context(actor="resumer"), "resume-conv", SendMessage(body=f"r{n}|0")
            ))
            for n in range(start, min(missed, start + 512))
        ))  # fmt: skip
    received = 0
    async with websockets.connect(url, compression=None, max_queue=None, max_size=None) as ws:
        started = time.perf_counter()
        await ws.send(auth)
        await ws.send(msgspec.json.encode({"type": "subscribe", "cursor": cursor}).decode())
        deadline = started + 30
        while received < missed and time.perf_counter() < deadline:
            frame = _decoder.decode(await asyncio.wait_for(ws.recv(), 30))
            if frame["type"] in ("event", "events"):
                received += sum(1 for _ in _message_ids(frame))
        elapsed = time.perf_counter() - started
    if received != missed:
        raise RuntimeError(f"resume delivered {received} of {missed}")
    return elapsed


def line(name: str, tally: Tally, expected: int, extra: str = "") -> str:
    return (
        f"{name:<34} {tally.rate():>10,.0f} deliveries/s   delivered {tally.unique:,}/{expected:,}   "
        f"lost {expected - tally.unique:,}   dup {tally.duplicates}   disconnects {tally.disconnects}   "
        f"p50 {tally.percentile_ms(0.5):7.2f} ms   p99 {tally.percentile_ms(0.99):7.2f} ms {extra}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--per-subscriber", type=int, default=3)
    parser.add_argument("--saturation-messages", type=int, default=10_000)
    parser.add_argument("--rate-deliveries", type=float, default=10_000, help="end-to-end offered load")
    parser.add_argument("--e2e-seconds", type=float, default=10)
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument("--resume-events", type=int, default=10_000)
    parser.add_argument("--skip-channels", action="store_true")
    args = parser.parse_args()

    shape = dict(
        subscribers=args.subscribers, conversations=args.conversations, per_subscriber=args.per_subscriber
    )
    saturation = FanoutLoad(**shape, messages=args.saturation_messages)
    per_message = saturation.expected_deliveries() / saturation.messages
    rate = args.rate_deliveries / per_message
    fixed = FanoutLoad(**shape, messages=int(rate * args.e2e_seconds), rate_per_s=rate)
    results: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        with (
            RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis,
            PostgresServer(Path(tmp) / "pg", fast=True) as postgres,
        ):
            database_url = postgres.create_database("parley")
            print(f"machine: {describe(str(redis_server_binary()))}")
            print(
                f"load: {args.subscribers} subscribers, {args.conversations} conversations, each subscriber in "
                f"{args.per_subscriber}: {per_message:.0f} recipients per message\n"
            )
            ceiling = await ceiling_phase(saturation)
            results.append(
                line("bare websockets broadcast ceiling", ceiling, saturation.expected_deliveries())
            )
            print(results[-1], flush=True)

            stack = Stack(redis.url, database_url, "sat")
            fanout_port, api_port = free_port(), free_port()
            env = {**stack.env, "PARLEY_FANOUT_PORT": str(fanout_port), "PARLEY_API_PORT": str(api_port)}
            await stack.create_conversations(saturation)
            with (
                service("realtime_fanout", env, fanout_port) as fanout_proc,
                service("command_api", env, api_port) as api_proc,
            ):
                tally, expected, _ = await parley_phase(saturation, stack, fanout_port, None, "sat")
                sat = tally
                results.append(line("Parley fanout, saturation", tally, expected))
                print(results[-1], flush=True)
                lag_before, gc_before = lag_buckets(fanout_port), gc_pauses(fanout_port)
                own = OwnLag()
                host = HostShare()
                assert redis.pid is not None and postgres.pid is not None
                servers = {"fanout": fanout_proc.pid, "command API": api_proc.pid, "redis": redis.pid}
                cpu = Cpu({**servers, "postgres": postgres.pid}, here="receivers")
                measured = time.perf_counter()
                tally, expected, publish_s = await parley_phase(
                    fixed, stack, fanout_port, api_port, "e2e", measure=(own, host, cpu)
                )
                measured = time.perf_counter() - measured
                lag_p99, probes = lag_quantile_ms(lag_before, lag_buckets(fanout_port), 0.99)
                collected = {
                    kind: (
                        count - gc_before.get(kind, (0.0, 0.0))[0],
                        total - gc_before.get(kind, (0.0, 0.0))[1],
                    )
                    for kind, (count, total) in gc_pauses(fanout_port).items()
                }
                e2e = tally
                results.append(line(f"Parley end to end at {args.rate_deliveries:,.0f}/s", tally, expected,
                                    f"(HTTP command -> receipt; sent in {publish_s:.1f} s)"))  # fmt: skip
                print(results[-1], flush=True)
                results.append(
                    f"{'  of which API accepted -> receipt':<34} p50 {tally.fanout_percentile_ms(0.5):7.2f} ms   "
                    f"p99 {tally.fanout_percentile_ms(0.99):7.2f} ms (event built by the API, appended, fanned out)"
                )
                print(results[-1], flush=True)
                (built50, fan50), (built99, fan99) = (
                    tally.split_percentile_ms(0.5),
                    tally.split_percentile_ms(0.99),
                )
                results.append(
                    f"{'    built -> appended (Redis clock)':<34} p50 {built50:7.2f} ms   p99 {built99:7.2f} ms "
                    f"(the command API and Redis; {len(tally.built_to_appended_s):,} frames of every "
                    f"{SPLIT_EVERY}th subscriber, ms resolution)"
                )
                print(results[-1], flush=True)
                results.append(
                    f"{'    appended -> receipt':<34} p50 {fan50:7.2f} ms   p99 {fan99:7.2f} ms (the fanout and the receivers)"
                )
                print(results[-1], flush=True)
                results.append(
                    f"{'  fanout event loop lag':<34} p99 <= {lag_p99:5.1f} ms ({probes:,} probes of its scheduling "
                    "delay in the same phase)"
                )
                print(results[-1], flush=True)
                pauses = ", ".join(
                    f"{int(n)} {kind} ({total / n * 1000:.1f} ms each)"
                    for kind, (n, total) in collected.items()
                    if n
                )
                results.append(f"{'  fanout scheduled collections':<34} {pauses or 'none'} in the same phase")
                print(results[-1], flush=True)
                results.append(
                    f"{'  harness (receivers) loop lag':<34} p50 {own.quantile_ms(0.5):5.1f} ms   p99 "
                    f"{own.quantile_ms(0.99):5.1f} ms (every receiving client runs in this process: its lag is "
                    "in every latency above and is the harness's, not Parley's)"
                )
                print(results[-1], flush=True)
                shares = ", ".join(f"{name} {spent / measured:.0%}" for name, spent in cpu.spent().items())
                results.append(f"{'  host, same phase':<34} {host.summary()}; of a core: {shares}")
                print(results[-1], flush=True)
                resume_s = await resume_phase(stack, fanout_port, args.resume_events)
                results.append(
                    f"{'Parley resume':<34} {args.resume_events:,} missed events in {resume_s:.3f} s"
                )
                print(results[-1], flush=True)
            await stack.close()

            seed_fixed = seed_sat = None
            if not args.skip_channels:
                from benchmarks.channels_baseline import run_channels

                seed_fixed = await run_channels(fixed, redis.url)
                results.append(
                    f"{'Channels seed stack at same rate':<34} {seed_fixed.deliveries_per_s:>10,.0f} deliveries/s   "
                    f"delivered {seed_fixed.unique:,}/{seed_fixed.expected:,}   lost {seed_fixed.lost:,}"
                )
                print(results[-1], flush=True)
                seed_sat = await run_channels(saturation, redis.url)
                results.append(
                    f"{'Channels seed stack, saturation':<34} {seed_sat.deliveries_per_s:>10,.0f} deliveries/s   "
                    f"delivered {seed_sat.unique:,}/{seed_sat.expected:,}   lost {seed_sat.lost:,}"
                )
                print(results[-1], flush=True)

            idle_stack = Stack(redis.url, database_url, "idle")
            await idle_stack.appender.open()
            per_connection = await idle_memory_phase(idle_stack, args.idle_connections)
            await idle_stack.close()
            results.append(
                f"{'Parley idle memory':<34} {per_connection / 1024:,.1f} KiB per connection "
                f"({args.idle_connections:,} connections)"
            )
            print(results[-1], flush=True)

    print("\nratios:")
    print(f"  Parley saturation / websockets ceiling = {sat.rate() / max(ceiling.rate(), 1):.2f}")
    if seed_sat is not None:
        print(
            f"  Parley saturation / Channels saturation = {sat.rate() / max(seed_sat.deliveries_per_s, 1):.1f}x"
        )
    print(f"  end-to-end p99 = {e2e.percentile_ms(0.99):.1f} ms at {args.rate_deliveries:,.0f} deliveries/s")


if __name__ == "__main__":
    asyncio.run(main())
