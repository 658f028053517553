"""The log on a real Redis: creation and opening, key layout, reading old events as current, positions."""

from __future__ import annotations

import re

import msgspec
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from hypothesis import given
from hypothesis import strategies as st

from devstack.cluster import RedisClusterServers
from events import schema
from events.codec import decode
from events.exceptions import EpochChanged, LogNotInitialized, PartitionMismatch
from events.ids import ID_PATTERN
from events.layout import TAG_SCHEMES, LogLayout, partition_tag
from events.log import EventLog, ReplicaNotInSync, _check_replica, stream_info
from events.position import LogPosition, parse_stream_id

ids = st.from_regex(ID_PATTERN, fullmatch=True)


def _crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """Redis Cluster's CLUSTER KEYSLOT: crc16 of the first non-empty `{...}` hash tag, else the key."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16_xmodem(raw) % 16384


def test_key_slot_matches_redis_reference_values() -> None:
    # Values from the Redis Cluster specification and the `CLUSTER KEYSLOT` documentation.
    assert _crc16_xmodem(b"123456789") == 0x31C3
    assert (key_slot("somekey"), key_slot("foo{hash_tag}")) == (11058, 2515)
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == _crc16_xmodem(b"foo{}{bar}") % 16384


# --- opening -----------------------------------------------------------------------------------------


async def test_open_create_makes_an_epoch_and_reopening_keeps_it(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    layout = LogLayout(log_namespace, 4)
    epoch = await EventLog(redis_client, layout).open(create=True)
    assert re.fullmatch(r"[0-9a-f]{32}", epoch)
    assert await EventLog(redis_client, layout).open(create=True) == epoch
    reader = EventLog(redis_client, layout)
    assert await reader.open(create=False) == epoch
    assert reader.epoch == epoch
    await reader.check_epoch(epoch)
    for p in range(layout.partitions):
        assert await redis_client.hget(layout.partition_meta_key(p), "epoch") == epoch.encode()


async def test_open_without_create_on_an_empty_namespace_raises(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    log = EventLog(redis_client, LogLayout(log_namespace, 2))
    with pytest.raises(LogNotInitialized):
        await log.open(create=False)
    assert log.epoch is None
    assert await redis_client.keys(f"{log_namespace}:*") == []


@pytest.mark.parametrize("create", [True, False])
async def test_open_with_another_partition_count_raises(
    redis_client: aioredis.Redis, log_namespace: str, create: bool
) -> None:
    await EventLog(redis_client, LogLayout(log_namespace, 4)).open(create=True)
    with pytest.raises(PartitionMismatch) as caught:
        await EventLog(redis_client, LogLayout(log_namespace, 8)).open(create=create)
    assert (caught.value.configured, caught.value.actual) == (8, 4)


async def test_a_partition_with_another_epoch_raises_epoch_changed(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    layout = LogLayout(log_namespace, 2)
    epoch = await EventLog(redis_client, layout).open(create=True)
    await redis_client.hset(layout.partition_meta_key(1), "epoch", "other")
    with pytest.raises(EpochChanged):
        await EventLog(redis_client, layout).open(create=False)
    with pytest.raises(EpochChanged):
        await EventLog(redis_client, layout).check_epoch("not-" + epoch)


# --- layout ------------------------------------------------------------------------------------------


@given(ids, st.integers(min_value=1, max_value=64))
def test_partition_for_is_stable_and_in_range(conversation_id: str, partitions: int) -> None:
    first = LogLayout("ns", partitions).partition_for(conversation_id)
    assert 0 <= first < partitions
    assert LogLayout("other", partitions).partition_for(conversation_id) == first


def test_partition_for_is_stable_across_processes() -> None:
    # crc32, not hash(): a pinned value catches a switch to a per-process seeded hash.
    assert LogLayout("ns", 8).partition_for("conversation-1") == 1838944252 % 8
    assert LogLayout("ns", 1000).partition_for("conversation-1") == 1838944252 % 1000


@given(ids, ids, st.text(min_size=1), st.integers(min_value=1, max_value=32), st.data())
def test_every_key_of_a_partition_shares_its_hash_tag(
    conversation_id: str, user_id: str, idem_key: str, partitions: int, data: st.DataObject
) -> None:
    layout = LogLayout("ns-1.x", partitions, data.draw(st.sampled_from(TAG_SCHEMES)))
    p = data.draw(st.integers(min_value=0, max_value=partitions - 1))
    keys = [
        layout.stream_key(p),
        layout.partition_meta_key(p),
        layout.conversation_key(p, conversation_id),
        layout.message_bucket_key(p, conversation_id, data.draw(st.integers(min_value=0, max_value=2**24))),
        layout.idempotency_key(p, user_id, idem_key),
    ]
    tag = partition_tag(p, layout.tags)
    for key in keys:
        assert key.startswith(f"ns-1.x:{{{tag}}}:")
    assert {key_slot(key) for key in keys} == {key_slot(f"{{{tag}}}")}


def test_layout_refuses_bad_namespaces_and_partition_counts() -> None:
    for namespace in ("", "a{b", "a}b", "a:b", "a b"):
        with pytest.raises(ValueError):
            LogLayout(namespace, 1)
    with pytest.raises(ValueError):
        LogLayout("ns", 0)


# --- reading -----------------------------------------------------------------------------------------


async def test_a_v1_event_written_to_the_log_reads_back_as_v2(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    layout = LogLayout(log_namespace, 4)
    log = EventLog(redis_client, layout)
    await log.open(create=True)
    conversation_id = "conv-v1"
    partition = layout.partition_for(conversation_id)
    v1 = {
        "seq": 7,
        "event_id": "0190f1b2-0000-7000-8000-000000000001",
        "schema_version": 1,
        "occurred_at": "2024-05-01T12:00:00.123456Z",
        "actor": "alice",
        "conversation_id": conversation_id,
        "correlation_id": "corr-1",
        "payload": {"type": "message_sent", "message_id": "m1", "text": "héllo ✓"},
    }
    stream_id = await redis_client.xadd(layout.stream_key(partition), {"e": msgspec.json.encode(v1)})
    assert isinstance(stream_id, bytes)

    entries = await log.read_after(partition, "0-0", count=10)
    assert [(e.partition, e.stream_id) for e in entries] == [(partition, stream_id.decode())]
    event = decode(entries[0].data)
    assert event.payload == schema.MessageSent(message_id="m1", body="héllo ✓", reply_to=None)
    assert (event.seq, event.schema_version, event.actor, event.type) == (7, 2, "alice", "message_sent")
    assert event.occurred_at.microsecond == 123456
    assert await log.read_after(partition, entries[0].stream_id, count=10) == []
    assert await log.head(partition) == entries[0].stream_id
    assert await log.read_range(partition, "-", "+") == entries


# --- positions ---------------------------------------------------------------------------------------

stream_ids = st.builds("{}-{}".format, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
epochs = st.text(min_size=1).filter(lambda t: "." not in t)


@given(st.builds(LogPosition, partition=st.integers(0, 10_000), stream_id=stream_ids, epoch=epochs))
def test_log_position_token_round_trip(position: LogPosition) -> None:
    assert LogPosition.from_token(position.token()) == position
    parse_stream_id(position.stream_id)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "e",
        "e.1",
        "e.1.1-0.x",
        ".1.1-0",
        "e..1-0",
        "e.-1.1-0",
        "e.x.1-0",
        "e.1.",
        "e.1.1",
        "e.1.1-",
        "e.1.-1",
        "e.1.a-b",
        "e.1.1-0\n",
        "e.1. 1-0",
        "e.1.1-0-0",
        "e.\u00b2.1-0",
        "e.1.123456789012345678901-0",
    ],
)
def test_from_token_refuses_malformed_tokens(token: str) -> None:
    with pytest.raises(ValueError):
        LogPosition.from_token(token)


@pytest.mark.parametrize("token", ["e.\u0661.1-0", "e.1.\u0661-\u0662"])
def test_from_token_refuses_non_ascii_digits(token: str) -> None:
    with pytest.raises(ValueError):
        LogPosition.from_token(token)


async def test_stream_info_is_none_only_for_a_missing_stream(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    """Only "no such key" means no stream; any other refusal is raised, never read as an empty history
    (a failover's CLUSTERDOWN once made a resume look trimmed and answered it with a resync)."""
    layout = LogLayout(log_namespace, 2)
    log = EventLog(redis_client, layout)
    assert await log.info(0) is None
    await redis_client.xadd(layout.stream_key(0), {"e": b"x"})
    assert (await log.info(0))["length"] == 1
    await redis_client.set(layout.stream_key(1), "not a stream")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await log.info(1)


@pytest.mark.cluster
async def test_stream_info_raises_a_cluster_refusal(redis_cluster: RedisClusterServers) -> None:
    """Asked of every node, a missing key's XINFO is None on the one master serving its slot; every
    other node's MOVED is raised (CLUSTERDOWN, during a failover, comes back the same way)."""
    answers: list[str] = []
    for node in redis_cluster.nodes:
        client = aioredis.Redis(host="127.0.0.1", port=node.port)
        try:
            answers.append(repr(await stream_info(client, "{p0}stream-info-probe")))
        except redis.exceptions.ResponseError as exc:
            answers.append(type(exc).__name__)
        finally:
            await client.aclose()
    assert sorted(answers) == ["MovedError"] * 5 + ["None"], answers


MASTER_ROLE = [b"master", 3120, [[b"127.0.0.1", b"7001", b"3120"]]]


@pytest.mark.parametrize(
    ("role", "as_replica", "in_sync"),
    [
        (MASTER_ROLE, False, True),  # no replica known: the master itself was read
        (MASTER_ROLE, True, False),  # taken for a replica: promoted, or an old master back
        ([b"slave", b"127.0.0.1", 7000, b"connected", 3120], True, True),
        ([b"slave", b"127.0.0.1", 7000, b"connect", -1], True, False),
        ([b"slave", b"127.0.0.1", 7000, b"connecting", -1], True, False),
        ([b"slave", b"127.0.0.1", 7000, b"sync", -1], True, False),
    ],
)
def test_replica_reads_take_a_replica_only_in_sync_with_its_master(
    role: list[object], as_replica: bool, in_sync: bool
) -> None:
    if in_sync:
        _check_replica(b"OK", role, as_replica)
    else:
        with pytest.raises(ReplicaNotInSync, match="replica"):
            _check_replica(b"OK", role, as_replica)
