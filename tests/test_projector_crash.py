"""Real worker processes killed with SIGKILL during a load: every read model still equals the fold."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from events.log import EventLog
from projector.model import fold_entries
from projector.snapshot import read_tables
from servicekit.log_settings import LogSettings
from tests.cluster_fixtures import LogRedis, single_and_cluster
from tests.storeprobe import archive_keys, check_search_column, dead_letter_keys
from tests.workload import Workload

PARTITIONS = 4
pytestmark = pytest.mark.slow


def worker_env(redis_url: str, namespace: str, database_url: str, worker_id: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url, "DATABASE_URL": database_url, "PARLEY_LOG_NAMESPACE": namespace,
        "PARLEY_PARTITIONS": str(PARTITIONS), "PARLEY_PROJECTOR_BATCH": "50",
        "PARLEY_PROJECTOR_HTTP_PORT": "0", "PARLEY_PROJECTOR_LEASE_TTL_S": "1.5",
        "PARLEY_PROJECTOR_WORKER_ID": worker_id, "PARLEY_PROJECTOR_BLOCK_MS": "200",
        "PARLEY_JWT_SECRET": "crash-test-secret-crash-test-secret!", "PARLEY_DEV_MODE": "1",
    }  # fmt: skip


async def spawn(env: dict[str, str], log_file: Path) -> asyncio.subprocess.Process:
    out = log_file.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "projector", stdout=out, stderr=out, env=env
        )
    finally:
        out.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(port: int, limit_s: float = 20) -> None:
    """Poll /readyz until it answers 200 (the worker holds its leases and is caught up enough)."""
    async with httpx.AsyncClient() as client:
        for _ in range(int(limit_s * 10)):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("worker never became ready")


async def heads(log: EventLog) -> dict[int, str]:
    return {p: await log.head(p) for p in range(PARTITIONS)}


async def checkpoints(database_url: str) -> dict[int, str]:
    try:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute("SELECT partition, stream_id FROM parley.checkpoints")
            return {int(r[0]): str(r[1]) for r in await cur.fetchall()}
    except psycopg.Error:
        return {}


async def wait_until_projected(log: EventLog, database_url: str, limit_s: float = 40) -> None:
    last: list[Any] = []

    async def loop() -> None:
        while (now := [await checkpoints(database_url), await heads(log)])[0] != now[1]:
            last[:] = now
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(loop(), limit_s)
    except TimeoutError:
        raise AssertionError(f"not projected in {limit_s}s: checkpoints {last[0]}, heads {last[1]}") from None


async def assert_read_models_equal_fold(log: EventLog, database_url: str) -> None:
    entries = [e for p in range(PARTITIONS) for e in await log.read_range(p, "-", "+")]
    model = fold_entries(entries)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await read_tables(conn, "parley") == model.tables
        assert await dead_letter_keys(conn) == set(model.dead_letters)
        assert await archive_keys(conn) == model.archived
        assert await check_search_column(conn, "parley") == 0
        cur = await conn.execute("SELECT sum(events_applied) FROM parley.checkpoints")
        row = await cur.fetchone()
    assert row is not None and row[0] == len(entries)  # every entry applied exactly once


async def test_kill_9_mid_batch_then_restart_applies_everything_once(
    redis_server_url: str, redis_client: aioredis.Redis, log_namespace: str, database_url: str, tmp_path: Path
) -> None:
    layout = LogSettings(redis_server_url, log_namespace, PARTITIONS).layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    log = EventLog(redis_client, layout)
    workload = Workload(seed=11)
    await workload.append(appender, 500)

    async def load() -> None:
        for _ in range(25):
            await workload.append(appender, 100)
            await asyncio.sleep(0.15)

    env = worker_env(redis_server_url, log_namespace, database_url, "crash-worker")
    rng = random.Random(5)
    loader = asyncio.create_task(load())
    try:
        for _ in range(6):
            proc = await spawn(env, tmp_path / "worker.log")
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        await loader
        port = free_port()
        proc = await spawn({**env, "PARLEY_PROJECTOR_HTTP_PORT": str(port)}, tmp_path / "worker.log")
        try:
            await wait_ready(port)
            await wait_until_projected(log, database_url)
        finally:
            proc.terminate()
            try:
                assert await asyncio.wait_for(proc.wait(), 10) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        loader.cancel()
        await appender.close()
    await assert_read_models_equal_fold(log, database_url)
    assert workload.appended > 2500


async def lease_owners(database_url: str) -> dict[int, str]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT partition, owner FROM parley_store.leases WHERE expires_at > now()")
        return {int(r[0]): str(r[1]) for r in await cur.fetchall()}


@pytest.mark.parametrize("log_redis", single_and_cluster("cluster7"), indirect=True)
async def test_two_workers_share_partitions_and_survive_one_killed(
    log_redis: LogRedis, log_namespace: str, database_url: str, tmp_path: Path
) -> None:
    redis_client = log_redis.client()
    layout = LogSettings(log_redis.url, log_namespace, PARTITIONS).layout()
    appender = Appender(redis_client, layout)
    await appender.open()
    log = EventLog(redis_client, layout)
    workload = Workload(seed=23)
    await workload.append(appender, 300)
    ports = {"a": free_port(), "b": free_port()}
    procs = {
        name: await spawn(
            {**worker_env(log_redis.url, log_namespace, database_url, f"worker-{name}"),
             "PARLEY_PROJECTOR_HTTP_PORT": str(port), **log_redis.env()},
            tmp_path / f"{name}.log",
        )
        for name, port in ports.items()
    }  # fmt: skip
    try:
        await wait_ready(ports["a"])
        await wait_ready(ports["b"])
        half = PARTITIONS // 2
        for _ in range(100):  # until balanced: the first up may hold all four and hand two over one by one
            owners = await lease_owners(database_url)
            if sorted(owners.values()) == ["worker-a"] * half + ["worker-b"] * half:
                break
            await asyncio.sleep(0.1)
        assert sorted(owners.values()).count("worker-a") == half, owners
        await workload.append(appender, 600)
        procs["a"].send_signal(signal.SIGKILL)
        await procs["a"].wait()
        killed_at = asyncio.get_running_loop().time()
        await workload.append(appender, 600)
        while (
            set((await lease_owners(database_url)).values()) != {"worker-b"}
            or len(await lease_owners(database_url)) != PARTITIONS
        ):
            assert asyncio.get_running_loop().time() - killed_at < 8, "partitions not taken over"
            await asyncio.sleep(0.1)
        await wait_until_projected(log, database_url)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
        await appender.close()
    try:
        await assert_read_models_equal_fold(log, database_url)
    finally:
        await redis_client.aclose()
