"""Test support: whether a given process listens on a TCP port (Linux /proc), for processes that share one
port by SO_REUSEPORT, where an answer on the port does not say which process gave it."""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"


def listens(pid: int, port: int) -> bool:
    """True when `pid` holds a socket in LISTEN state on `port` (IPv4 or IPv6)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return False
    for table in ("tcp", "tcp6"):
        with Path(f"/proc/net/{table}").open() as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    return True
    return False
