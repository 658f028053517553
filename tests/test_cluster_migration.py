"""Slot migration: a partition's slot moves to another master (CLUSTER SETSLOT ... IMPORTING/MIGRATING, then
MIGRATE key by key, then SETSLOT ... NODE) while commands flow. An append whose keys the two nodes split
between them is refused by Redis without running (TRYAGAIN); the API follows it a few times, then answers
503 problem+json with Retry-After (never a 500, never a silent loss), and the client's retry with its
Idempotency-Key lands once the slot has moved: every 202 in the log exactly once, the audit green."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from devstack.cluster import RedisClusterServers
from devstack.ports import LOOPBACK
from events.codec import decode
from events.log import EventLog
from servicekit.log_settings import LogSettings
from tests.apiclient import ApiClient
from tests.fanout_fixtures import PARTITIONS
from tests.test_cluster_failover import (
    USERS,
    Ack,
    cluster_env,
    four_conversations,
    own_cluster,
    projecting,
    run_audit,
    send_until_answered,
)
from tests.test_projector_crash import assert_read_models_equal_fold, wait_until_projected

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(150)]

__all__ = ["own_cluster"]  # a fixture this module uses

SENDS_PER_WRITER = 30
HALFWAY_PAUSE_S = 4.0
"""How long the migration holds with the slot's keys split between the nodes: longer than the API follows
TRYAGAIN (8 times, ~2 s), so appends to that partition meet the 503."""


async def command(node: aioredis.Redis, *args: Any) -> Any:
    """One command to one node, its reply as redis-py parses it."""
    return await node.execute_command(*args)  # type: ignore[no-untyped-call]


async def migrate_slot(
    cluster: RedisClusterServers, slot: int, source_port: int, target_port: int, halfway_s: float
) -> int:
    """Move `slot` from the master on `source_port` to the one on `target_port` as `redis-cli --cluster
    reshard` does, a key at a time, pausing `halfway_s` with half its keys moved; returns the keys moved."""
    source = aioredis.Redis(host=LOOPBACK, port=source_port)
    target = aioredis.Redis(host=LOOPBACK, port=target_port)
    source_id, target_id = cluster.node_id(source_port), cluster.node_id(target_port)
    moved = 0
    try:
        await command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        total = int(await command(source, "CLUSTER", "COUNTKEYSINSLOT", slot))
        paused = False
        for _ in range(10_000):  # bounded: a key a round, new keys meanwhile go to the target
            keys = await command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1)
            if not keys:
                break
            await command(source, "MIGRATE", LOOPBACK, target_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            if not paused and moved >= total // 2:
                paused = True
                await asyncio.sleep(halfway_s)
            await asyncio.sleep(0.005)
        for node in (target, source):
            await command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for master in cluster.masters():  # the others learn it from the bus too; say it at once
            if master.port not in (source_port, target_port):
                async with aioredis.Redis(host=LOOPBACK, port=master.port) as other:
                    await command(other, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved
    finally:
        await source.aclose()
        await target.aclose()


async def test_slot_migration_under_load_refuses_loudly_and_loses_nothing(
    own_cluster: RedisClusterServers, log_namespace: str, database_url: str
) -> None:
    env = cluster_env(own_cluster, log_namespace)
    database_env = {**env, "DATABASE_URL": database_url, "PARLEY_PROJECTOR_BLOCK_MS": "200"}
    async with ApiClient.running(env) as api, projecting(database_env):
        cids = await four_conversations(api)
        layout = LogSettings("", log_namespace, PARTITIONS).layout()
        cluster = api.services.redis
        assert isinstance(cluster, RedisCluster)
        log = EventLog(cluster, layout)
        partition = layout.partition_for(cids[0])
        slot = cluster.keyslot(layout.stream_key(partition))
        source = cluster.get_node_from_key(layout.stream_key(partition))
        assert source is not None
        target = next(m for m in own_cluster.masters() if m.port != int(source.port))
        acked: list[Ack] = []
        refused: list[str] = []

        async def writer(i: int) -> None:
            for n in range(SENDS_PER_WRITER):
                await send_until_answered(api, USERS[i], cids[i], n, acked, refused)
                await asyncio.sleep(0.02)

        async def migration() -> int:
            await asyncio.sleep(0.5)
            return await migrate_slot(own_cluster, slot, int(source.port), target.port, HALFWAY_PAUSE_S)

        moving = asyncio.create_task(migration())
        await asyncio.gather(*(writer(i) for i in range(len(USERS))))
        moved = await moving
        print(f"slot {slot}: {moved} keys moved; {len(acked)} acknowledged, {len(refused)} refused (503)")
        assert moved > 2  # the stream, the partition's metadata, conversations, idempotency records
        now = cluster.get_node_from_key(layout.stream_key(partition))
        assert now is not None and int(now.port) == target.port, "the slot did not move"
        assert refused, "no command met the migration"  # each a 503 problem+json with Retry-After
        assert len(acked) == len(USERS) * SENDS_PER_WRITER
        entries = [e for p in range(PARTITIONS) for e in await log.read_range(p, "-", "+")]
        counts = Counter(decode(e.data).event_id for e in entries)
        assert all(counts[a.event_id] == 1 for a in acked), "an acknowledged event lost or doubled"
        assert all(c == 1 for c in counts.values()), "an event doubled"
        await wait_until_projected(log, database_url)
        await assert_read_models_equal_fold(log, database_url)
        code, report = await run_audit(database_env, None)
        assert code == 0, report
