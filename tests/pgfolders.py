"""Folders for embedded Postgres servers, outside pytest's temporary root.

As root, Postgres runs as another user, so its folder's parents get o+x; but every pytest session that
starts resets its root (/tmp/pytest-of-USER) to 0700, which cut off the servers of a session already
running (seen: a checkpointer PANIC on pg_control, "Permission denied"). /tmp's own folders are never reset.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def pg_folder() -> Iterator[Path]:
    """A fresh folder in /tmp for one or more Postgres data directories, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="parley-pg-") as folder:
        yield Path(folder)
