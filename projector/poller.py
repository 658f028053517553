"""Blocking reads of a worker's partitions, pooled: at most one XREAD per Redis node in flight.

Each partition's projector asks for the entries after its position and waits; one loop per node (one on a
single Redis) reads every waiting partition of that node in one XREAD BLOCK, hands each its entries, and
reads again. So a cluster of N masters costs N round trips per poll, not P. A partition that got entries
is folding: while one is, the node's XREAD blocks only briefly, so it is read again soon after it asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from events.log import EventLog, LogEntry, TopologyChanged
from events.redisclient import REDIS_ERRORS
from servicekit.supervisor import honour_cancellation

log = logging.getLogger(__name__)

Waiting = dict[int, tuple[str, "asyncio.Future[list[LogEntry]]"]]
REJOIN_BLOCK_MS = 10
"""The XREAD block while some partition of the node is folding (it rejoins within this, at worst)."""


class Poller:
    """`read(partition, after)` waits for the next entries of `partition`; `forget` a partition that
    stopped; `close` ends the loops."""

    def __init__(self, log: EventLog, count: int, block_ms: int) -> None:
        self.log = log
        self.count = count
        self.block_ms = block_ms
        self._waiting: Waiting = {}
        self._folding: set[int] = set()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}

    async def read(self, partition: int, after: str) -> list[LogEntry]:
        """The entries of `partition` after `after` (at most `count`), once there are some.

        Raises:
            redis.exceptions.RedisError: the node's read failed (this partition's share of it).
        """
        future: asyncio.Future[list[LogEntry]] = asyncio.get_running_loop().create_future()
        self._waiting[partition] = (after, future)
        self._folding.discard(partition)
        self._kick()
        try:
            return await future
        finally:
            if self._waiting.get(partition, (None, None))[1] is future:
                del self._waiting[partition]

    def forget(self, partition: int) -> None:
        """`partition` no longer reads (stopped, lease lost): the node's XREAD need not wait for it."""
        self._folding.discard(partition)

    async def close(self) -> None:
        for task in self._loops.values():
            task.cancel()
        for task in self._loops.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops.clear()

    def _kick(self) -> None:
        """Wake the loop of every node a waiting partition is on (starting it if need be)."""
        for node in {self.log.node_of(p) for p in self._waiting}:
            self._wake.setdefault(node, asyncio.Event()).set()
            task = self._loops.get(node)
            if task is None or task.done():
                self._loops[node] = asyncio.create_task(self._loop(node), name=f"poller-{node or 'redis'}")

    async def _loop(self, node: str) -> None:
        wake = self._wake.setdefault(node, asyncio.Event())
        backoff = 0.05
        while True:
            honour_cancellation()
            wake.clear()
            mine = {p: w for p, w in self._waiting.items() if self.log.node_of(p) == node}
            if not mine:
                # A topology learned meanwhile (another node's failover, a replica found) may have moved
                # waiting partitions to a node with no loop yet.
                self._kick()
                await wake.wait()
                continue
            folding = any(self.log.node_of(p) == node for p in self._folding)
            try:
                entries = await self.log.read_many(
                    {p: after for p, (after, _) in mine.items()},
                    self.count,
                    REJOIN_BLOCK_MS if folding else self.block_ms,
                )
                backoff = 0.05
            except TopologyChanged as exc:  # the partitions stay waiting, read where they now are
                log.warning("node %s: %s; regrouping in %.2fs", node, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                self._kick()
                continue
            except (*REDIS_ERRORS, OSError) as exc:  # each partition retries as it does
                self._fail(mine, exc)
                continue
            except Exception as exc:  # a bug: the partitions see it rather than wait for ever
                log.exception("node %s: poll failed", node)
                self._fail(mine, exc)
                continue
            self._hand_out(mine, entries)

    def _hand_out(
        self, mine: dict[int, tuple[str, asyncio.Future[list[LogEntry]]]], entries: list[LogEntry]
    ) -> None:
        by_partition: dict[int, list[LogEntry]] = {}
        for entry in entries:
            by_partition.setdefault(entry.partition, []).append(entry)
        for p, got in by_partition.items():
            future = mine[p][1]
            if self._waiting.get(p, (None, None))[1] is future and not future.done():
                del self._waiting[p]
                self._folding.add(p)
                future.set_result(got)

    def _fail(self, mine: Waiting, exc: BaseException) -> None:
        for p, (_, future) in mine.items():
            if self._waiting.get(p, (None, None))[1] is future and not future.done():
                del self._waiting[p]
                future.set_exception(exc)
