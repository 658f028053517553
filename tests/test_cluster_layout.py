"""The cluster fixture itself, and how the log's partitions spread over a cluster's masters."""

from __future__ import annotations

import redis.asyncio.cluster as aiocluster

from tests.cluster_fixtures import RedisClusterServers


async def test_cluster_serves_every_slot(redis_cluster: RedisClusterServers) -> None:
    client = aiocluster.RedisCluster.from_url(redis_cluster.url)
    try:
        for i in range(50):
            await client.set(f"k{i}", i)
        assert [int(await client.get(f"k{i}")) for i in range(50)] == list(range(50))
        assert len(client.get_primaries()) == 3
        assert len(redis_cluster.masters()) == 3
    finally:
        await client.aclose()
