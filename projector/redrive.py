"""Re-apply dead letters (after a fix) to the live read models, oldest first, one transaction each.

Each takes the partition's checkpoint row lock and bumps its version, so a running worker notices its
cached state is stale and reloads it. A letter that still fails stays, with the new error.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from events.codec import decode
from events.log import LogEntry
from projector.batch import archive_row
from projector.fold import apply
from projector.state import Changes
from projector.store import Store

log = logging.getLogger(__name__)


async def redrive(conn: psycopg.AsyncConnection[Any], store: Store) -> tuple[int, int]:
    """Re-apply every pending dead letter; returns (applied, still failing)."""
    await store.prepare_connection(conn)
    cur = await conn.execute(
        "SELECT id, epoch, partition, stream_id, data FROM parley_store.dead_letters "
        "WHERE redriven_at IS NULL ORDER BY partition, split_part(stream_id, '-', 1)::bigint, "
        "split_part(stream_id, '-', 2)::bigint"
    )
    letters = await cur.fetchall()
    applied = failed = 0
    for letter_id, epoch, partition, stream_id, data in letters:
        try:
            async with conn.transaction():
                await store.lock_checkpoint(conn, partition)
                event = decode(bytes(data))
                states = await store.load_states(conn, [event.conversation_id])
                changes = Changes()
                apply(states.get(event.conversation_id), event, stream_id, changes, in_order=False)
                await store.write_tables(conn, changes.drain())
                await store.archive_once(
                    conn, archive_row(epoch, LogEntry(partition, stream_id, bytes(data)), event)
                )
                await conn.execute(
                    "UPDATE parley_store.dead_letters SET redriven_at = now() WHERE id = %s", (letter_id,)
                )
            applied += 1
            log.info("dead letter %s (partition %d, %s) re-applied", letter_id, partition, stream_id)
        except Exception as exc:  # report and keep the letter
            failed += 1
            await conn.execute(
                "UPDATE parley_store.dead_letters SET error = %s, attempts = attempts + 1 WHERE id = %s",
                (f"{type(exc).__name__}: {exc}", letter_id),
            )
            await conn.commit()
            log.error("dead letter %s still fails: %s", letter_id, exc)
    return applied, failed
