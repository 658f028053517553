"""Fault suite, scaled out (`make test-faults`): 2 command API processes on one port (SO_REUSEPORT),
2 projector workers sharing the partitions by leases and 2 fanout processes, on one Redis and on a 3-master,
3-replica Redis Cluster; subscribers hop
between the fanouts; one process of each service is killed -9 (and restarted, as an orchestrator would)
under load; then the audit is the oracle, as in tests/test_faults.py, whose stack and load this reuses."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.cluster import RedisClusterServers
from devstack.servers import RedisServer
from tests.cluster_fixtures import _path_binary
from tests.listening import listens
from tests.test_faults import USERS, Service, Stack, fault_redis, run_with_fault, stack

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

__all__ = ["fault_redis"]  # a fixture this module uses


async def start_listening(service: Service) -> None:
    """Started and listening itself: on a shared port, an answer may come from the sibling."""
    await service.start()
    assert service.proc is not None
    async with asyncio.timeout(20):
        while not listens(service.proc.pid, service.port):
            await asyncio.sleep(0.05)


@pytest.fixture(
    params=["single", pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.timeout(240)])]
)
def scaleout_redis(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[RedisServer | RedisClusterServers]:
    """The fault suite's Redis (AOF always), or a cluster of our own (7.x) with the same guarantees."""
    if request.param == "single":
        yield request.getfixturevalue("fault_redis")
        return
    binary = _path_binary()
    if binary is None:
        pytest.skip("no redis-server on PATH")
    with RedisClusterServers(tmp_path / "cluster", binary) as cluster:
        yield cluster


async def test_two_of_each_service_one_of_each_killed_then_audit_is_green(
    scaleout_redis: RedisServer | RedisClusterServers, database_url: str, tmp_path: Path
) -> None:
    async with stack(
        scaleout_redis,
        database_url,
        tmp_path,
        projectors=2,
        PARLEY_HTTP_REUSE_PORT="1",
        PARLEY_HTTP_ACCESS_LOG="1",
    ) as s:
        second_api = Service("command_api", s.api.env, s.api.port, tmp_path / "api-second.log", "/healthz")
        apis, killed = [s.api, second_api], list[str]()

        async def kill_one_of_each(s: Stack) -> None:
            for victim in (second_api, s.projectors[1], s.fanouts[1]):
                await asyncio.sleep(0.5)
                await victim.kill()
                killed.append(victim.module)
                await asyncio.sleep(1.0)  # the survivors carry the load meanwhile
                await start_listening(victim)

        try:
            await start_listening(second_api)
            async with httpx.AsyncClient() as http:  # a connection each: the kernel picks the process
                for _ in range(20):
                    answer = await http.post(f"http://127.0.0.1:{s.api.port}/v1/conversations",
                                             json={"title": "t", "participants": USERS[1:2]},
                                             headers={"Authorization": f"Bearer {s.token(USERS[0])}",
                                                      "Connection": "close"})  # fmt: skip
                    assert answer.status_code == 202, answer.text
            served = [api.log.read_text().count('"POST /v1/conversations HTTP/1.1" 202') for api in apis]
            assert min(served) > 0, served  # both command API processes take connections on the port
            await run_with_fault(s, tmp_path, kill_one_of_each)
        finally:
            await second_api.stop()
    assert killed == ["command_api", "projector", "realtime_fanout"]
