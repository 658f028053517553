"""Run Postgres as an unprivileged system user when we are root (Postgres refuses root)."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"


@dataclass(frozen=True)
class RunAs:
    """Credentials for subprocess `user=`/`group=`/`extra_groups=`; None fields mean 'as we are'."""

    uid: int | None = None
    gid: int | None = None

    @property
    def extra_groups(self) -> list[int] | None:
        return [] if self.uid is not None else None


def pg_run_as() -> RunAs:
    """Return who Postgres must run as: ourselves, or (as root) the `embedded_postgres` user."""
    if os.geteuid() != 0:
        return RunAs()
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", PG_SYSTEM_USER], check=True)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    return RunAs(uid=entry.pw_uid, gid=entry.pw_gid)


def make_traversable(path: Path) -> None:
    """Add o+x to `path` and each of its parents that lacks it."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def give_dir(path: Path, run_as: RunAs) -> None:
    """Create `path` (0700) owned by `run_as`, reachable through its parents."""
    path.mkdir(parents=True, exist_ok=True)
    if run_as.uid is None or run_as.gid is None:
        return
    make_traversable(path.parent)
    os.chown(path, run_as.uid, run_as.gid)
    path.chmod(0o700)
