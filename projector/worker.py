"""The worker: holds partition leases, and for each owned partition reads the log (XREAD, blocking),
folds a batch, commits it with the checkpoint, loops. Postgres or Redis errors: retry with backoff.

Trimmed-stream rule: trimmers (`retention.py`, or an operator) keep every entry from the archive's head on
(XTRIM MINID <= archive head and <= the checkpoint), and the archive's head is never after a checkpoint, so a
stream whose first id is after a non-zero checkpoint lost entries the read models never saw: that partition
stops (`LogGap`), it never skips, unless the stored checkpoint itself moved on (a rebuild's swap): reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import psycopg
import redis.exceptions
from psycopg_pool import AsyncConnectionPool

from events.exceptions import EpochChanged, EventsError, LogError
from events.log import EventLog, LogEntry
from events.position import parse_stream_id
from events.redisclient import redis_client
from events.schema import Envelope
from projector import leases, metrics
from projector.batch import Batch, DeadLetter, decode_entries, fold_batch
from projector.exceptions import (
    CheckpointMoved,
    EpochMismatch,
    FoldCrashed,
    LeaseLost,
    LogGap,
    ProjectionStopped,
)
from projector.migrate import migrate
from projector.poller import Poller
from projector.retention import Retention
from projector.settings import ProjectorSettings
from projector.state import ConversationState, forget_bodies
from projector.store import Store
from servicekit.gcpacing import GcPacer
from servicekit.supervisor import Policy, Supervisor, honour_cancellation

log = logging.getLogger(__name__)

_TRANSIENT = (
    psycopg.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,  # CLUSTERDOWN during a failover
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException,  # no node known for a slot, a moment
    OSError,
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Errors of the connection or of the partition itself: never blamed on an entry.
_NOT_ENTRY_FAULTS = (*_TRANSIENT, psycopg.InterfaceError, ProjectionStopped, EventsError)


def _entry_fault(exc: BaseException) -> bool:
    """Any other error some entry of the batch may cause (a fold bug, a row Postgres refuses, a value
    psycopg cannot dump): worth retrying the batch one entry at a time, where the culprit becomes a dead
    letter whatever it raised, so one entry never stops its partition."""
    return isinstance(exc, Exception) and not isinstance(exc, _NOT_ENTRY_FAULTS)


def _after(a: str, b: str) -> bool:
    return parse_stream_id(a) > parse_stream_id(b)


class Lag(NamedTuple):
    """How far a partition's read models are behind its stream."""

    events: int
    seconds: float


class PartitionProjector:
    """Projects one partition; its conversation-state cache is valid only at `position`."""

    def __init__(self, worker: Worker, partition: int) -> None:
        self.worker = worker
        self.partition = partition
        self.position = "0-0"
        self.version = 0
        self.applied = 0
        self.cache: OrderedDict[str, ConversationState] = OrderedDict()
        self.held: dict[str, int] = {}  # messages each cached conversation held after its last batch
        self.held_total = 0
        self._touched: set[str] = set()
        self.stopped: str | None = None
        self.retrying: str | None = None  # the last transient error, until a batch succeeds again
        self.lease_lost = False

    async def load(self) -> None:
        """Reset the cache and read the checkpoint; raise EpochMismatch if it belongs to another log."""
        self._clear_cache()
        async with self.worker.pool.connection() as conn:
            cp = await self.worker.store.checkpoint(conn, self.partition)
        if cp.epoch is not None and cp.epoch != self.worker.epoch:
            raise EpochMismatch(self.partition, cp.epoch, self.worker.epoch)
        self.position, self.applied, self.version = cp.stream_id, cp.events_applied, cp.version

    def crashed(self, exc: BaseException) -> None:
        """A bug ended `run` (its supervisor, policy STOP, logged it): the partition stops, never skips."""
        metrics.STOPPED.labels(str(self.partition)).set(1)
        self.stopped = f"crashed: {type(exc).__name__}: {exc}"

    async def run(self) -> None:
        """Loop until cancelled or stopped; a stop is logged loudly and shown in metrics, never skipped.
        Any other exception is a bug, for the supervisor (`crashed`)."""
        try:
            await self._run()
        finally:
            self.worker.poller.forget(self.partition)

    async def _run(self) -> None:
        label = str(self.partition)
        delay = 0.1
        loaded = False
        while True:
            honour_cancellation()
            try:
                if not loaded:
                    await self.load()
                    loaded = True
                await self.step()
                delay, self.retrying = 0.1, None
            except (EpochMismatch, EpochChanged) as exc:
                metrics.EPOCH_MISMATCH.labels(label).set(1)
                metrics.STOPPED.labels(label).set(1)
                self.stopped = str(exc)
                log.critical("PROJECTION STOPPED: %s", exc)
                return
            except CheckpointMoved as exc:
                log.warning("%s; reloading", exc)
                loaded = False
            except LeaseLost as exc:
                log.warning("%s; the next lease round decides who projects it", exc)
                self.lease_lost = True
                return
            except ProjectionStopped as exc:
                if isinstance(exc, LogGap):
                    metrics.LOG_GAP.labels(label).set(1)
                metrics.STOPPED.labels(label).set(1)
                self.stopped = str(exc)
                log.error("projection of partition %d stopped: %s", self.partition, exc)
                return
            except (*_TRANSIENT, LogError) as exc:
                metrics.DB_ERRORS.inc()
                self.retrying = f"{type(exc).__name__}: {exc}".strip()
                log.warning("partition %d: %s; retrying in %.1fs", self.partition, exc, delay)
                loaded = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.worker.settings.retry_max_s)

    def where(self) -> str:
        return f"partition {self.partition} at {self.position}"

    async def step(self) -> int:
        """Read, fold and commit one batch; returns how many entries it moved past.

        Raises EpochChanged (the log was recreated) or LogGap (entries after the checkpoint were trimmed).
        """
        w = self.worker
        entries = await w.poller.read(self.partition, self.position)
        if not entries:
            return 0
        assert w.epoch is not None
        pipe = w.redis.pipeline(transaction=False)
        pipe.hget(w.layout.meta_key(), "epoch")
        pipe.xrange(w.layout.stream_key(self.partition), "-", "+", count=1)
        epoch, first = await pipe.execute()
        if epoch is None or _text(epoch) != w.epoch:
            raise EpochChanged(w.epoch, None if epoch is None else _text(epoch))
        if first and self.position != "0-0" and _after(_text(first[0][0]), self.position):
            await (
                self._check_checkpoint()
            )  # a rebuild's swap may have moved it on, and retention trimmed since
            raise LogGap(self.partition, self.position, _text(first[0][0]))
        return await self.apply(entries)

    async def _check_checkpoint(self) -> None:
        """Raise CheckpointMoved (reload) when the stored checkpoint is not this projector's position."""
        async with self.worker.pool.connection() as conn:
            cp = await self.worker.store.checkpoint(conn, self.partition)
        if (cp.stream_id, cp.version) != (self.position, self.version):
            raise CheckpointMoved(
                self.partition, f"{self.position}#{self.version}", f"{cp.stream_id}#{cp.version}"
            )

    def _clear_cache(self) -> None:
        self.cache.clear()
        self.held.clear()
        self.held_total = 0

    def _bound_cache(self) -> None:
        """Evict the oldest-loaded conversations while the cache holds more than
        PARLEY_PROJECTOR_CACHE_CONVERSATIONS of them or PARLEY_PROJECTOR_CACHE_MESSAGES messages in all (a
        state holds the newest PARLEY_PROJECTOR_STATE_MESSAGES of its conversation, ~250 B each without its
        body; evicted ones are loaded again when next needed). Counted per batch over the conversations it
        touched only."""
        for cid in self._touched:
            state = self.cache.get(cid)
            now = 0 if state is None else len(state.messages)
            self.held_total += now - self.held.get(cid, 0)
            self.held[cid] = now
        settings = self.worker.settings
        while self.cache and (
            len(self.cache) > settings.cache_conversations or self.held_total > settings.cache_messages
        ):
            cid, _ = self.cache.popitem(last=False)
            self.held_total -= self.held.pop(cid, 0)

    async def apply(self, entries: Sequence[LogEntry]) -> int:
        """Fold and commit `entries` (the next ones after `position`); returns how many it moved past."""
        started = time.perf_counter()
        try:
            batch = await self._commit(entries, isolate=False)
        except Exception as exc:
            if not _entry_fault(exc):
                raise
            log.error("partition %d: batch failed (%s); applying one entry at a time", self.partition, exc)
            self._clear_cache()
            for entry in entries:
                batch = await self._commit([entry], isolate=True)
        self._after_commit(batch, time.perf_counter() - started)
        return len(entries)

    async def _commit(self, entries: Sequence[LogEntry], *, isolate: bool) -> Batch:
        w = self.worker
        assert w.epoch is not None
        decoded = decode_entries(entries)
        self._touched = {e.conversation_id for e in decoded if isinstance(e, Envelope)}
        needed = {cid for cid in self._touched if cid not in self.cache}
        async with w.pool.connection() as conn:
            try:
                if needed:
                    self.cache.update(await w.store.load_states(conn, needed, w.settings.state_messages))
                await w.store.load_needs(conn, self.cache, decoded)
                batch = fold_batch(
                    Batch(self.partition, w.epoch, self.position, self.version), entries, decoded, self.cache,
                    archive=w.store.archive,
                )  # fmt: skip
                await w.store.commit(conn, batch, w.settings.worker_id if w.use_leases else None)
                forget_bodies(batch.tables)
                for cid in self._touched:
                    if (state := self.cache.get(cid)) is not None:
                        state.trim(w.settings.state_messages)
            except BaseException as exc:
                self._clear_cache()
                if not isolate or not _entry_fault(exc):
                    raise
                # This single entry cannot be applied or written: keep it as a dead letter, move past it.
                entry = entries[0]
                batch = Batch(self.partition, w.epoch, self.position, self.version, entry.stream_id, 1)
                if isinstance(exc, FoldCrashed):
                    error, reason = f"{type(exc.error).__name__}: {exc.error}", "fold"
                else:
                    error, reason = f"{type(exc).__name__}: {exc}", "db"
                batch.dead.append(DeadLetter(self.partition, entry.stream_id, entry.data, error, reason))
                await w.store.commit(conn, batch, w.settings.worker_id if w.use_leases else None)
        self.position = batch.last
        self.version += 1
        self.applied += batch.entries
        return batch

    def _after_commit(self, batch: Batch, seconds: float) -> None:
        self._bound_cache()
        if not self.worker.observe:
            return
        label = str(self.partition)
        metrics.EVENTS_APPLIED.labels(label).inc(batch.entries)
        metrics.BATCH_SIZE.observe(batch.entries)
        metrics.BATCH_SECONDS.observe(seconds)
        for dead in batch.dead:
            metrics.DEAD_LETTERS.labels(label, dead.reason).inc()
            log.error("dead letter: partition %d entry %s: %s", dead.partition, dead.stream_id, dead.error)


class Worker:
    """A projector process: migrations, leases, one task per owned partition, lag metrics."""

    def __init__(
        self,
        settings: ProjectorSettings,
        *,
        use_leases: bool = True,
        store: Store | None = None,
        observe: bool = True,
    ) -> None:
        """`store` selects the read-model schema (a rebuild's); `observe=False` keeps metrics untouched."""
        self.settings = settings
        self.use_leases = use_leases
        self.observe = observe
        self.layout = settings.log.layout()
        # Everything the worker sends to Redis is a read or an idempotent trim: safe to retry.
        self.redis = redis_client(
            settings.log.redis_url, settings.block_ms / 1000 + 10, cluster=settings.log.redis_cluster,
            max_connections=settings.log.partitions + 8,
        )  # fmt: skip
        self.log = EventLog(self.redis, self.layout, replica_reads=settings.log.read_replicas)
        self.poller = Poller(self.log, settings.batch, settings.block_ms)
        self.store = store or Store()
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url, min_size=1, max_size=settings.log.partitions + 4, open=False, timeout=5,
            kwargs={"prepare_threshold": None}, configure=self.store.prepare_connection,
        )  # fmt: skip
        self.retention = Retention.of(settings, self.redis, self.pool)
        self.supervisor = Supervisor("projector")
        self.epoch: str | None = None
        self.projectors: dict[int, PartitionProjector] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.ready = asyncio.Event()
        self.lag: dict[int, float] = {}
        self.lags: dict[int, Lag] = {}

    async def start(self) -> None:
        """Migrate (retrying while Postgres is down), open the pool, learn the log's epoch."""
        delay = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.settings.database_url) as conn:
                    for applied in await migrate(conn):
                        log.info("migration applied: %s", applied)
                break
            except psycopg.OperationalError as exc:
                log.warning("postgres not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
        await self.pool.open(wait=True)
        delay = 0.2
        while self.epoch is None:
            try:
                self.epoch = await self.log.open(create=False)
            except (LogError, *_TRANSIENT) as exc:
                log.warning("log not readable yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
        async with self.pool.connection() as conn:
            await self.store.ensure_checkpoints(conn, range(self.layout.partitions))
        log.info("projector %s: log epoch %s, %d partitions", self.settings.worker_id, self.epoch,
                 self.layout.partitions)  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Hold leases and project owned partitions until `stop` is set; trim the streams meanwhile."""
        retention = None
        if self.settings.retention:
            retention = self.supervisor.spawn(
                "retention", lambda: self.retention.run(stop), Policy.RESTART, context=self.retention.where
            )
        try:
            async with self.paced_gc():
                await self._run(stop)
        finally:
            if retention is not None:
                retention.cancel()
                await asyncio.gather(retention, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def paced_gc(self) -> AsyncIterator[None]:
        """Python's cyclic collector on a schedule while inside (`gc_paced`; see servicekit.gcpacing)."""
        s = self.settings
        pacer = GcPacer(metrics.GC_PAUSE_SECONDS, s.gc_young_every_s, s.gc_full_every_s)
        if s.gc_paced:
            pacer.start(self.supervisor)
        try:
            yield
        finally:
            await pacer.stop()

    async def _run(self, stop: asyncio.Event) -> None:
        ttl = self.settings.lease_ttl_s
        try:
            while not stop.is_set():
                manage = asyncio.ensure_future(self._manage())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({manage, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not manage.done():
                    manage.cancel()
                    await asyncio.gather(manage, return_exceptions=True)
                    break
                manage.result()
                self.ready.set()
                try:
                    await asyncio.wait_for(stop.wait(), ttl / 3 if self.use_leases else 1.0)
                except TimeoutError:
                    pass
        finally:
            try:
                await asyncio.wait_for(self._stop_all(), 5)
            except TimeoutError:
                log.warning("shutdown did not finish in 5s; leases will expire on their own")

    async def _manage(self) -> None:
        try:
            if self.use_leases:
                async with self.pool.connection() as conn:
                    held, share = await leases.lease_round(
                        conn, self.settings.worker_id, self.layout.partitions, self.settings.lease_ttl_s
                    )
            else:
                held, share = set(range(self.layout.partitions)), self.layout.partitions
        except _TRANSIENT as exc:
            log.warning("lease round failed: %s", exc)
            return
        for p in [p for p, pr in self.projectors.items() if pr.lease_lost]:
            await self._stop(p)  # restarted below if this round won the lease back
        for p in sorted(set(self.tasks) - held):
            log.warning("lease of partition %d lost; stopping it", p)
            await self._stop(p)
        for p in sorted(held - set(self.tasks)):
            log.info("partition %d acquired", p)
            projector = self.projectors[p] = PartitionProjector(self, p)
            self.tasks[p] = self.supervisor.spawn(
                f"partition-{p}",
                projector.run,
                Policy.STOP,
                context=projector.where,
                on_stop=projector.crashed,
            )
        if self.use_leases and len(held) > share:
            for p in sorted(held)[share:]:
                log.info("partition %d released for balance", p)
                await self._stop(p)
                async with self.pool.connection() as conn:
                    await leases.release(conn, self.settings.worker_id, p)
        metrics.OWNED.set(len(self.tasks))
        await self._lag()

    async def _lag(self) -> None:
        try:
            await self.measure_lag()
        except _TRANSIENT as exc:
            log.warning("lag not measured: %s", exc)

    async def measure_lag(self) -> dict[int, Lag]:
        """Each owned partition's lag now, also set in the lag gauges (and kept for `lag_seconds`).

        events = entries the stream ever received (Redis 7 `entries-added`; on 6.2 its length, which
        undercounts after a trim) minus entries applied; seconds = head entry time minus applied entry time.
        """
        lags: dict[int, Lag] = {}
        for p, projector in list(self.projectors.items()):
            info: dict[Any, Any] = await self.log.info(p) or {}  # None: no stream yet
            added = info.get("entries-added", info.get("length", 0))
            last = info.get("last-entry")
            head = _text(last[0]) if last else "0-0"
            seconds = max(0.0, (parse_stream_id(head)[0] - parse_stream_id(projector.position)[0]) / 1000)
            if head == projector.position or _after(projector.position, head):
                seconds = 0.0
            lags[p] = Lag(max(0, int(added) - projector.applied), seconds)
            self.lag[p] = seconds
            metrics.LAG_EVENTS.labels(str(p)).set(lags[p].events)
            metrics.LAG_SECONDS.labels(str(p)).set(seconds)
        self.lags = lags
        return lags

    def lag_seconds(self) -> float:
        """The largest lag (seconds) among owned partitions at the last measurement."""
        return max((self.lag.get(p, 0.0) for p in self.projectors), default=0.0)

    async def _stop(self, partition: int) -> None:
        task = self.tasks.pop(partition, None)
        self.projectors.pop(partition, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _stop_all(self) -> None:
        for p in list(self.tasks):
            await self._stop(p)
        if self.use_leases:
            try:
                async with self.pool.connection(timeout=2) as conn:
                    await leases.leave(conn, self.settings.worker_id)
            except Exception as exc:  # shutting down: the leases expire anyway
                log.warning("could not release leases: %s", exc)

    async def close(self) -> None:
        await self.poller.close()
        await self.pool.close(timeout=3)
        await self.redis.aclose()

    async def caught_up(self, partitions: Sequence[int] | None = None) -> bool:
        """True when every given (default: owned) partition's position is the log's head."""
        for p in partitions if partitions is not None else list(self.projectors):
            projector = self.projectors.get(p)
            if projector is None or projector.position != await self.log.head(p):
                return False
        return True
