"""A real Redis Cluster from redis-server binaries: 3 masters and 3 replicas on free loopback ports in a
folder, joined with `redis-cli --cluster create` (redis-cli's default slot split: 0-5460, 5461-10922,
10923-16383) and ready once every node reports cluster_state:ok. The tests' cluster fixture and
`make bench-scale` start it."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from devstack.child import ServerStartError
from devstack.ports import LOOPBACK, port_is_free
from devstack.process import log_tail
from devstack.servers import RedisServer

MASTERS = 3
NODE_TIMEOUT_MS = 1_000
"""Short, so a killed master's replica is promoted within seconds (failover tests)."""
READY_TIMEOUT_S = 30.0
START_ATTEMPTS = 3


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

    node_timeout_ms = NODE_TIMEOUT_MS

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
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

    def __init__(self, data_dir: Path, binary: Path, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        """`node_timeout_ms`: how long a silent master has before its replica replaces it."""
        self.binary = binary
        self.nodes = [
            ClusterNodeServer(data_dir / f"node{i}", free_node_port(), appendfsync="everysec", binary=binary)
            for i in range(2 * MASTERS)
        ]
        for node in self.nodes:
            node.node_timeout_ms = node_timeout_ms

    @property
    def url(self) -> str:
        """A URL naming one node: a cluster client learns the rest from it."""
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            self._start_node(node)
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

    @staticmethod
    def _start_node(node: ClusterNodeServer) -> None:
        """Start `node`, on other ports when someone took its pair between our check and its bind (other
        test sessions start servers on this host too)."""
        for attempt in range(START_ATTEMPTS):
            try:
                node.start()
                return
            except ServerStartError:
                if attempt == START_ATTEMPTS - 1 or "Address already in use" not in log_tail(node.log_path):
                    raise
                node.port = free_node_port()

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
