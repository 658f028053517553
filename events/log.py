"""The Redis edge of the log: create or open it (epoch, partition count), and read its streams.

Appending is the command API's job (`command_api/append.py`); this module is what every reader shares.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.exceptions
import uuid_utils
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.cluster import PRIMARY, REPLICA

from events.exceptions import EpochChanged, LogNotInitialized, PartitionMismatch, TagsMismatch
from events.layout import LogLayout
from events.redisclient import RedisClient, learn_topology, refresh_topology, send_on_node


class LogEntry(msgspec.Struct, frozen=True, gc=False):
    """One raw stream entry: still bytes, so a reader can quarantine what it cannot decode.

    Readers make one per entry and hold a batch of them in flight: scalars only, so untracked by the
    cyclic garbage collector, and quicker to make than a named tuple.
    """

    partition: int
    stream_id: str
    data: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TopologyChanged(redis.exceptions.ConnectionError):
    """A cluster node no longer serves a partition it was asked for (failover, slot migration): the
    topology was learned again; read again, grouped anew (`EventLog.node_groups`)."""


CLUSTER_IDLE_POLL_MS = (2, 20)
"""On a cluster, the pause after a poll of a node's partitions that found nothing: doubling from the first
to the second (a partition's new entry waits at most that long once its node has been idle a while)."""
_MOVED = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
)


_REPLICA_CHECK = ((b"READONLY",), (b"ROLE",))
"""Sent first in each write of replica reads: serve this connection's reads of the master's slots, and say
whether this node is a replica in sync with its master."""


REPLICA_LOOKUP_S = 1.0
"""With replica reads, how often a reader that had to read a master asks the cluster for its replicas."""


class ReplicaNotInSync(TopologyChanged):
    """The replica a read went to is not in sync with its master (a master that rejoined as a replica and
    still holds its own history, which may end in entries the log lost); read again once it is."""


def _check_replica(ok: Any, role: Any, as_replica: bool) -> None:
    """Raise `ReplicaNotInSync` unless the node's `ROLE` is a replica in sync, or a master where the reader
    read a master (`as_replica` False: no replica of it known)."""
    if isinstance(ok, Exception):
        raise ok
    if isinstance(role, Exception):
        raise role
    kind = _text(role[0])
    if kind == "slave" and _text(role[3]) != "connected":
        raise ReplicaNotInSync(f"replica of {_text(role[1])}:{role[2]} is {_text(role[3])}")
    if kind == "master" and as_replica:  # promoted, or a killed master back that has not learned it lost
        raise ReplicaNotInSync("a node taken for a replica answers as a master: the topology changed")


class EventLog:
    """Opens the log and reads its partitions; every call talks to Redis, nothing is cached but the epoch.

    With `replica_reads` (on a cluster) entries are read from the first replica of each partition's master
    when the master has one: a reader then takes only entries that replica holds, so when the master dies
    and that replica is promoted, nothing a reader took is lost from the log (README: Redis Cluster).
    """

    def __init__(self, redis: RedisClient, layout: LogLayout, *, replica_reads: bool = False) -> None:
        self.redis = redis
        self.replica_reads = replica_reads
        self._looked_up = 0.0
        self.layout = layout
        self.epoch: str | None = None

    async def open(self, *, create: bool) -> str:
        """Return the log's epoch, creating the log first when `create` and it does not exist.

        Raises:
            LogNotInitialized: the log does not exist and `create` is false.
            PartitionMismatch: the log has another partition count than the layout.
        """
        meta_key = self.layout.meta_key()
        meta = await self._meta()
        if create and "epoch" not in meta:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(meta_key, "epoch", uuid_utils.uuid7().hex)
            pipe.hsetnx(meta_key, "partitions", str(self.layout.partitions))
            pipe.hsetnx(meta_key, "created_at_ms", str(int(time.time() * 1000)))
            pipe.hsetnx(meta_key, "tags", self.layout.tags)
            await pipe.execute()
            meta = await self._meta()
        if "epoch" not in meta:
            raise LogNotInitialized(f"no log at {meta_key}")
        actual = int(meta.get("partitions", "0"))
        if actual != self.layout.partitions:
            raise PartitionMismatch(self.layout.partitions, actual)
        tags = meta.get("tags", "plain")  # a log made before the field had the plain `{pN}` tags
        if tags != self.layout.tags:
            raise TagsMismatch(self.layout.tags, tags)
        epoch = meta["epoch"]
        if create:
            pipe = self.redis.pipeline(transaction=False)
            for p in range(self.layout.partitions):
                pipe.hsetnx(self.layout.partition_meta_key(p), "epoch", epoch)
            await pipe.execute()
        for p in range(self.layout.partitions):
            part_epoch = await self.redis.hget(self.layout.partition_meta_key(p), "epoch")
            if part_epoch is None:
                raise LogNotInitialized(f"partition {p} of log {epoch} has no metadata")
            if _text(part_epoch) != epoch:
                raise EpochChanged(epoch, _text(part_epoch))
        self.epoch = epoch
        return epoch

    async def _meta(self) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in (await self.redis.hgetall(self.layout.meta_key())).items()}

    async def check_epoch(self, expected: str) -> None:
        """Raise `EpochChanged` unless the log still has epoch `expected`."""
        actual = await self.redis.hget(self.layout.meta_key(), "epoch")
        if actual is None or _text(actual) != expected:
            raise EpochChanged(expected, None if actual is None else _text(actual))

    async def read_after(
        self, partition: int, after_id: str, count: int, block_ms: int | None = None
    ) -> list[LogEntry]:
        """Entries of `partition` strictly after `after_id` ("0-0" for the start), oldest first."""
        return await self.read_many({partition: after_id}, count, block_ms)

    def node_groups(self, partitions: Sequence[int]) -> list[list[int]]:
        """`partitions` grouped by the Redis node serving them, as the client knows the topology now: one
        group on a single Redis, one per master on a cluster (read each with one `read_many`)."""
        groups: dict[str, list[int]] = {}
        for p in partitions:
            groups.setdefault(self.node_of(p), []).append(p)
        return list(groups.values())

    def node_of(self, partition: int) -> str:
        """The name of the node serving `partition` ("" on a single Redis, or while the client knows no
        node for its slot: reading it then raises `TopologyChanged`), as the client knows now."""
        if not isinstance(self.redis, RedisCluster):
            return ""
        try:
            return self._node(partition).name
        except redis.exceptions.RedisClusterException:
            return ""

    def _node(self, partition: int) -> ClusterNode:
        assert isinstance(self.redis, RedisCluster)
        slot = self.redis.keyslot(self.layout.stream_key(partition))
        if self.replica_reads:
            serving = self.redis.nodes_manager.slots_cache.get(slot, ())
            if len(serving) > 1:
                return serving[1]  # the same replica every time
        return self.redis.nodes_manager.get_node_from_slot(slot)

    async def _on_node(self, partitions: Sequence[int], commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send raw reads in one write to the node serving `partitions` (one node's), read each reply; a
        refusal (MOVED, ASK, CLUSTERDOWN), a lost node or a replica not in sync relearns the topology and
        raises `TopologyChanged`."""
        assert isinstance(self.redis, RedisCluster)
        try:
            await learn_topology(self.redis)
            node = self._node(partitions[0])
            if self.replica_reads:
                ok, role, *replies = await send_on_node(node, [*_REPLICA_CHECK, *commands])
                _check_replica(ok, role, node.server_type == REPLICA)
                await self._look_for_replicas(node)
            else:
                replies = await send_on_node(node, commands)
        except (
            *_MOVED, redis.exceptions.RedisClusterException, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        ) as exc:  # fmt: skip
            await refresh_topology(self.redis)
            raise TopologyChanged(f"partitions {list(partitions)}: {type(exc).__name__}: {exc}") from exc
        for reply in replies:
            if isinstance(reply, _MOVED):
                await refresh_topology(self.redis)
                raise TopologyChanged(f"partitions {list(partitions)}: {type(reply).__name__}: {reply}")
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
        return replies

    async def _look_for_replicas(self, node: ClusterNode) -> None:
        """Replica reads that went to a master (none of its replicas known): learn the topology again, at
        most every REPLICA_LOOKUP_S (Redis 7 lists a replica only once it has received some data)."""
        assert isinstance(self.redis, RedisCluster)
        if node.server_type == PRIMARY and time.monotonic() - self._looked_up >= REPLICA_LOOKUP_S:
            self._looked_up = time.monotonic()
            await refresh_topology(self.redis)

    async def read_many(
        self, after: dict[int, str], count: int, block_ms: int | None = None
    ) -> list[LogEntry]:
        """Entries of several partitions, each strictly after its id, in one XREAD; per partition in order.

        On a cluster a multi-key XREAD must stay in one slot (CROSSSLOT), so each node's partitions are read
        by one XREAD each, sent in one write (one round trip per node); with `block_ms`, a poll that finds
        nothing is repeated after a short, growing pause (CLUSTER_IDLE_POLL_MS) until `block_ms` have passed.
        """
        if isinstance(self.redis, RedisCluster):
            groups = self.node_groups(list(after))
            if len(groups) > 1:
                parts = await asyncio.gather(
                    *(self.read_many({p: after[p] for p in g}, count, block_ms) for g in groups)
                )
                return [e for part in parts for e in part]
            return await self._poll_node(after, count, block_ms) if after else []
        args: list[str | int] = ["COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        keys = {self.layout.stream_key(p): p for p in after}
        args += ["STREAMS", *keys, *after.values()]
        reply: Any = await self.redis.execute_command(_RAW_XREAD, *args)  # type: ignore[no-untyped-call]
        return self._entries(reply, keys)

    async def _poll_node(self, after: dict[int, str], count: int, block_ms: int | None) -> list[LogEntry]:
        keys = {self.layout.stream_key(p): p for p in after}
        partitions = list(after)
        block = ["BLOCK", block_ms] if block_ms is not None and len(after) == 1 else []  # one slot: a BLOCK
        commands = [(_RAW_XREAD, "COUNT", count, *block, "STREAMS", key, after[p]) for key, p in keys.items()]
        if block or block_ms is None:
            replies = await self._on_node(partitions, commands)
            return [e for reply in replies for e in self._entries(reply, keys)]
        deadline = time.monotonic() + block_ms / 1000
        pause_ms = CLUSTER_IDLE_POLL_MS[0]
        while True:
            replies = await self._on_node(partitions, commands)
            entries = [e for reply in replies for e in self._entries(reply, keys)]
            left = deadline - time.monotonic()
            if entries or left <= 0:
                return entries
            await asyncio.sleep(min(pause_ms / 1000, left))
            pause_ms = min(pause_ms * 2, CLUSTER_IDLE_POLL_MS[1])

    @staticmethod
    def _entries(reply: Any, keys: dict[str, int]) -> list[LogEntry]:
        if not reply:
            return []
        entries: list[LogEntry] = []
        streams = reply.items() if isinstance(reply, dict) else reply  # RESP3 map or RESP2 list
        for stream, items in streams:
            partition = keys[_text(stream)]
            entries += [_raw_entry(partition, item) for item in items]
        return entries

    async def read_range(
        self, partition: int, start_id: str, end_id: str, count: int | None = None
    ) -> list[LogEntry]:
        """Entries of `partition` with `start_id <= id <= end_id` (`-`/`+` for the ends)."""
        args: list[str | int] = [self.layout.stream_key(partition), start_id, end_id]
        if count is not None:
            args += ["COUNT", count]
        items: Any
        if isinstance(self.redis, RedisCluster):
            (items,) = await self._on_node([partition], [(_RAW_XRANGE, *args)])
        else:
            items = await self.redis.execute_command(_RAW_XRANGE, *args)  # type: ignore[no-untyped-call]
        return [_raw_entry(partition, item) for item in items]

    async def head(self, partition: int) -> str:
        """The id of the last entry of `partition`, or "0-0" when it is empty."""
        items = await self._one(partition, b"XREVRANGE", "+", "-")
        return _text(items[0][0]) if items else "0-0"

    async def first_id(self, partition: int) -> str | None:
        """The id of the oldest entry the stream still holds (None when empty): older ones were trimmed."""
        items = await self._one(partition, _RAW_XRANGE, "-", "+")
        return _text(items[0][0]) if items else None

    async def info(self, partition: int) -> Any:
        """`XINFO STREAM` of `partition` as redis-py parses it; None only when the stream does not exist.
        Any other refusal (CLUSTERDOWN and TRYAGAIN during a failover or migration) is raised: taking it
        for "no stream" made a resume look trimmed, and a lag or an audit look empty."""
        return await stream_info(self.redis, self.layout.stream_key(partition))

    async def _one(self, partition: int, command: bytes, start: str, end: str) -> Any:
        args = (command, self.layout.stream_key(partition), start, end, "COUNT", 1)
        if isinstance(self.redis, RedisCluster):
            (items,) = await self._on_node([partition], [args])
            return items
        return await self.redis.execute_command(*args)  # type: ignore[no-untyped-call]


async def stream_info(client: RedisClient, key: str) -> Any:
    """`XINFO STREAM key`; None when there is no such key (`EventLog.info` for a partition)."""
    try:
        return await client.xinfo_stream(key)
    except redis.exceptions.ResponseError as exc:
        if type(exc) is redis.exceptions.ResponseError and NO_SUCH_KEY in str(exc).lower():
            return None
        raise


NO_SUCH_KEY = "no such key"
"""How Redis 6.2 and 7 word XINFO's refusal of a missing key (`ERR no such key`)."""

# Sent as bytes, these command names match none of redis-py's response callbacks (keyed by str), so
# the reply stays the raw nested list: building a dict per entry was 12% of the projector's CPU.
_RAW_XREAD = b"XREAD"
_RAW_XRANGE = b"XRANGE"


def _raw_entry(partition: int, item: list[Any]) -> LogEntry:
    stream_id, fields = item
    if len(fields) == 2 and fields[0] == b"e":  # what the appender writes
        data = fields[1]
    else:
        data = b""
        for i in range(0, len(fields) - 1, 2):
            if fields[i] in (b"e", "e"):
                data = fields[i + 1]
                break
    return LogEntry(
        partition,
        stream_id.decode() if type(stream_id) is bytes else stream_id,
        data if type(data) is bytes else data.encode(),
    )
