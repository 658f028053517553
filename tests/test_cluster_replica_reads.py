"""Readers take only replicated entries (PARLEY_READ_REPLICAS=1): an entry on a master that its replica has
not received yet, lost when the master dies, reaches no subscriber and no read model. The same run reading
masters shows the window is real: the subscribers and the projector took the entry the failover lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.cluster import REPLICA

from devstack.cluster import RedisClusterServers, _command, _info_field
from devstack.ports import free_port
from events.codec import decode
from events.log import REPLICA_LOOKUP_S, EventLog, LogEntry, TopologyChanged
from events.redisclient import redis_client, refresh_topology
from projector.poller import Poller
from servicekit.log_settings import LogSettings
from tests.apiclient import ApiClient
from tests.fanout_fixtures import PARTITIONS, Fanout, fanout_env
from tests.test_cluster_failover import (
    USERS,
    cluster_env,
    four_conversations,
    own_cluster,
    projecting,
    send_until_answered,
)
from tests.test_fanout_e2e import Collector, check_exactly_once, origin
from tests.test_projector_crash import assert_read_models_equal_fold, wait_until_projected

pytestmark = [pytest.mark.cluster]
__all__ = ["own_cluster"]  # the fixture, imported for this module's tests


def replica_of(port: int) -> int | None:
    """The port of the master the node on `port` replicates, if it is a replica."""
    if _info_field(port, "replication", "role") != "slave":
        return None
    return int(_info_field(port, "replication", "master_port"))


async def whole_log(log: EventLog, limit_s: float = 20) -> list[LogEntry]:
    """Every entry of every partition, read again while the client still learns the new topology."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return [e for p in range(PARTITIONS) for e in await log.read_range(p, "-", "+")]
        except TopologyChanged:
            assert time.monotonic() < deadline, "the log never became readable after the failover"
            await asyncio.sleep(0.2)


async def until_replica_listed(client: RedisCluster, key: str, limit_s: float = 10) -> None:
    """Until `client` knows a replica of `key`'s master (Redis 7 lists one only once it has data)."""
    deadline = time.monotonic() + limit_s
    while len(client.nodes_manager.slots_cache[client.keyslot(key)]) < 2:
        assert time.monotonic() < deadline, "the replica never showed"
        await refresh_topology(client)
        await asyncio.sleep(0.1)


READERS_TAKE_S = 1.5
"""How long the readers have to take the unreplicated entry (they poll every few milliseconds)."""


async def test_replica_reads_go_to_the_replica_and_block_there(
    redis_cluster: RedisClusterServers, log_namespace: str
) -> None:
    client = redis_client(redis_cluster.url, 10, cluster=True)
    assert isinstance(client, RedisCluster)
    try:
        layout = LogSettings("", log_namespace, PARTITIONS).layout()
        log = EventLog(client, layout, replica_reads=True)
        await log.open(create=True)
        key = layout.stream_key(0)
        await client.xadd(key, {"e": b"first"})
        deadline = time.monotonic() + 10
        while log._node(0).server_type != REPLICA:  # Redis 7 lists a replica once it has data
            assert time.monotonic() < deadline, "the replica never showed"
            await log.read_after(0, "0-0", 10)  # a read that went to the master looks again
            await asyncio.sleep(0.1)
        replica_port = int(log._node(0).port)
        master = client.get_node_from_key(key)
        assert master is not None and replica_of(replica_port) == int(master.port)
        assert [e.data for e in await log.read_after(0, "0-0", 10)] == [b"first"]
        head = await log.head(0)
        reading = asyncio.create_task(log.read_after(0, head, 10, block_ms=5_000))
        await asyncio.sleep(0.3)
        assert not reading.done()  # blocked on the replica, woken by the replicated append
        started = time.monotonic()
        await client.xadd(key, {"e": b"second"})
        assert [e.data for e in await asyncio.wait_for(reading, 5)] == [b"second"]
        assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()


async def test_a_projector_poll_follows_a_partition_the_topology_moved(
    redis_cluster: RedisClusterServers, log_namespace: str
) -> None:
    """A partition waiting on the poller whose node changes (a refresh found its replica, or another node's
    failover) without its loop's read failing is read on the new node, not left waiting for ever."""
    client = redis_client(redis_cluster.url, 10, cluster=True)
    assert isinstance(client, RedisCluster)
    try:
        layout = LogSettings("", log_namespace, PARTITIONS).layout()
        log = EventLog(client, layout)
        await log.open(create=True)
        key = layout.stream_key(0)
        await client.xadd(key, {"e": b"first"})
        await until_replica_listed(client, key)
        poller = Poller(log, 10, block_ms=100)
        try:
            reading = asyncio.create_task(poller.read(0, await log.head(0)))
            await asyncio.sleep(0.3)  # the master's loop is polling partition 0
            log.replica_reads = True  # partition 0 is now on another node, as after a refresh
            await asyncio.sleep(0.3)  # the loop's poll in flight ends empty
            await client.xadd(key, {"e": b"second"})
            assert [e.data for e in await asyncio.wait_for(reading, 5)] == [b"second"]
        finally:
            await poller.close()
    finally:
        await client.aclose()


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("read_replicas", [1, 0], ids=["replicas", "masters"])
async def test_an_entry_a_failover_loses_reaches_no_reader(
    own_cluster: RedisClusterServers,
    log_namespace: str,
    database_url: str,
    tmp_path: Path,
    read_replicas: int,
) -> None:
    extra = {
        "PARLEY_WAIT_REPLICAS": "1",
        "PARLEY_WAIT_TIMEOUT_MS": "300",
        "PARLEY_READ_REPLICAS": str(read_replicas),
    }
    env = cluster_env(own_cluster, log_namespace, **extra)
    database_env = {**env, "DATABASE_URL": database_url, "PARLEY_PROJECTOR_BLOCK_MS": "200"}
    async with ApiClient.running(env) as api, projecting(database_env):
        cids = await four_conversations(api)
        fanout_vars = fanout_env(
            own_cluster.url, log_namespace, PARLEY_REDIS_CLUSTER="1", PARLEY_READ_REPLICAS=str(read_replicas)
        )
        fanout = Fanout(fanout_vars, free_port(), tmp_path / "f.log")
        fanout.env["PARLEY_FANOUT_PORT"] = str(fanout.port)
        await fanout.start()
        epoch = api.services.appender.epoch
        assert epoch is not None
        collectors = [Collector(fanout.url, user, origin(epoch)) for user in USERS]
        try:
            cluster = api.services.redis
            assert isinstance(cluster, RedisCluster)
            layout = LogSettings("", log_namespace, PARTITIONS).layout()
            masters_log = EventLog(cluster, layout)
            partition = layout.partition_for(cids[0])
            slot = cluster.keyslot(layout.stream_key(partition))
            master_port = int(cluster.nodes_manager.get_node_from_slot(slot).port)
            master = next(n for n in own_cluster.nodes if n.port == master_port)
            replica = next(n for n in own_cluster.nodes if replica_of(n.port) == master_port)
            for n in range(3):  # replicated and acknowledged: every reader takes these
                answer = await api.post("u0", f"/v1/conversations/{cids[0]}/messages", {"body": f"m{n}"})
                assert answer.status_code == 202, answer.text
            before = (await masters_log.read_range(partition, "-", "+"))[-1].stream_id
            await until_replica_listed(cluster, layout.stream_key(partition))
            await asyncio.sleep(REPLICA_LOOKUP_S + 1)  # the readers have looked for it again meanwhile
            assert replica.pid is not None
            os.kill(replica.pid, signal.SIGSTOP)  # replication of that master stops: the replica cannot
            _command(master.port, "CLIENT", "KILL", "TYPE", "replica")  # reconnect, nothing is on its way
            try:
                key = uuid.uuid4().hex
                answer = await api.post(
                    "u0",
                    f"/v1/conversations/{cids[0]}/messages",
                    {"body": "unreplicated"},
                    {"Idempotency-Key": key},
                )
                assert answer.status_code == 503, answer.text  # WAIT not met: never acknowledged
                unreplicated = await masters_log.read_range(partition, f"({before}", "+")
                assert [decode(e.data).type for e in unreplicated] == ["message_sent"]  # yet on the master
                lost = decode(unreplicated[0].data).event_id
                await asyncio.sleep(READERS_TAKE_S)
                await asyncio.to_thread(master.kill)
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while int(replica.port) not in {int(n.port) for n in own_cluster.masters()}:
                assert time.monotonic() < deadline, "the replica was never promoted"
                await asyncio.sleep(0.2)
            await asyncio.to_thread(master.start)  # rejoins as the promoted replica's replica
            await asyncio.to_thread(own_cluster.wait_ok)
            entries = await whole_log(masters_log)
            assert lost not in {decode(e.data).event_id for e in entries}, "the failover kept the entry"
            # Readers go on from the promoted replica (503 while its new replica catches up: retried).
            await send_until_answered(api, "u1", cids[0], 0, [], [])
            await wait_until_projected(masters_log, database_url)
            seen = [c.user for c in collectors if lost in {e["event_id"] for e in c.events}]
            if read_replicas:
                assert seen == [], "a subscriber got an entry the log lost"
                await check_exactly_once(collectors, cluster, log_namespace, wait_s=15)
                await assert_read_models_equal_fold(masters_log, database_url)
            else:  # the window replica reads close: readers of the master took what the log then lost
                assert seen, "no subscriber took the unreplicated entry from the master"
                with pytest.raises(AssertionError):
                    await assert_read_models_equal_fold(masters_log, database_url)
        finally:
            try:
                for collector in collectors:
                    await collector.stop()
            finally:
                fanout.stop()
