"""The query API's own resources, apart from the projection worker's: per server it reads (the primary, or
each streaming replica) a connection pool with a statement timeout and one checkpoint watcher that every
position waiter on that server shares; and a per-user cap on reads in flight.

So no number of readers, waiting or searching, takes a connection the worker or another user needs. Every
read is one read-only REPEATABLE READ snapshot that also yields the fanout cursor its rows are exact at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg import IsolationLevel
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from events.cursor import encode_cursor
from events.position import LogPosition, parse_stream_id
from projector import queries
from projector.exceptions import (
    PositionFromAnotherEpoch,
    QueryTimeout,
    ReadModelsFromAnotherEpoch,
    ReadsUnavailable,
    SchemaSwapped,
)
from projector.metrics import QUERY_READS
from projector.replicas import Health, Replicas
from projector.settings import ProjectorSettings
from servicekit.slots import UserSlots
from servicekit.supervisor import Policy, Supervisor, honour_cancellation

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often the watcher reads the checkpoints while anyone waits
REPLICA_WAIT_SLICE_S = 0.2  # how soon a wait on a replica that stops serving moves to the primary
SNAPSHOT_ATTEMPTS = 3  # a read straddling a rebuild's swap is done again; two swaps in a row are unheard of
NOTHING = "0-0"  # the stream id before every entry

Checkpoints = dict[int, tuple[str | None, str]]
T = TypeVar("T")


def reached(checkpoint: tuple[str | None, str] | None, position: LogPosition) -> bool:
    """Whether the read models of `checkpoint` include `position` (a partition without a checkpoint has
    folded nothing, which includes only "0-0", a fanout cursor's position before every entry).

    Raises:
        PositionFromAnotherEpoch: the checkpoint follows another epoch of the log.
    """
    if checkpoint is None:
        return parse_stream_id(position.stream_id) == (0, 0)
    epoch, stream_id = checkpoint
    if epoch is not None and epoch != position.epoch:
        raise PositionFromAnotherEpoch(epoch)
    return parse_stream_id(stream_id) >= parse_stream_id(position.stream_id)


def reached_all(checkpoints: Checkpoints, positions: Sequence[LogPosition]) -> bool:
    """Whether the read models of `checkpoints` include every one of `positions` (see `reached`)."""
    return all(reached(checkpoints.get(p.partition), p) for p in positions)


def exact_cursor(checkpoints: Checkpoints, epoch: str, partitions: int) -> str:
    """The fanout cursor that read models at `checkpoints` are exact at in the log of `epoch`: they hold
    every event up to it and none after, so subscribing from it delivers exactly what they have not folded.
    A partition without a checkpoint, or whose checkpoint has no epoch, has folded nothing: "0-0".

    Raises:
        ReadModelsFromAnotherEpoch: a partition's checkpoint is of another epoch: no position is exact.
    """
    positions = []
    for partition in range(partitions):
        checkpoint_epoch, stream_id = checkpoints.get(partition, (None, NOTHING))
        if checkpoint_epoch is not None and checkpoint_epoch != epoch:
            raise ReadModelsFromAnotherEpoch(partition, checkpoint_epoch, epoch)
        positions.append(stream_id)
    return encode_cursor(epoch, positions)


class CheckpointWatcher:
    """Reads every partition's checkpoint once per `POLL_S` while anyone waits, and wakes the waiters
    whose position it passed; an idle watcher reads nothing. A failed read is retried; a crash of the
    loop itself is its supervisor's (policy RESTART, with backoff), so waiters are never left unserved."""

    def __init__(self, reads: ReadTarget) -> None:
        self._reads = reads
        self._known: Checkpoints = {}
        self._waiters: dict[asyncio.Future[None], Sequence[LogPosition]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, supervisor: Supervisor) -> None:
        self._task = supervisor.spawn("checkpoint-watcher", self._watch, Policy.RESTART, context=self._where)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait(self, positions: Sequence[LogPosition], timeout_s: float) -> bool:
        """Whether the read models reached every one of `positions` within `timeout_s` (a position token
        is one; a fanout cursor is one per partition).

        Raises:
            PositionFromAnotherEpoch: a checkpoint follows another epoch of the log.
        """
        with contextlib.suppress(PositionFromAnotherEpoch):  # what it knew may predate a new epoch
            if reached_all(self._known, positions):
                return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = positions
        self._wake.set()
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.pop(waiter, None)

    def _where(self) -> str:
        return f"{len(self._waiters)} waiting"

    async def _watch(self) -> None:
        self._wake.set()  # a restart after a crash serves whoever waits at once
        while True:
            honour_cancellation()
            await self._wake.wait()
            self._wake.clear()
            if not self._waiters:
                continue
            try:
                self._known = await self.read()
            except (ReadsUnavailable, QueryTimeout) as exc:
                log.warning("checkpoints not read (%d waiting): %s", len(self._waiters), exc)
            else:
                self._release()
            if self._waiters:
                await asyncio.sleep(POLL_S)
                self._wake.set()

    async def read(self) -> Checkpoints:
        async with self._reads.connection() as conn:
            return await queries.checkpoints(conn)

    def _release(self) -> None:
        for waiter, positions in list(self._waiters.items()):
            if waiter.done():
                continue
            try:
                if reached_all(self._known, positions):
                    waiter.set_result(None)
            except PositionFromAnotherEpoch as exc:
                waiter.set_exception(exc)


class ReadTarget:
    """One Postgres server the query API reads, the primary or a streaming replica: its pool (its own,
    `query_pool_size` connections, each with the statement timeout; autocommit, and every transaction on
    them read-only REPEATABLE READ) and its checkpoint watcher, which reads that server's checkpoints, so a
    position wait on it is answered once that server itself has the position. `health` is a replica's
    state at its last check (None for the primary)."""

    def __init__(self, name: str, url: str, settings: ProjectorSettings) -> None:
        self.name = name
        self.url = url
        self.settings = settings
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url, min_size=1, max_size=settings.query_pool_size, open=False,
            timeout=settings.query_pool_timeout_s, name=f"query-{name}",
            kwargs={"prepare_threshold": None, "autocommit": True,
                    "options": f"-c statement_timeout={settings.query_statement_timeout_ms}"},
            configure=_snapshot_transactions,
        )  # fmt: skip
        self.supervisor = Supervisor("query")
        self.watcher = CheckpointWatcher(self)
        self.health: Health | None = None

    async def open(self) -> None:
        await self.pool.open(wait=False)
        self.watcher.start(self.supervisor)

    async def close(self) -> None:
        await self.watcher.stop()
        await self.pool.close(timeout=3)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[queries.AsyncConn]:
        """A pooled query connection; driver errors of availability come out as this layer's (and a
        replica that fails so is skipped until a check finds it well again).

        Raises:
            ReadsUnavailable: Postgres is unreachable, or no connection freed up within the pool timeout.
            QueryTimeout: a statement ran past the statement timeout.
        """
        try:
            async with self.pool.connection() as conn:
                yield conn
        except psycopg.errors.QueryCanceled as exc:
            raise QueryTimeout(f"cancelled after {self.settings.query_statement_timeout_ms} ms") from exc
        except psycopg.errors.SerializationFailure as exc:  # a replica cancelled it replaying the primary
            raise ReadsUnavailable(f"{self.name}: {type(exc).__name__}: {exc}".strip()) from exc
        except (PoolTimeout, psycopg.OperationalError) as exc:
            reason = f"{self.name}: {type(exc).__name__}: {exc}".strip()
            if self.health is not None and isinstance(exc, psycopg.OperationalError):
                self.health = Health(False, f"a read failed: {reason}")
            raise ReadsUnavailable(reason) from exc

    async def exact(self, epoch: str, read: Callable[[queries.AsyncConn], Awaitable[T]]) -> tuple[T, str]:
        """What `read` returns from one snapshot of the read models, and the fanout cursor (log `epoch`)
        of the checkpoints read in that snapshot: the rows are exactly the state at that cursor.

        Raises:
            ReadModelsFromAnotherEpoch: see `exact_cursor`.
            ReadsUnavailable: also when every attempt straddled a rebuild's swap.
            QueryTimeout: as `connection`; and whatever `read` raises.
        """
        QUERY_READS.labels(self.name).inc()
        for _ in range(SNAPSHOT_ATTEMPTS):
            try:
                async with self.connection() as conn, conn.transaction():
                    checkpoints, table = await queries.snapshot_checkpoints(conn)
                    cursor = exact_cursor(checkpoints, epoch, self.settings.log.partitions)
                    value = await read(conn)
                    if table is not None and await queries.checkpoints_table(conn) != table:
                        raise SchemaSwapped(f"parley.checkpoints was {table} at the start")
                return value, cursor
            except SchemaSwapped as exc:
                log.info("read done again: %s", exc)
        raise ReadsUnavailable(f"the read models were swapped during {SNAPSHOT_ATTEMPTS} reads in a row")


class Reads:
    """The query API's read side: the primary (`database_url`) and the streaming replicas
    (`query_database_urls`), each a `ReadTarget`; `target()` picks the server a request is served by, a
    serving replica in turn or else the primary. Also the per-user slots. Open it before serving, close it
    after."""

    def __init__(self, settings: ProjectorSettings) -> None:
        self.settings = settings
        self.primary = ReadTarget("primary", settings.database_url, settings)
        urls = settings.query_database_urls
        self.replicas = (
            Replicas([ReadTarget(f"replica-{i}", url, settings) for i, url in enumerate(urls)], self.primary,
                     settings.query_replica_max_lag_s, settings.query_replica_check_s)
            if urls else None
        )  # fmt: skip
        self.slots = UserSlots(settings.query_max_concurrent_per_user)

    @property
    def targets(self) -> list[ReadTarget]:
        return [self.primary, *(self.replicas.targets if self.replicas else ())]

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The primary's pool."""
        return self.primary.pool

    @property
    def watcher(self) -> CheckpointWatcher:
        """The primary's checkpoint watcher."""
        return self.primary.watcher

    def target(self) -> ReadTarget:
        """The server to serve the next request from: a serving replica, each in turn, or the primary."""
        return (self.replicas.choose() if self.replicas else None) or self.primary

    async def wait(self, positions: Sequence[LogPosition], timeout_s: float) -> ReadTarget | None:
        """The server to read at `positions` from: `target()`, once its read models have every one of them
        (a position token is one; a fanout cursor one per partition); a replica that stops serving while a
        request waits on it hands the wait to the primary (never behind its replicas). None when the
        server waited on did not get there within `timeout_s`.

        Raises:
            PositionFromAnotherEpoch: a checkpoint follows another epoch of the log.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        target = self.target()
        while target.health is not None and target.health.serving:
            left = deadline - loop.time()
            if await target.watcher.wait(positions, min(left, REPLICA_WAIT_SLICE_S)):
                return target
            if left <= REPLICA_WAIT_SLICE_S:
                return None
        target = self.primary
        return target if await target.watcher.wait(positions, max(0.0, deadline - loop.time())) else None

    async def open(self) -> None:
        for target in self.targets:
            await target.open()
        if self.replicas:
            self.replicas.start(self.primary.supervisor)

    async def close(self) -> None:
        if self.replicas:
            await self.replicas.stop()
        for target in self.targets:
            await target.close()

    async def __aenter__(self) -> Reads:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[queries.AsyncConn]:
        """A pooled query connection on `target()` (see `ReadTarget.connection`)."""
        async with self.target().connection() as conn:
            yield conn

    async def exact(self, epoch: str, read: Callable[[queries.AsyncConn], Awaitable[T]]) -> tuple[T, str]:
        """`ReadTarget.exact` on `target()`."""
        return await self.target().exact(epoch, read)


async def _snapshot_transactions(conn: queries.AsyncConn) -> None:
    """Statements outside a transaction stay autocommit; `conn.transaction()` opens one consistent
    snapshot (BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY, one round trip)."""
    await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
    await conn.set_read_only(True)
