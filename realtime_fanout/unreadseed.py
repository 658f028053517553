"""Seeds the unread tracker from the projector's read model (schema `parley`), at known log positions.

One REPEATABLE READ snapshot reads the checkpoints (the log position each partition's rows reflect) and the
user's inbox rows and unread messages, so the rows are exactly the state at those positions. A partition
is usable when its checkpoint is in the hub's epoch and at or after the hub position the connection
attached at (later events are folded live; earlier ones would be missing). While a checkpoint of the
hub's epoch is merely behind we retry for `wait_s`, then leave those partitions unseeded; a partition
without a checkpoint (or of another epoch), missing tables or an unreachable database: no wait, unseeded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.pooltimeout import forget_pool_wait
from realtime_fanout.unread import UnreadSeed, seed_of

log = logging.getLogger(__name__)

_CHECKPOINTS_SQL = "SELECT partition, epoch, stream_id FROM parley.checkpoints"
# Views owned by the projector's read-model migrations (0006_fanout_reads.sql).
_INBOX_SQL = "SELECT conversation_id, read_seq FROM parley.read_markers WHERE user_id = %(user)s"
_UNREAD_SQL = "SELECT conversation_id, message_id, seq FROM parley.unread_messages WHERE user_id = %(user)s"


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


class UnreadSeeder:
    """Reads one user's unread seed; never raises for a missing or lagging read model."""

    def __init__(self, pool: AsyncConnectionPool[Any], wait_s: float = 1.0) -> None:
        self.pool = pool
        self.wait_s = wait_s

    async def seed(self, user_id: str, epoch: str, live_from: list[str]) -> UnreadSeed:
        """The seed for `user_id`; partitions the read model cannot serve yet have no position."""
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                seed = await self._snapshot(user_id, epoch, live_from)
            except psycopg.Error as exc:
                if isinstance(exc, PoolTimeout):
                    forget_pool_wait(exc)
                log.warning("unread seed unavailable (%s): no unread frames for %s", exc, user_id)
                return UnreadSeed.none(len(live_from))
            if not seed.lagging or time.monotonic() >= deadline:
                return seed
            await asyncio.sleep(0.05)

    async def _snapshot(self, user_id: str, epoch: str, live_from: list[str]) -> UnreadSeed:
        args = {"user": user_id}
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rows = await (await conn.execute(_CHECKPOINTS_SQL)).fetchall()
            positions, lagging = usable_positions({p: (e, s) for p, e, s in rows}, epoch, live_from)
            if not any(p is not None for p in positions):
                return UnreadSeed(positions, lagging=lagging)
            inbox = await (await conn.execute(_INBOX_SQL, args)).fetchall()
            unread = await (await conn.execute(_UNREAD_SQL, args)).fetchall()
        seed = seed_of(positions, {c: int(r) for c, r in inbox}, [(c, m, int(s)) for c, m, s in unread])
        seed.lagging = lagging
        return seed
