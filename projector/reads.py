"""The query API's own resources, apart from the projection worker's: a connection pool with a statement
timeout, one checkpoint watcher that every position waiter shares, and a per-user cap on reads in flight.

So no number of readers, waiting or searching, takes a connection the worker or another user needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from events.position import LogPosition, parse_stream_id
from projector import queries
from projector.exceptions import PositionFromAnotherEpoch, QueryTimeout, ReadsUnavailable
from projector.settings import ProjectorSettings

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often the watcher reads the checkpoints while anyone waits
RESTART_MAX_S = 5.0

Checkpoints = dict[int, tuple[str | None, str]]


def reached(checkpoint: tuple[str | None, str] | None, position: LogPosition) -> bool:
    """Whether the read models of `checkpoint` include `position`.

    Raises:
        PositionFromAnotherEpoch: the checkpoint follows another epoch of the log.
    """
    if checkpoint is None:
        return False
    epoch, stream_id = checkpoint
    if epoch is not None and epoch != position.epoch:
        raise PositionFromAnotherEpoch(epoch)
    return parse_stream_id(stream_id) >= parse_stream_id(position.stream_id)


class CheckpointWatcher:
    """Reads every partition's checkpoint once per `POLL_S` while anyone waits, and wakes the waiters
    whose position it passed; an idle watcher reads nothing. A failed read is retried; a crash of the
    loop itself is logged and the loop restarted (with backoff), so waiters are never left unserved."""

    def __init__(self, reads: Reads) -> None:
        self._reads = reads
        self._known: Checkpoints = {}
        self._waiters: dict[asyncio.Future[None], LogPosition] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="checkpoint-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait(self, position: LogPosition, timeout_s: float) -> bool:
        """Whether the read models reached `position` within `timeout_s`.

        Raises:
            PositionFromAnotherEpoch: the checkpoint follows another epoch of the log.
        """
        with contextlib.suppress(PositionFromAnotherEpoch):  # what it knew may predate a new epoch
            if reached(self._known.get(position.partition), position):
                return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = position
        self._wake.set()
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.pop(waiter, None)

    async def _supervise(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._watch()
            except Exception:  # a bug in the loop: say so, and serve the waiters again
                log.exception("checkpoint watcher crashed (%d waiting); restarting in %.1fs",
                              len(self._waiters), delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_S)
                self._wake.set()

    async def _watch(self) -> None:
        while True:
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
        for waiter, position in list(self._waiters.items()):
            if waiter.done():
                continue
            try:
                if reached(self._known.get(position.partition), position):
                    waiter.set_result(None)
            except PositionFromAnotherEpoch as exc:
                waiter.set_exception(exc)


class UserSlots:
    """At most `limit` reads in flight per user; a request beyond is refused rather than queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def try_acquire(self, user: str) -> bool:
        held = self._in_flight.get(user, 0)
        if held >= self.limit:
            return False
        self._in_flight[user] = held + 1
        return True

    def release(self, user: str) -> None:
        held = self._in_flight.pop(user) - 1
        if held:
            self._in_flight[user] = held


class Reads:
    """The query API's pool (its own, `query_pool_size` connections, each with the statement timeout),
    its checkpoint watcher and its per-user slots; open it before serving, close it after."""

    def __init__(self, settings: ProjectorSettings) -> None:
        self.settings = settings
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url, min_size=1, max_size=settings.query_pool_size, open=False,
            timeout=settings.query_pool_timeout_s, name="query",
            kwargs={"prepare_threshold": None, "autocommit": True,
                    "options": f"-c statement_timeout={settings.query_statement_timeout_ms}"},
        )  # fmt: skip
        self.watcher = CheckpointWatcher(self)
        self.slots = UserSlots(settings.query_max_concurrent_per_user)

    async def open(self) -> None:
        await self.pool.open(wait=False)
        self.watcher.start()

    async def close(self) -> None:
        await self.watcher.stop()
        await self.pool.close(timeout=3)

    async def __aenter__(self) -> Reads:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[queries.AsyncConn]:
        """A pooled query connection; driver errors of availability come out as this layer's.

        Raises:
            ReadsUnavailable: Postgres is unreachable, or no connection freed up within the pool timeout.
            QueryTimeout: a statement ran past the statement timeout.
        """
        try:
            async with self.pool.connection() as conn:
                yield conn
        except psycopg.errors.QueryCanceled as exc:
            raise QueryTimeout(f"cancelled after {self.settings.query_statement_timeout_ms} ms") from exc
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise ReadsUnavailable(f"{type(exc).__name__}: {exc}".strip()) from exc
