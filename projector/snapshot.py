"""Read a read-model schema back into records, shaped like `model.ReadModel.tables`: production code of
the audit (`projector.auditsource` reads them, `projector.audit` compares them with the fold)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import psycopg
from psycopg import sql

from projector.state import TABLE_OF, Record


async def read_tables(
    conn: psycopg.AsyncConnection[Any], schema: str, conversations: Collection[str] | None = None
) -> dict[str, dict[tuple[Any, ...], Record]]:
    """Every row of the read-model tables of `schema` (`TABLE_OF`), by primary key; only those of
    `conversations` when given (the audit's sample)."""
    tables: dict[str, dict[tuple[Any, ...], Record]] = {}
    where, params = (sql.SQL(""), ()) if conversations is None else (
        sql.SQL(" WHERE conversation_id = ANY(%s)"), (list(conversations),))  # fmt: skip
    for record_type, table in TABLE_OF.items():
        cols = sql.SQL(", ").join(map(sql.Identifier, record_type.columns()))
        cur = await conn.execute(
            sql.SQL("SELECT {} FROM {}.{}{}").format(
                cols, sql.Identifier(schema), sql.Identifier(table), where
            ),
            params,
        )
        rows = [record_type.loaded(r) for r in await cur.fetchall()]
        tables[table] = {r.key: r for r in rows}
    return tables
