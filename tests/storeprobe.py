"""Queries tests use to look into the store: the search column's agreement, dead letters, the archive."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql


async def check_search_column(conn: psycopg.AsyncConnection[Any], schema: str) -> int:
    """How many messages' tsvector disagrees with their body (must be 0: edits and deletes honoured)."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {}.messages "
            "WHERE search IS DISTINCT FROM to_tsvector('simple', coalesce(body, ''))"
        ).format(sql.Identifier(schema))
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def dead_letter_keys(conn: psycopg.AsyncConnection[Any]) -> set[tuple[int, str]]:
    cur = await conn.execute(
        "SELECT partition, stream_id FROM parley_store.dead_letters WHERE redriven_at IS NULL"
    )
    return {(int(r[0]), str(r[1])) for r in await cur.fetchall()}


async def archive_keys(conn: psycopg.AsyncConnection[Any]) -> set[tuple[int, str]]:
    cur = await conn.execute("SELECT partition, stream_id FROM parley_store.event_archive")
    return {(int(r[0]), str(r[1])) for r in await cur.fetchall()}
