"""Several processes of a service: command API processes share one port (SO_REUSEPORT) and survive each
other's kill -9; projector workers rebalance their partition leases when one joins and when one dies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psycopg

from devstack.ports import free_port
from projector.settings import ProjectorSettings
from servicekit.auth_settings import AuthSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token
from tests.apiclient import ApiClient
from tests.conftest import DEV_SECRET
from tests.listening import listens
from tests.test_faults import PARTITIONS, Service, wait_projected

LEASE_TTL_S = 1.5


def base_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ, "REDIS_URL": redis_url, "PARLEY_LOG_NAMESPACE": namespace,
        "PARLEY_PARTITIONS": str(PARTITIONS), "PARLEY_JWT_SECRET": DEV_SECRET, "PARLEY_DEV_MODE": "1",
        "PARLEY_RATE_LIMIT_PER_S": "0", **extra,
    }  # fmt: skip


async def until(check: Callable[[], Awaitable[bool]], limit_s: float = 30) -> None:
    async with asyncio.timeout(limit_s):
        while not await check():
            await asyncio.sleep(0.1)


@asynccontextmanager
async def processes(*services: Service) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for service in services:
            await service.stop()


async def started_on_shared_port(service: Service) -> None:
    """Started, and listening itself (an answer on a shared port may come from a sibling)."""
    await service.start()
    assert service.proc is not None
    pid = service.proc.pid

    async def listening() -> bool:
        return listens(pid, service.port)

    await until(listening)


async def test_command_api_processes_share_one_port_and_survive_a_kill_9(
    redis_server_url: str, log_namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    env = base_env(redis_server_url, log_namespace, PARLEY_API_PORT=str(port), PARLEY_HTTP_REUSE_PORT="1",
                   PARLEY_HTTP_ACCESS_LOG="1")  # fmt: skip
    apis = [Service("command_api", env, port, tmp_path / f"api{i}.log", "/healthz") for i in range(2)]
    auth = {"Authorization": f"Bearer {mint_token(AuthSettings.from_env(Env(env)), 'ann')}"}
    body = {"title": "t", "participants": ["bob"]}

    async def create(n: int) -> list[int]:
        codes = []
        for _ in range(n):  # a new connection each time: the kernel picks the process per connection
            async with httpx.AsyncClient() as http:
                answer = await http.post(f"http://127.0.0.1:{port}/v1/conversations", json=body, headers=auth)
                codes.append(answer.status_code)
        return codes

    async with processes(*apis):
        for api in apis:
            await started_on_shared_port(api)
        assert await create(40) == [202] * 40
        served = [api.log.read_text().count('"POST /v1/conversations HTTP/1.1" 202') for api in apis]
        assert sum(served) == 40 and min(served) > 0, served  # both processes took connections
        await apis[0].kill()
        assert await create(20) == [202] * 20  # the other one serves the port alone


async def leases(database_url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT owner, count(*) FROM parley_store.leases WHERE expires_at > now() GROUP BY owner"
        )
        return {str(owner): int(n) for owner, n in await cur.fetchall()}


async def test_projector_workers_rebalance_when_one_joins_and_when_one_dies(
    redis_server_url: str, log_namespace: str, database_url: str, tmp_path: Path
) -> None:
    env = base_env(redis_server_url, log_namespace, DATABASE_URL=database_url,
                   PARLEY_PROJECTOR_LEASE_TTL_S=str(LEASE_TTL_S), PARLEY_PROJECTOR_BLOCK_MS="100")  # fmt: skip

    def projector(i: int) -> Service:
        port = free_port()
        mine = {**env, "PARLEY_PROJECTOR_HTTP_PORT": str(port), "PARLEY_PROJECTOR_WORKER_ID": f"p{i}"}
        return Service("projector", mine, port, tmp_path / f"projector{i}.log")

    first, second = projector(0), projector(1)
    async with ApiClient.running(env) as api, processes(first, second):
        conversation = await api.create_conversation("ann", "bob")

        async def send(n: int) -> None:
            for i in range(n):
                assert (await api.send("ann", conversation, f"m{i}")).status_code == 202

        async def held(expected: dict[str, int]) -> bool:
            return await leases(database_url) == expected

        await first.start()
        await until(lambda: held({"p0": PARTITIONS}))
        await send(10)
        await second.start()  # joins: the first releases what is beyond its fair share
        await until(lambda: held({"p0": PARTITIONS // 2, "p1": PARTITIONS // 2}))
        await send(10)
        await second.kill()  # dies: its leases expire and the first takes them back
        await until(lambda: held({"p0": PARTITIONS}), limit_s=LEASE_TTL_S * 4 + 10)
        await send(10)
        await wait_projected(ProjectorSettings.from_env(Env(env), auth=False))
        assert "released for balance" in first.log.read_text()
