"""Stream retention: trim each partition's stream (XTRIM MINID) to the window, never past the archive.

An entry may go once it is archived (at or below both the archive's head and the live checkpoint, so neither
the projector's LogGap rule nor the fanout's archive rule ever sees a hole), older than `retain_stream_s`
and not among the last `retain_stream_events` entries of its partition (0 switches a bound off).

The decision is pure (`trim_bound`, then `settle` once the ids below the bound are known, which the count
bound needs); `Retention` is the Redis/Postgres edge and the supervised loop of the projector process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis.exceptions
from psycopg_pool import AsyncConnectionPool

from events.layout import LogLayout
from events.log import EventLog, stream_info
from events.position import parse_stream_id
from events.redisclient import RedisClient
from projector import metrics
from projector.settings import ProjectorSettings
from projector.store import Store

log = logging.getLogger(__name__)

STEP_ENTRIES = 10_000  # most entries one XTRIM removes (bounds each Redis call and each XRANGE read)
MAX_STEPS = 100  # most XTRIMs per partition per pass; a longer backlog goes at the next pass

_ARCHIVE_HEAD_SQL = """
SELECT stream_id FROM parley_store.event_archive WHERE epoch = %s AND partition = %s
ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1
"""
_REBUILD_RUNNING_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND classid = %s AND objid = %s AND objsubid = 1)
"""


def _key(stream_id: str) -> tuple[int, int]:
    return parse_stream_id(stream_id)


@dataclass(frozen=True, slots=True)
class Window:
    """What Redis keeps: entries younger than `retain_s`, and the last `retain_events` (0: bound off)."""

    retain_s: float
    retain_events: int


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A partition's stream as XINFO STREAM tells it (ids None when empty)."""

    first: str | None
    last: str | None
    length: int


@dataclass(frozen=True, slots=True)
class Bound:
    """How far a stream may go: entries with ids below `minid` (None: none now), at most `allowed` of them
    (None: no count bound). `blocked`: the archive, not the window, is what holds entries back."""

    minid: str | None
    reason: str
    allowed: int | None = None
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """One XTRIM: `XTRIM key MINID minid` removes `removes` entries; `more`: the step limit stopped it."""

    minid: str | None
    reason: str
    removes: int = 0
    blocked: bool = False
    more: bool = False


def trim_bound(
    archive_head: str | None, checkpoint: str | None, stream: StreamInfo, now_ms: int, window: Window
) -> Bound:
    """The furthest the archive and the age bound let `stream` be trimmed, and the count bound's allowance.

    `archive_head`: the partition's newest archived stream id in the log's epoch (None: nothing archived);
    `checkpoint`: the live read models' position in that epoch (None or "0-0": none).
    """
    if stream.first is None or stream.last is None or stream.length == 0:
        return Bound(None, "the stream is empty")
    allowed = None if window.retain_events == 0 else stream.length - window.retain_events
    if allowed is not None and allowed <= 0:
        return Bound(
            None, f"the stream holds {stream.length} entries, the window keeps {window.retain_events}"
        )
    age = None if window.retain_s == 0 else f"{max(0, now_ms - round(window.retain_s * 1000))}-0"
    if age is not None and _key(stream.first) >= _key(age):
        return Bound(None, f"no entry is older than {window.retain_s:g}s")
    if archive_head is None or checkpoint is None or checkpoint == "0-0":
        return Bound(None, "nothing is archived yet: waiting for the projector", blocked=True)
    safe = min(archive_head, checkpoint, key=_key)
    held = age is None or _key(safe) < _key(age)  # the archive, not the age, is the nearer bound
    blocked = held and _key(safe) < _key(stream.last)
    minid = safe if held or age is None else age  # (held whenever the age bound is off)
    if _key(minid) <= _key(stream.first):
        return Bound(
            None, f"every entry from {stream.first} on is unarchived (archive head {safe})", blocked=blocked
        )
    reason = f"archived up to {safe}" if held else f"older than {window.retain_s:g}s"
    return Bound(minid, reason, allowed, blocked)


def settle(bound: Bound, below: Sequence[str], step: int = STEP_ENTRIES) -> Decision:
    """The XTRIM to issue, given `below`: the ids of the stream's oldest entries under `bound.minid`, in
    order, as many as exist up to `cap(bound, step) + 1`."""
    if bound.minid is None:
        return Decision(None, bound.reason, blocked=bound.blocked)
    if not below:
        return Decision(None, f"no entry below {bound.minid}", blocked=bound.blocked)
    limit = cap(bound, step)
    if len(below) <= limit:
        kept_more_than_window = bound.allowed is None or len(below) < bound.allowed
        return Decision(bound.minid, bound.reason, len(below), bound.blocked and kept_more_than_window)
    if bound.allowed is not None and bound.allowed <= step:
        return Decision(below[limit], "the window keeps the newest entries", limit)
    return Decision(below[limit], f"{bound.reason} (at most {step} entries per step)", limit, more=True)


def cap(bound: Bound, step: int = STEP_ENTRIES) -> int:
    """How many entries below the bound one step may remove."""
    return step if bound.allowed is None else min(bound.allowed, step)


@dataclass(slots=True)
class PartitionStatus:
    """The last pass over one partition, for /readyz and the CLI."""

    partition: int
    reason: str = "not run yet"
    minid: str | None = None
    trimmed: int = 0
    length: int | None = None
    blocked: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "reason": self.reason, "trim_point": self.minid, "trimmed_last_pass": self.trimmed,
            "stream_entries": self.length, "blocked_by_archive": self.blocked, "error": self.error,
        }  # fmt: skip


@dataclass(slots=True)
class Retention:
    """Trims every partition's stream of one log, reading the archive's head and checkpoints from Postgres."""

    redis: RedisClient
    layout: LogLayout
    pool: AsyncConnectionPool[Any]
    window: Window
    interval_s: float = 10.0
    retry_max_s: float = 10.0
    store: Store = field(default_factory=Store)
    statuses: dict[int, PartitionStatus] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: ProjectorSettings, redis: RedisClient, pool: AsyncConnectionPool[Any]) -> Retention:
        window = Window(settings.retain_stream_s, settings.retain_stream_events)
        return cls(
            redis, settings.log.layout(), pool, window, settings.retention_interval_s, settings.retry_max_s
        )

    def where(self) -> str:
        return f"{sum(1 for s in self.statuses.values() if s.error)} partitions failing"

    def status(self) -> dict[str, object]:
        """Per-partition outcome of the last pass (keys are partition numbers as text)."""
        return {str(p): s.as_dict() for p, s in sorted(self.statuses.items())}

    async def run(self, stop: asyncio.Event) -> None:
        """Trim every `interval_s` until `stop`; a failed partition is logged and retried with backoff (a
        bug around the passes ends the call: its supervisor restarts it)."""
        delay = self.interval_s
        while not stop.is_set():
            failed = any(s.error for s in await self.trim_once())
            delay = min(max(delay * 2, 0.5), self.retry_max_s) if failed else self.interval_s
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    async def trim_once(self, *, dry_run: bool = False) -> list[PartitionStatus]:
        """One pass over every partition; an error is caught per partition, logged and reported."""
        out = []
        for p in range(self.layout.partitions):
            status = PartitionStatus(p)
            try:
                await self._trim_partition(status, dry_run=dry_run)
            except (psycopg.Error, redis.exceptions.RedisError, OSError, ValueError) as exc:
                status.error = status.reason = f"{type(exc).__name__}: {exc}".strip()
                metrics.RETENTION_ERRORS.inc()
                log.error("retention of partition %d failed: %s; retrying", p, status.error)
            except Exception as exc:  # a bug: loud, with its traceback, and retried like any failure
                status.error = status.reason = f"{type(exc).__name__}: {exc}".strip()
                metrics.RETENTION_ERRORS.inc()
                log.exception("retention of partition %d crashed; retrying", p)
            out.append(status)
            if not dry_run:
                self.statuses[p] = status
        if not dry_run:
            metrics.RETENTION_LAST_PASS.set(time.time())
        return out

    async def _durable(self, partition: int) -> tuple[str | None, str | None, str]:
        """(archive head, checkpoint, reason to hold off or "") of `partition` in the log's current epoch."""
        epoch = await self.redis.hget(self.layout.meta_key(), "epoch")
        if epoch is None:
            return None, None, "the log is not initialized"
        epoch_text = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        from projector.rebuild import REBUILD_LOCK_KEY  # rebuild imports the worker, which imports us

        async with self.pool.connection() as conn:
            cur = await conn.execute(
                _REBUILD_RUNNING_SQL, (REBUILD_LOCK_KEY >> 32, REBUILD_LOCK_KEY & 0xFFFFFFFF)
            )
            row = await cur.fetchone()
            if row is not None and row[0]:  # its log phase reads the stream from its own, older position
                return None, None, "a rebuild is running"
            cp = await self.store.checkpoint(conn, partition)
            cur = await conn.execute(_ARCHIVE_HEAD_SQL, (epoch_text, partition))
            head = await cur.fetchone()
        checkpoint = cp.stream_id if cp.epoch == epoch_text else None
        return (None if head is None else str(head[0])), checkpoint, ""

    async def _stream(self, partition: int) -> StreamInfo:
        info: dict[Any, Any] | None = await stream_info(self.redis, self.layout.stream_key(partition))
        if info is None:  # nothing was ever appended
            return StreamInfo(None, None, 0)
        first, last = info.get("first-entry"), info.get("last-entry")  # the same on Redis 6.2 and 7
        return StreamInfo(_id(first), _id(last), int(info.get("length", 0)))

    async def _trim_partition(self, status: PartitionStatus, *, dry_run: bool) -> None:
        p, key, label = status.partition, self.layout.stream_key(status.partition), str(status.partition)
        archive_head, checkpoint, hold = await self._durable(p)
        reader = EventLog(self.redis, self.layout)
        for _ in range(MAX_STEPS):
            stream = await self._stream(p)
            status.length = stream.length
            if hold:
                status.reason = hold
                break
            bound = trim_bound(archive_head, checkpoint, stream, int(time.time() * 1000), self.window)
            below: list[str] = []
            if bound.minid is not None:
                entries = await reader.read_range(p, "-", f"({bound.minid}", cap(bound) + 1)
                below = [e.stream_id for e in entries]
            decision = settle(bound, below)
            status.reason, status.blocked = decision.reason, decision.blocked
            if decision.minid is None:
                break
            status.minid = decision.minid
            if dry_run:
                status.trimmed = decision.removes
                break
            removed = int(await self.redis.xtrim(key, minid=decision.minid, approximate=False))
            status.trimmed += removed
            status.length = stream.length - removed
            metrics.RETENTION_TRIMMED.labels(label).inc(removed)
            log.debug(  # every pass trims a little: the metrics count it, the log would only repeat it
                "partition %d: trimmed %d entries below %s (%s)", p, removed, decision.minid, decision.reason
            )
            if not decision.more:
                break
        if dry_run:
            return
        if status.minid is None and stream.first is not None:
            status.minid = stream.first
        if status.minid is not None:
            metrics.RETENTION_TRIM_POINT.labels(label).set(_key(status.minid)[0])
        metrics.RETENTION_BLOCKED.labels(label).set(1 if status.blocked else 0)
        metrics.RETENTION_STREAM_ENTRIES.labels(label).set(status.length or 0)
        was_blocked = p in self.statuses and self.statuses[p].blocked
        if status.blocked and not was_blocked:
            log.warning("partition %d: retention held back by the archive: %s", p, status.reason)
        elif was_blocked and not status.blocked:
            log.info("partition %d: retention no longer held back (%s)", p, status.reason)


def _id(entry: Any) -> str | None:
    if not entry:
        return None
    raw = entry[0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)
