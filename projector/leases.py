"""Partition leases in Postgres: each partition owned by one worker at a time, until its lease expires.

Postgres rather than Redis SET NX PX: the batch transaction re-checks the lease next to the checkpoint
it moves, so ownership and the write it permits are decided by the same database, atomically.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg

AsyncConn = psycopg.AsyncConnection[Any]


async def lease_round(conn: AsyncConn, owner: str, partitions: int, ttl_s: float) -> tuple[set[int], int]:
    """Heartbeat, renew our leases, take free or expired ones up to a fair share.

    Returns (the partitions we hold, our fair share). A lease we already own is renewed even if expired.
    """
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO parley_store.workers (owner, seen_at) VALUES (%s, now()) "
            "ON CONFLICT (owner) DO UPDATE SET seen_at = now()",
            (owner,),
        )
        cur = await conn.execute(
            "SELECT count(*) FROM parley_store.workers WHERE seen_at > now() - make_interval(secs => %s)",
            (ttl_s,),
        )
        row = await cur.fetchone()
        live = max(1, int(row[0]) if row else 1)
        share = math.ceil(partitions / live)
        cur = await conn.execute(
            "UPDATE parley_store.leases SET expires_at = now() + make_interval(secs => %s) "
            "WHERE owner = %s RETURNING partition",
            (ttl_s, owner),
        )
        held = {int(r[0]) for r in await cur.fetchall()}
    for p in range(partitions):
        if len(held) >= share:
            break
        if p in held:
            continue
        cur = await conn.execute(
            "INSERT INTO parley_store.leases AS l (partition, owner, expires_at) "
            "VALUES (%s, %s, now() + make_interval(secs => %s)) ON CONFLICT (partition) DO UPDATE "
            "SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at "
            "WHERE l.expires_at <= now() OR l.owner = EXCLUDED.owner RETURNING partition",
            (p, owner, ttl_s),
        )
        if await cur.fetchone() is not None:
            held.add(p)
        await conn.commit()
    return held, share


async def release(conn: AsyncConn, owner: str, partition: int) -> None:
    """Give a lease up now (rebalancing or shutdown) so another worker takes it without waiting."""
    await conn.execute(
        "DELETE FROM parley_store.leases WHERE partition = %s AND owner = %s", (partition, owner)
    )
    await conn.commit()


async def leave(conn: AsyncConn, owner: str) -> None:
    """Release every lease and the heartbeat of `owner` (clean shutdown)."""
    await conn.execute("DELETE FROM parley_store.leases WHERE owner = %s", (owner,))
    await conn.execute("DELETE FROM parley_store.workers WHERE owner = %s", (owner,))
    await conn.commit()
