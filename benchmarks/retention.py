"""Retention soak: Redis memory under constant write load once the stream window is reached.
`python -m benchmarks.retention [--seconds 100] [--rate 1000]` (`make bench-retention`).

Starts its own Redis (appendfsync everysec) and Postgres, and a real projector process (`python -m projector`)
whose retention task runs with a short window (PARLEY_RETAIN_STREAM_S=5, PARLEY_RETAIN_STREAM_EVENTS=1000, a
pass a second). This process appends a constant rate of commands through the command API's `Appender` (the
Lua decide-and-append script): sends, half of them with an Idempotency-Key whose record lives 10 s (its claim
70 s), and read markers. Every few seconds it prints Redis `used_memory`, the streams' entries and bytes, the idempotency
records, and the write-side state of the conversations (which grows by the per-message sizing rule, README
Operating); used_memory less that state is what the window bounds. Bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from benchmarks.machine import describe
from benchmarks.processes import server
from command_api.append import CLAIM_MARGIN_S, Appender, AppendSettings, Command
from command_api.bodies import CreateConversation, MarkRead, SendMessage
from command_api.commands import Context, create_conversation_with_id, mark_read, send_message
from command_api.exceptions import CommandRefused
from devstack.binaries import redis_server_binary
from devstack.ports import free_port
from devstack.servers import PostgresServer, RedisServer
from events.layout import LogLayout

PARTITIONS = 8
CONVERSATIONS = 200
USERS = 600
RETAIN_S, RETAIN_EVENTS = 5, 1000
IDEMPOTENCY_TTL_S = 10.0
BODY = "see you at the release review on friday, bring coffee"


@dataclass(slots=True)
class Load:
    """Conversations of three users each, their last sequence, and what was written."""

    rng: random.Random
    seqs: dict[str, int] = field(default_factory=dict)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    issued: int = 0
    sent: int = 0
    written: int = 0
    keyed: int = 0

    def next_command(self) -> tuple[str, Command]:
        n, self.issued = self.issued, self.issued + 1
        conversation_id = self.rng.choice(list(self.members))
        actor = self.rng.choice(self.members[conversation_id])
        if n % 5 == 4 and self.seqs[conversation_id] > 1:
            return conversation_id, mark_read(
                Context(actor), conversation_id, MarkRead(self.seqs[conversation_id])
            )
        key = f"k{n}" if n % 2 else ""
        self.sent += 1
        self.keyed += bool(key)
        return conversation_id, send_message(
            Context(actor, idempotency_key=key), conversation_id, SendMessage(BODY)
        )


async def create(appender: Appender, load: Load) -> None:
    for c in range(CONVERSATIONS):
        users = tuple(f"user{(c * 3 + i) % USERS}" for i in range(3))
        conversation_id = f"soak-{c}"
        body = CreateConversation("soak", list(users[1:]))
        done = await appender.append(create_conversation_with_id(Context(users[0]), body, conversation_id))
        load.members[conversation_id] = users
        load.seqs[conversation_id] = done.seq


async def write(appender: Appender, load: Load, rate: float, seconds: float) -> None:
    """`rate` commands a second for `seconds`, paced in 10 ms ticks, a bounded number in flight."""
    started = time.perf_counter()
    in_flight: set[asyncio.Task[None]] = set()

    async def one(conversation_id: str, command: Command) -> None:
        try:
            done = await appender.append(command)
        except CommandRefused:  # a read marker that did not advance: nothing written
            return
        load.seqs[conversation_id] = max(load.seqs[conversation_id], done.seq)
        load.written += 1

    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(elapsed * rate)
        while load.issued < due and len(in_flight) < 512:
            task = asyncio.create_task(one(*load.next_command()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.sleep(0.01)
    await asyncio.gather(*in_flight)


async def memory_bytes(client: aioredis.Redis, keys: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
    return sum(int(v or 0) for v in await pipe.execute())


async def sample(client: aioredis.Redis, layout: LogLayout) -> dict[str, int]:
    """used_memory, stream entries and bytes, idempotency records and the write-side state's bytes."""
    streams = layout.stream_keys()
    pipe = client.pipeline(transaction=False)
    for key in streams:
        pipe.xlen(key)
    entries = sum(await pipe.execute())
    state = [k.decode() async for k in client.scan_iter(match=f"{layout.namespace}:*:c:*", count=1000)]
    idem = [k.decode() async for k in client.scan_iter(match=f"{layout.namespace}:*:idem:*", count=1000)]
    return {
        "used_memory": int((await client.info("memory"))["used_memory"]),
        "entries": entries,
        "stream_bytes": await memory_bytes(client, streams),
        "state_bytes": await memory_bytes(client, state),
        "idem_keys": len(idem),
        "idem_bytes": await memory_bytes(client, idem),
    }


def row(t: float, load: Load, s: dict[str, int]) -> str:
    kib = 1024
    return (
        f"{t:6.0f} {load.written:>9,} {s['entries']:>8,} {s['stream_bytes'] / kib:>10,.0f} "
        f"{s['idem_keys']:>7,} {s['idem_bytes'] / kib:>9,.0f} {s['state_bytes'] / kib:>9,.0f} "
        f"{s['used_memory'] / kib:>11,.0f} {(s['used_memory'] - s['state_bytes']) / kib:>13,.0f}"
    )


HEADER = (
    f"{'t (s)':>6} {'written':>9} {'entries':>8} {'stream KiB':>10} {'idem':>7} {'idem KiB':>9} "
    f"{'state KiB':>9} {'used_memory':>11} {'used - state':>13}"
)


async def soak(redis_url: str, env: dict[str, str], args: argparse.Namespace) -> None:
    client = aioredis.Redis.from_url(redis_url)
    layout = LogLayout("soak", PARTITIONS)
    appender = Appender(client, layout, AppendSettings(idempotency_ttl_s=IDEMPOTENCY_TTL_S))
    load = Load(random.Random(7))
    port = free_port()
    try:
        await appender.open()
        with server(["projector"], port, {**env, "PARLEY_PROJECTOR_HTTP_PORT": str(port)}):
            await create(appender, load)
            print(HEADER, flush=True)
            started = time.perf_counter()
            writer = asyncio.create_task(write(appender, load, args.rate, args.seconds))
            samples: list[tuple[float, dict[str, int]]] = []
            while not writer.done():
                await asyncio.wait({writer}, timeout=args.every_s)
                t = time.perf_counter() - started
                samples.append((t, await sample(client, layout)))
                print(row(t, load, samples[-1][1]), flush=True)
            await writer
        summarize(samples, load, args)
    finally:
        await appender.close()
        await client.aclose()


def summarize(samples: list[tuple[float, dict[str, int]]], load: Load, args: argparse.Namespace) -> None:
    """used_memory, and used_memory less the write-side state, once every window is full: the stream's
    and the idempotency claims' (they live the record's TTL and CLAIM_MARGIN_S more)."""
    full = RETAIN_S + IDEMPOTENCY_TTL_S + CLAIM_MARGIN_S
    half = [s for t, s in samples if t >= full]
    if len(half) < 2:
        print(f"no summary: the windows fill at {full:.0f}s; run --seconds {full + 40:.0f} or more")
        return
    first, last = half[0], half[-1]
    bounded = [s["used_memory"] - s["state_bytes"] for s in half]
    per_message = last["state_bytes"] / max(load.sent, 1)
    print(
        f"from {full:.0f}s on ({len(half)} samples): used_memory {first['used_memory'] / 1024:,.0f} → "
        f"{last['used_memory'] / 1024:,.0f} KiB; used - state between {min(bounded) / 1024:,.0f} and "
        f"{max(bounded) / 1024:,.0f} KiB; stream entries {min(s['entries'] for s in half):,}-"
        f"{max(s['entries'] for s in half):,}; write-side state {per_message:.1f} B per message sent "
        f"({load.sent:,} sends, {load.keyed:,} keyed; {load.written:,} commands in {args.seconds:.0f}s)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retention")
    parser.add_argument("--seconds", type=float, default=130, help="length of the write load (at most 300)")
    parser.add_argument("--rate", type=float, default=1000, help="commands per second (at most 5000)")
    parser.add_argument("--every-s", type=float, default=5)
    args = parser.parse_args()
    args.seconds, args.rate = min(args.seconds, 300), min(args.rate, 5000)
    print(describe(str(redis_server_binary())))
    print(
        f"{args.rate:.0f} commands/s for {args.seconds:.0f}s into {CONVERSATIONS} conversations, {PARTITIONS} "
        f"partitions; window PARLEY_RETAIN_STREAM_S={RETAIN_S}, PARLEY_RETAIN_STREAM_EVENTS={RETAIN_EVENTS}; "
        f"idempotency records live {IDEMPOTENCY_TTL_S:.0f}s, claims {IDEMPOTENCY_TTL_S + CLAIM_MARGIN_S:.0f}s"
    )
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        with (
            RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis_server,
            PostgresServer(Path(tmp) / "pg", fast=False) as pg,
        ):
            env = {
                **os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": pg.create_database("parley"),
                "PARLEY_LOG_NAMESPACE": "soak", "PARLEY_PARTITIONS": str(PARTITIONS),
                "PARLEY_JWT_SECRET": "soak-secret-" + "x" * 32, "PARLEY_RETAIN_STREAM_S": str(RETAIN_S),
                "PARLEY_RETAIN_STREAM_EVENTS": str(RETAIN_EVENTS), "PARLEY_RETENTION_INTERVAL_S": "1",
            }  # fmt: skip
            await asyncio.wait_for(soak(redis_server.url, env, args), args.seconds + 120)


if __name__ == "__main__":
    asyncio.run(main())
