"""Streaming replicas for the query API's reads: which of them may serve, judged by replay lag.

A replica's lag is measured against the primary's WAL, not its clock: every check samples the primary's
flushed WAL position, and a replica that has replayed up to position r lags by the age of the oldest
sample beyond r (none beyond: it is caught up; an idle primary makes no lag). A replica serves while it
answers, is in recovery and lags at most the bound; otherwise it is skipped and says why. With none
serving, the primary serves: it is never behind any of its replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from projector.metrics import REPLICA_LAG_SECONDS, REPLICA_SERVING
from servicekit.supervisor import Policy, Supervisor

if TYPE_CHECKING:
    from projector.reads import ReadTarget

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2
UNREACHABLE = (psycopg.Error, OSError, TimeoutError)
KEEP_SAMPLES_S = 600.0  # a replica behind every kept sample lags at least this long: far past any bound


def parse_lsn(text: str) -> int:
    """A Postgres WAL position ("16/B374D848") as one integer, ordered as the WAL is."""
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


class PrimaryProgress:
    """When the primary's WAL was first seen past each sampled position. The first sample's time is
    unknown (the WAL got there before we looked): a replica behind it has an unknown lag."""

    def __init__(self, keep_s: float = KEEP_SAMPLES_S) -> None:
        self.keep_s = keep_s
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, now: float, lsn: int) -> None:
        if not self._samples:
            self._samples.append((float("-inf"), lsn))
            return
        if lsn > self._samples[-1][1]:
            self._samples.append((now, lsn))
        while len(self._samples) > 1 and now - self._samples[1][0] > self.keep_s:
            self._samples.popleft()

    def lag_s(self, now: float, replayed: int) -> float | None:
        """Seconds since the primary's WAL first passed `replayed` (0.0 if it never did as far as we saw);
        None when it passed before the first sample, or nothing was sampled yet."""
        if not self._samples:
            return None
        for seen_at, lsn in self._samples:
            if lsn > replayed:
                return None if seen_at == float("-inf") else max(0.0, now - seen_at)
        return 0.0


@dataclass(frozen=True, slots=True)
class Health:
    """A replica's state at its last check: whether it serves reads, and why not."""

    serving: bool
    reason: str | None = None
    lag_s: float | None = None
    replayed: str | None = None


NOT_CHECKED = Health(False, "not checked yet")


def judge(in_recovery: bool, replayed: str | None, lag_s: float | None, max_lag_s: float) -> Health:
    """Whether a replica that answered may serve: it replays the primary, and within `max_lag_s`."""
    if not in_recovery or replayed is None:
        return Health(False, "not in recovery: not a streaming replica (promoted, or a primary)")
    if lag_s is None:
        return Health(False, "behind the primary's WAL position as first sampled", None, replayed)
    if lag_s > max_lag_s:
        return Health(False, f"replay lags {lag_s:.1f}s (limit {max_lag_s:g}s)", lag_s, replayed)
    return Health(True, None, lag_s, replayed)


def server_of(url: str) -> str:
    """host:port of a connection string, without its credentials (what /readyz may show)."""
    params = conninfo_to_dict(url)
    return f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"


class Replicas:
    """The query API's replicas: checked every `check_s` (one connection each, outside their pools), chosen
    round-robin among those serving; a replica whose read fails is skipped until a check finds it well."""

    def __init__(
        self, targets: list[ReadTarget], primary: ReadTarget, max_lag_s: float, check_s: float
    ) -> None:
        self.targets = targets
        self.primary = primary
        self.max_lag_s = max_lag_s
        self.check_s = check_s
        self.progress = PrimaryProgress()
        self._next = itertools.count()
        self._conns: dict[str, psycopg.AsyncConnection[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        for target in targets:
            target.health = NOT_CHECKED

    def choose(self) -> ReadTarget | None:
        """A serving replica (each in turn), or None when none serves."""
        serving = [t for t in self.targets if t.health is not None and t.health.serving]
        return serving[next(self._next) % len(serving)] if serving else None

    def start(self, supervisor: Supervisor) -> None:
        self._task = supervisor.spawn("replica-checks", self._supervise, Policy.RESTART)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()

    async def _supervise(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a bug in the checks: say so, skip every replica, check again
                log.exception("replica checks crashed; every replica skipped until the next check")
                for target in self.targets:
                    target.health = Health(False, "the replica checks crashed (see the log)")
            await asyncio.sleep(self.check_s)

    async def check(self) -> None:
        """Sample the primary's WAL position, then judge every replica against it."""
        loop = asyncio.get_running_loop()
        try:
            (lsn,) = await self._ask(self.primary, "SELECT pg_current_wal_flush_lsn()::text")
            self.progress.record(loop.time(), parse_lsn(lsn))
        except UNREACHABLE as exc:  # lag is then judged on the samples so far: the primary writes nothing new
            log.warning("primary WAL position not read: %s: %s", type(exc).__name__, exc)
        await asyncio.gather(*(self._check(target, loop.time()) for target in self.targets))

    async def _check(self, target: ReadTarget, now: float) -> None:
        try:
            in_recovery, replayed = await self._ask(
                target, "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"
            )
        except UNREACHABLE as exc:
            health = Health(False, f"unreachable: {type(exc).__name__}: {exc}".strip())
        else:
            lag = self.progress.lag_s(now, parse_lsn(replayed)) if replayed else None
            health = judge(bool(in_recovery), replayed, lag, self.max_lag_s)
        self.record(target, health)

    async def _ask(self, target: ReadTarget, sql: str) -> tuple[Any, ...]:
        """One row from `target` on the checks' own connection to it (outside the pools, which readers
        may have exhausted), made again after a failure.

        Raises:
            psycopg.Error, OSError, TimeoutError: `target` did not answer within `CHECK_TIMEOUT_S`.
        """
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                conn = self._conns.get(target.name)
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(
                        target.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                    )
                    self._conns[target.name] = conn
                row = await (await conn.execute(sql)).fetchone()
        except UNREACHABLE:
            dropped = self._conns.pop(target.name, None)
            if dropped is not None:
                await dropped.close()
            raise
        if row is None:
            raise psycopg.DataError(f"{sql!r} returned no row")
        return tuple(row)

    @staticmethod
    def record(target: ReadTarget, health: Health) -> None:
        if target.health is not None and target.health.serving != health.serving:
            level = logging.INFO if health.serving else logging.WARNING
            state = "serving" if health.serving else health.reason
            log.log(level, "replica %s (%s): %s", target.name, server_of(target.url), state)
        target.health = health
        REPLICA_SERVING.labels(target.name).set(int(health.serving))
        REPLICA_LAG_SECONDS.labels(target.name).set(float("nan") if health.lag_s is None else health.lag_s)

    def status(self) -> dict[str, object]:
        """Each replica's state for /readyz: server, serving, why not, replay lag and position."""
        return {
            t.name: {"server": server_of(t.url), "serving": t.health.serving, "reason": t.health.reason,
                     "lag_seconds": t.health.lag_s, "replayed_lsn": t.health.replayed}
            for t in self.targets if t.health is not None
        }  # fmt: skip
