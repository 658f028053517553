"""Seeds the unread tracker from the projector's read model (schema `parley`), at known log positions.

One REPEATABLE READ snapshot reads the checkpoints (the log position each partition's rows reflect), the
users' inbox rows and, per conversation, their newest unread messages and the unread count, so the rows
are exactly the state at those positions; the seeds asked for meanwhile share the next snapshot (a batch
of users). A partition is usable when its checkpoint is in the hub's epoch and at or after the hub
position the connection attached at (later events are folded live; earlier ones would be missing). While
a checkpoint of the hub's epoch is merely behind we retry for `wait_s`, then leave those partitions
unseeded; a partition without a checkpoint (or of another epoch), missing tables or an unreachable
database: no wait, unseeded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.pooltimeout import forget_pool_wait
from realtime_fanout.unread import UNREAD_WINDOW, UnreadSeed, seed_of

log = logging.getLogger(__name__)

_CHECKPOINTS_SQL = "SELECT partition, epoch, stream_id FROM parley.checkpoints"
# Views owned by the projector's read-model migrations (0006_fanout_reads.sql).
_INBOX_SQL = (
    "SELECT user_id, conversation_id, read_seq FROM parley.read_markers WHERE user_id = ANY(%(users)s)"
)
_UNREAD_SQL = (  # the newest `keep` unread messages of each (user, conversation), and how many in all
    "SELECT user_id, conversation_id, message_id, seq, total FROM ("
    " SELECT user_id, conversation_id, message_id, seq, count(*) OVER w AS total,"
    "  row_number() OVER (w ORDER BY seq DESC) AS newest"
    " FROM parley.unread_messages WHERE user_id = ANY(%(users)s)"
    " WINDOW w AS (PARTITION BY user_id, conversation_id)) t "
    "WHERE newest <= %(keep)s"
)


def usable_positions(
    checkpoints: dict[int, tuple[str | None, str]], epoch: str, live_from: list[str]
) -> tuple[list[StreamKey | None], bool]:
    """Per partition, the checkpoint's key when the snapshot can seed it (see the module doc), else None;
    and whether a partition is merely behind (same epoch), so that waiting for the projector may help."""
    out: list[StreamKey | None] = []
    lagging = False
    for partition, attach in enumerate(live_from):
        attach_key = stream_key(attach)
        row = checkpoints.get(partition)
        if row is None:
            out.append((0, 0) if attach_key == (0, 0) else None)  # nothing to fold from an empty partition
            continue
        row_epoch, stream_id = row
        key = stream_key(stream_id)
        same_epoch = row_epoch == epoch or (row_epoch is None and key == (0, 0))
        out.append(key if same_epoch and key >= attach_key else None)
        lagging = lagging or (same_epoch and key < attach_key)
    return out, lagging


@dataclass(slots=True)
class _Ask:
    user_id: str
    epoch: str
    live_from: list[str]
    deadline: float
    future: asyncio.Future[UnreadSeed]


class UnreadSeeder:
    """Reads users' unread seeds; never raises for a missing or lagging read model.

    Seeds asked for while a snapshot runs are read together by the next one (up to `max_batch` users,
    `user_id = ANY(...)`): a reconnect storm costs one transaction per batch, not one per connection,
    and holds one pooled connection, not all of them.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        wait_s: float = 1.0,
        max_batch: int = 500,
        window: int = UNREAD_WINDOW,
    ) -> None:
        """`window`: unread message ids read per conversation (the tracker's), plus one for the bound on
        the older ones' seq; the rest are only counted."""
        self.pool = pool
        self.window = window
        self.wait_s = wait_s
        self.max_batch = max(1, max_batch)
        self.snapshots = 0
        self._queue: list[_Ask] = []
        self._runner: asyncio.Task[None] | None = None

    async def seed(self, user_id: str, epoch: str, live_from: list[str]) -> UnreadSeed:
        """The seed for `user_id`; partitions the read model cannot serve yet have no position."""
        loop = asyncio.get_running_loop()
        ask = _Ask(user_id, epoch, list(live_from), time.monotonic() + self.wait_s, loop.create_future())
        self._queue.append(ask)
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="fanout-unread-seeds")
        return await asyncio.shield(ask.future)

    async def _run(self) -> None:
        """Snapshot batches until nobody waits; an ask whose partitions lag is asked again (50 ms later)
        until its deadline."""
        batch: list[_Ask] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                again = await self._answer(batch)
                batch = []
                if again:
                    self._queue = again + self._queue
                    if len(self._queue) == len(again):
                        await asyncio.sleep(0.05)  # only lagging ones: give the projector time
        except BaseException as exc:  # a bug or a cancellation: every waiter hears it, none waits forever
            for ask in batch + self._queue:
                if not ask.future.done():
                    ask.future.set_exception(exc)
                    ask.future.exception()
            self._queue = []
            raise

    async def _answer(self, batch: list[_Ask]) -> list[_Ask]:
        """Answer `batch` from one snapshot; returns the asks to try again (lagging, deadline not passed)."""
        try:
            seeds = await self._snapshot(batch)
        except psycopg.Error as exc:
            if isinstance(exc, PoolTimeout):
                forget_pool_wait(exc)
            log.warning("unread seed unavailable (%s): no unread frames for %d connections", exc, len(batch))
            seeds = [UnreadSeed.none(len(ask.live_from)) for ask in batch]
        now = time.monotonic()
        again = []
        for ask, seed in zip(batch, seeds, strict=True):
            if ask.future.done():
                continue
            if seed.lagging and now < ask.deadline:
                again.append(ask)
            else:
                ask.future.set_result(seed)
        return again

    async def _snapshot(self, batch: list[_Ask]) -> list[UnreadSeed]:
        self.snapshots += 1
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rows = await (await conn.execute(_CHECKPOINTS_SQL)).fetchall()
            checkpoints = {p: (e, s) for p, e, s in rows}
            usable = [usable_positions(checkpoints, ask.epoch, ask.live_from) for ask in batch]
            users = sorted(
                {
                    a.user_id
                    for a, (pos, _) in zip(batch, usable, strict=True)
                    if any(p is not None for p in pos)
                }
            )
            inbox: dict[str, dict[str, int]] = {}
            unread: dict[str, list[tuple[str, str, int]]] = {}
            totals: dict[str, dict[str, int]] = {}
            if users:
                for user, c, r in await (await conn.execute(_INBOX_SQL, {"users": users})).fetchall():
                    inbox.setdefault(user, {})[c] = int(r)
                asked = {"users": users, "keep": self.window + 1}
                for user, c, m, q, n in await (await conn.execute(_UNREAD_SQL, asked)).fetchall():
                    unread.setdefault(user, []).append((c, m, int(q)))
                    totals.setdefault(user, {})[c] = int(n)
        seeds = []
        for ask, (positions, lagging) in zip(batch, usable, strict=True):
            if any(p is not None for p in positions):
                seed = seed_of(positions, inbox.get(ask.user_id, {}), unread.get(ask.user_id, []),
                               totals.get(ask.user_id, {}))  # fmt: skip
            else:
                seed = UnreadSeed(positions)
            seed.lagging = lagging
            seeds.append(seed)
        return seeds
