"""Database-level admin on a Postgres server URL: build URLs, create and drop databases."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql


def with_database(url: str, name: str) -> str:
    """Return `url` with its database (path) replaced by `name`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def database_exists(server_url: str, name: str) -> bool:
    """True if database `name` exists on the server at `server_url`."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None


def create_database(server_url: str, name: str, *, exist_ok: bool = False) -> str:
    """Create database `name` on the server at `server_url`; return its URL."""
    if not (exist_ok and database_exists(server_url, name)):
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database `name` (if present), terminating its open connections."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
