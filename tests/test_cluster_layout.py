"""The cluster fixture itself, and how the log's partitions spread over a cluster's masters."""

from __future__ import annotations

import pytest
import redis.asyncio.cluster as aiocluster
from redis.crc import key_slot

from devstack.cluster import RedisClusterServers
from events.layout import LogLayout, partition_tag

REDIS_CLI_SPLIT = [(0, 5460), (5461, 10922), (10923, 16383)]
"""How `redis-cli --cluster create` splits the slots over 3 masters."""


def _per_master(layout: LogLayout, split: list[tuple[int, int]]) -> list[int]:
    counts = [0] * len(split)
    for p in range(layout.partitions):
        slot = key_slot(layout.stream_key(p).encode())
        counts[next(i for i, (low, high) in enumerate(split) if low <= slot <= high)] += 1
    return counts


@pytest.mark.parametrize("partitions", [8, 1, 2, 3, 4, 5, 6, 7, 12, 16, 31, 32, 64])
def test_partitions_spread_evenly_over_three_masters(partitions: int) -> None:
    counts = _per_master(LogLayout("parley", partitions), REDIS_CLI_SPLIT)
    assert max(counts) <= partitions // 3 + 1, counts  # no master above its fair share plus one
    assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("partitions", [8, 12, 24])
def test_partitions_spread_evenly_over_six_masters(partitions: int) -> None:
    split = [(round(i * 16384 / 6), round((i + 1) * 16384 / 6) - 1) for i in range(6)]
    counts = _per_master(LogLayout("parley", partitions), split)
    assert max(counts) - min(counts) <= 1, counts


def test_plain_tags_collide_as_the_spread_ones_avoid() -> None:
    """The plain `{pN}` tags put 4 of 8 partitions on one master (the Centrifugo failure)."""
    assert sorted(_per_master(LogLayout("parley", 8, "plain"), REDIS_CLI_SPLIT)) == [2, 2, 4]
    assert [partition_tag(p, "plain") for p in range(3)] == ["p0", "p1", "p2"]


def test_tags_do_not_depend_on_namespace_or_partition_count() -> None:
    tags = [partition_tag(p) for p in range(8)]
    assert LogLayout("other", 32).stream_key(5) == f"other:{{{tags[5]}}}:log"
    assert len(set(tags)) == 8


async def test_cluster_serves_every_slot_and_the_default_log_spreads(
    redis_cluster: RedisClusterServers,
) -> None:
    client = aiocluster.RedisCluster.from_url(redis_cluster.url)
    try:
        for i in range(50):
            await client.set(f"k{i}", i)
        assert [await client.get(f"k{i}") for i in range(50)] == [str(i).encode() for i in range(50)]
        assert len(client.get_primaries()) == 3
        layout = LogLayout("parley", 8)
        nodes = [client.get_node_from_key(layout.stream_key(p)) for p in range(8)]
        owners = [node.name for node in nodes if node is not None]
        assert len(owners) == 8
        assert sorted(owners.count(name) for name in set(owners)) == [2, 3, 3]
    finally:
        await client.aclose()
