"""Forward-only schema migrations, applied on start in one transaction under an advisory lock.

`migrations/NNNN_name.sql` build the durable store (schema `parley_store`); `migrations/read_models/`
build one read-model schema (run with `search_path` set to it, so a rebuild can make a fresh copy).
Each schema records what it has applied in its own `schema_migrations` table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

import psycopg
from psycopg import sql

from projector.exceptions import MigrationError

STORE_SCHEMA = "parley_store"
LIVE_SCHEMA = "parley"
_LOCK_KEY = 0x7061726C6579  # "parley"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def _load(folder: Traversable) -> list[Migration]:
    found: list[Migration] = []
    for item in folder.iterdir():
        match = _NAME.match(item.name)
        if item.is_file() and match:
            found.append(Migration(int(match.group(1)), match.group(2), item.read_text()))
        elif item.is_file() and item.name.endswith(".sql"):
            raise MigrationError(f"migration file {item.name!r} is not named NNNN_name.sql")
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {folder}")
    return found


def store_migrations() -> list[Migration]:
    return _load(files("projector").joinpath("migrations"))


def read_model_migrations() -> list[Migration]:
    return _load(files("projector").joinpath("migrations").joinpath("read_models"))


async def _apply(conn: psycopg.AsyncConnection[Any], schema: str, migrations: list[Migration]) -> list[str]:
    schema_id = sql.Identifier(schema)
    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
    await conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version int PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(schema_id)
    )
    cur = await conn.execute(sql.SQL("SELECT version, name FROM {}.schema_migrations").format(schema_id))
    applied = {int(r[0]): str(r[1]) for r in await cur.fetchall()}
    done: list[str] = []
    for m in migrations:
        if m.version in applied:
            if applied[m.version] != m.name:
                raise MigrationError(
                    f"{schema}: version {m.version} was applied as {applied[m.version]!r}, "
                    f"the file says {m.name!r}"
                )
            continue
        if applied and m.version < max(applied):
            raise MigrationError(f"{schema}: migration {m.version} is older than applied ones (forward-only)")
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(schema_id))
        await conn.execute(m.text.encode())
        await conn.execute(
            sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(schema_id),
            (m.version, m.name),
        )
        done.append(f"{schema}:{m.version:04d}_{m.name}")
    return done


async def migrate(conn: psycopg.AsyncConnection[Any], read_schema: str = LIVE_SCHEMA) -> list[str]:
    """Bring the store and the read-model schema `read_schema` up to date; returns what was applied.

    Runs in one transaction holding `pg_advisory_xact_lock`, so concurrent workers apply each file once.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        done = await _apply(conn, STORE_SCHEMA, store_migrations())
        done += await _apply(conn, read_schema, read_model_migrations())
        await conn.execute("SET LOCAL search_path TO DEFAULT")
    return done
