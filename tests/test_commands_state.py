"""The write side's per-message state in Redis: compact, bucketed, exact, on every Redis at hand.

A long random history of sends, replies, edits, deletes, leaves and rejoins (enough to split buckets) is
decided by the real script and by the rules (`command_api/rules.py`); every answer must agree, every refusal
must leave the state untouched, and the state's size per message must stay within the sizing rule the
README states (Operating).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from command_api import rules
from command_api.append import Appender, Command
from command_api.bodies import AddParticipant, CreateConversation, EditMessage, SendMessage
from command_api.commands import (
    Context,
    add_participant,
    create_conversation_with_id,
    delete_message,
    edit_message,
    remove_participant,
    send_message,
)
from command_api.exceptions import CommandRefused
from command_api.statekeys import bucket_of, message_field
from events.ids import ID_PATTERN, new_object_id
from events.layout import LogLayout

BYTES_PER_MESSAGE = 32
"""The README's sizing rule for the write-side state of a message (measured: 23 B on 6.2, 25 B on 7.0)."""

USERS = ("alice", "bob", "carol")


@pytest.fixture
async def appender(contract_redis_url: str, log_namespace: str) -> AsyncIterator[Appender]:
    client = aioredis.Redis.from_url(contract_redis_url)
    appender = Appender(client, LogLayout(log_namespace, 2))
    await appender.open()
    try:
        yield appender
    finally:
        await appender.close()
        await client.aclose()


async def state_of(appender: Appender, conversation_id: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every key of a conversation's write-side state, with its fields."""
    layout, client = appender.layout, appender.redis
    partition = layout.partition_for(conversation_id)
    key = layout.conversation_key(partition, conversation_id)
    pattern = layout.message_bucket_key(partition, conversation_id, 0)[:-1] + "*"
    keys = [key.encode(), *[k async for k in client.scan_iter(match=pattern, count=1000)]]
    return {k: cast("dict[bytes, bytes]", await client.hgetall(k)) for k in keys}


async def outcome(appender: Appender, command: Command) -> str:
    try:
        await appender.append(command)
    except CommandRefused as refused:
        return refused.reason
    return "ok"


def message_ids(rng: random.Random) -> str:
    """Server-made ids mostly, and the other shapes a client may choose (text, uppercase UUIDs)."""
    roll = rng.random()
    if roll < 0.7:
        return new_object_id()
    if roll < 0.8:
        return str(uuid.UUID(int=rng.getrandbits(128))).upper()
    return f"m-{rng.randrange(10**6)}"


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_random_history_is_decided_as_the_rules_decide(appender: Appender, seed: int) -> None:
    rng = random.Random(seed)
    cid = f"state-{seed}"
    state = rules.State()

    def decide(command: Command) -> str:
        nonlocal state
        decision = rules.decide(state, command)
        state = decision.state
        return decision.reason if isinstance(decision, rules.Refused) else "ok"

    created = create_conversation_with_id(Context("alice"), CreateConversation("t", ["bob", "carol"]), cid)
    assert decide(created) == await outcome(appender, created) == "ok"
    for step in range(700):
        conversation = state.conversations[cid]
        actor = rng.choice(USERS)
        roll = rng.random()
        messages = sorted(conversation.messages)
        known = rng.choice(messages) if messages and rng.random() < 0.9 else message_ids(rng)
        if roll < 0.6:
            fresh = known if rng.random() < 0.05 else message_ids(rng)
            reply = known if rng.random() < 0.3 else None
            command = send_message(Context(actor), cid, SendMessage("hi", reply_to=reply, message_id=fresh))
        elif roll < 0.85:
            command = (
                edit_message(Context(actor), cid, known, EditMessage("new"))
                if rng.random() < 0.5
                else delete_message(Context(actor), cid, known)
            )
        elif actor in conversation.members and actor != "alice":
            command = remove_participant(Context(actor), cid, actor)
        else:
            command = add_participant(Context("alice"), cid, AddParticipant(rng.choice(USERS[1:])))
        expected = decide(command)
        before = await state_of(appender, cid) if expected != "ok" else None
        assert await outcome(appender, command) == expected, f"step {step}: {command.op}"
        if before is not None:
            assert await state_of(appender, cid) == before, f"step {step}: a refusal changed the state"
    authors = state.conversations[cid].messages
    # Every message sits in the bucket the Python rule names (the script computes the same).
    layout, client = appender.layout, appender.redis
    partition = layout.partition_for(cid)
    buckets = int(await client.hget(layout.conversation_key(partition, cid), "b") or 1)
    assert buckets > 4  # the history split buckets
    for message_id in authors:
        field = message_field(message_id)
        key = layout.message_bucket_key(partition, cid, bucket_of(field, buckets))
        assert await client.hexists(key, field), message_id


async def test_the_state_per_message_stays_within_the_sizing_rule(appender: Appender) -> None:
    cid, messages = "sizing", 3000
    await appender.append(
        create_conversation_with_id(Context("alice"), CreateConversation("t", ["bob"]), cid)
    )
    for first in range(0, messages, 250):
        await asyncio.gather(*(
            appender.append(send_message(Context(USERS[n % 2]), cid, SendMessage("hi")))
            for n in range(first, first + 250)
        ))  # fmt: skip
    client = appender.redis
    state = await state_of(appender, cid)
    total = 0
    for key in state:
        total += int(await client.memory_usage(key, samples=0) or 0)
        if b"#" in key:
            assert await client.object("encoding", key) in (b"listpack", b"ziplist")
    assert total / messages <= BYTES_PER_MESSAGE, f"{total / messages:.1f} bytes per message"
    assert sum(len(fields) for key, fields in state.items() if b"#" in key) == messages


async def test_an_ordinal_is_never_mistaken_for_a_user_id(appender: Appender) -> None:
    # User "1" never posted: alice's message holds her ordinal, "1", which must not read as user "1".
    cid = "ordinals"
    await appender.append(create_conversation_with_id(Context("alice"), CreateConversation("t", ["1"]), cid))
    sent = send_message(Context("alice"), cid, SendMessage("x", message_id="m"))
    assert await outcome(appender, sent) == "ok"
    assert await outcome(appender, edit_message(Context("1"), cid, "m", EditMessage("y"))) == "not-the-author"
    assert await outcome(appender, delete_message(Context("1"), cid, "m")) == "not-the-author"


async def test_messages_written_before_buckets_are_still_decided(appender: Appender) -> None:
    cid = "legacy"
    await appender.append(
        create_conversation_with_id(Context("alice"), CreateConversation("t", ["bob"]), cid)
    )
    key = appender.layout.conversation_key(appender.layout.partition_for(cid), cid)
    old, gone = new_object_id(), "old-deleted"
    # As the script before buckets left it: no `v` mark, one g: field per message.
    await appender.redis.hdel(key, "v")
    await appender.redis.hset(key, mapping={f"g:{old}": "alice", f"g:{gone}": "~alice"})
    assert await outcome(appender, send_message(Context("bob"), cid, SendMessage("x", message_id=old))) == (
        "message-id-taken"
    )
    assert (
        await outcome(appender, edit_message(Context("bob"), cid, old, EditMessage("x"))) == "not-the-author"
    )
    assert await outcome(appender, delete_message(Context("alice"), cid, gone)) == "message-deleted"
    reply = send_message(Context("bob"), cid, SendMessage("x", reply_to=old))
    assert await outcome(appender, reply) == "ok"
    assert await outcome(appender, edit_message(Context("alice"), cid, old, EditMessage("x"))) == "ok"
    assert await outcome(appender, delete_message(Context("alice"), cid, old)) == "ok"
    assert await outcome(appender, delete_message(Context("alice"), cid, old)) == "message-deleted"
    assert await appender.redis.hget(key, f"g:{old}") == b"~alice"


@given(st.lists(st.from_regex(ID_PATTERN, fullmatch=True) | st.uuids().map(str), unique=True, max_size=20))
def test_message_fields_are_distinct_and_never_another_fields_name(ids: list[str]) -> None:
    fields = [message_field(i) for i in ids]
    assert len(set(fields)) == len(ids)
    assert all(f[0] >= 0xFE for f in fields)  # every other field of the hash starts with a letter


@given(st.binary(min_size=3, max_size=20), st.integers(min_value=1, max_value=2**24))
def test_a_split_only_moves_messages_to_the_new_bucket(field: bytes, buckets: int) -> None:
    before, after = bucket_of(field, buckets), bucket_of(field, buckets + 1)
    assert 0 <= after < buckets + 1
    low = 1 << (buckets.bit_length() - 1)
    assert after == before or (before == buckets - low and after == buckets)
