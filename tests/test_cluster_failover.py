"""Failover: kill -9 a master of a real Redis Cluster under commands, a projector and resuming subscribers;
its replica is promoted, the services find it by themselves, and with PARLEY_WAIT_REPLICAS=1 every command
answered 202 is in the log exactly once, the read models equal the fold of the log, and every subscriber saw
exactly what it may see, once."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from devstack.cluster import RedisClusterServers
from devstack.ports import free_port
from events.codec import decode
from events.log import EventLog
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.log_settings import LogSettings
from servicekit.settings import Env
from tests.apiclient import ApiClient
from tests.cluster_fixtures import _path_binary
from tests.fanout_fixtures import PARTITIONS, SECRET, Fanout, fanout_env
from tests.test_fanout_e2e import Collector, check_exactly_once, origin
from tests.test_projector_crash import assert_read_models_equal_fold, wait_until_projected

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("PARLEY_TEST_FAILOVER"),
        reason="opt-in (PARLEY_TEST_FAILOVER=1): about one run in four still stalls after the failover "
        "(README, Redis Cluster)",
    ),
]

USERS = ("u0", "u1", "u2", "u3")
SENDS_PER_WRITER = 40
LOAD_LIMIT_S = 60


@pytest.fixture
def own_cluster(tmp_path: Path) -> Any:
    """A cluster of our own (7.x): this test kills and restarts one of its masters."""
    binary = _path_binary()
    if binary is None:
        pytest.skip("no redis-server on PATH")
    with RedisClusterServers(tmp_path / "cluster", binary) as cluster:
        yield cluster


async def send_until_answered(
    api: ApiClient, actor: str, cid: str, n: int, acked: list[str], refused: list[str]
) -> None:
    """Send one message, retrying with the same Idempotency-Key (and message id) until answered 202."""
    key, message_id = uuid.uuid4().hex, str(uuid.uuid4())
    body = {"body": f"{actor} {n}", "message_id": message_id}
    deadline = time.monotonic() + LOAD_LIMIT_S
    while time.monotonic() < deadline:
        answer = await api.post(actor, f"/v1/conversations/{cid}/messages", body, {"Idempotency-Key": key})
        if answer.status_code == 202:
            acked.extend(answer.json()["event_ids"])
            return
        assert answer.status_code == 503, answer.text  # the log unreachable for a moment: retry
        refused.append(key)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{actor}'s message {n} never answered 202")


async def test_kill_9_of_a_master_under_load_loses_and_doubles_nothing(
    own_cluster: RedisClusterServers, log_namespace: str, database_url: str, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": own_cluster.url, "PARLEY_REDIS_CLUSTER": "1", "PARLEY_LOG_NAMESPACE": log_namespace,
        "PARLEY_PARTITIONS": str(PARTITIONS), "PARLEY_JWT_SECRET": SECRET, "PARLEY_DEV_MODE": "1",
        "PARLEY_RATE_LIMIT_PER_S": "0", "PARLEY_WAIT_REPLICAS": "1", "PARLEY_WAIT_TIMEOUT_MS": "500",
    }  # fmt: skip
    async with ApiClient.running(env) as api:
        cids = []
        for n, owner in enumerate(USERS):  # four conversations, everyone in each
            answer = await api.post(
                owner, "/v1/conversations", {"title": f"c{n}", "participants": list(USERS)}
            )
            assert answer.status_code == 202, answer.text
            cids.append(answer.json()["conversation_id"])
        fanout = Fanout(
            fanout_env(own_cluster.url, log_namespace, PARLEY_REDIS_CLUSTER="1"),
            free_port(),
            tmp_path / "f.log",
        )
        fanout.env["PARLEY_FANOUT_PORT"] = str(fanout.port)
        await fanout.start()
        epoch = api.services.appender.epoch
        assert epoch is not None
        collectors = [Collector(fanout.url, user, origin(epoch)) for user in USERS]
        worker = Worker(
            ProjectorSettings.from_env(
                Env({**env, "DATABASE_URL": database_url, "PARLEY_PROJECTOR_BLOCK_MS": "200"})
            ),
            use_leases=False,
        )
        await worker.start()
        stop = asyncio.Event()
        projecting = asyncio.create_task(worker.run(stop))
        try:
            acked: list[str] = []
            refused: list[str] = []
            layout = LogSettings("", log_namespace, PARTITIONS).layout()
            cluster = api.services.redis
            assert isinstance(cluster, RedisCluster)
            target = cluster.get_node_from_key(layout.stream_key(layout.partition_for(cids[0])))
            assert target is not None
            victim = next(n for n in own_cluster.nodes if n.port == int(target.port))

            async def writer(i: int) -> None:
                for n in range(SENDS_PER_WRITER):
                    await send_until_answered(api, USERS[i], cids[i], n, acked, refused)
                    await asyncio.sleep(0.01)

            async def chaos() -> None:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(victim.kill)  # SIGKILL; the services keep running meanwhile
                await asyncio.sleep(3)  # its replica is promoted meanwhile (cluster-node-timeout 1 s)
                await asyncio.to_thread(victim.start)  # back as the new master's replica: WAIT can be met

            await asyncio.gather(chaos(), *(writer(i) for i in range(len(USERS))))
            assert victim.pid is not None and victim in own_cluster.nodes
            assert int(target.port) not in {int(n.port) for n in own_cluster.masters()}, (
                "no failover happened"
            )

            log = EventLog(cluster, layout)
            entries = [e for p in range(PARTITIONS) for e in await log.read_range(p, "-", "+")]
            counts = Counter(decode(e.data).event_id for e in entries)
            assert len(acked) == len(USERS) * SENDS_PER_WRITER
            assert all(counts[event_id] == 1 for event_id in acked), "an acknowledged event lost or doubled"
            assert all(c == 1 for c in counts.values())
            assert refused, "the load never met the outage"
            try:
                await check_exactly_once(collectors, cluster, log_namespace, wait_s=10)
            except AssertionError:
                print("fanout log:", (tmp_path / "f.log").read_text()[-6000:])
                raise
            await wait_until_projected(log, database_url)
            await assert_read_models_equal_fold(log, database_url)
        finally:
            stop.set()
            await asyncio.wait_for(projecting, 15)
            await worker.close()
            for collector in collectors:
                await collector.stop()
            fanout.stop()
