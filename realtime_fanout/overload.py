"""Admission: how many connections may be between their WebSocket upgrade and `live` at once.

Establishing a connection (JWT, subscribe, history, unread seed, presence join) is the costly part of its
life (milliseconds of CPU, measured in `make bench-c100k`); an idle one is cheap. When more arrive than
the process serves, waiting handshakes would pile up until every one of them times out; above the limit
the upgrade is refused at once with 503 and Retry-After (edge.py; wsproto.py under
PARLEY_FANOUT_WS_EDGE=uvicorn), before any task exists, and the client library retries with full jitter.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

SCOPE_KEY = "parley.admitted"
"""Where the WebSocket protocol leaves, in the ASGI scope's extensions, the call that ends admission."""


class Admission:
    """A count of connections being established, at most `limit`."""

    __slots__ = ("admitting", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitting = 0

    def try_enter(self) -> bool:
        if self.admitting >= self.limit:
            return False
        self.admitting += 1
        return True

    def leave(self) -> None:
        self.admitting -= 1


def admitted(scope: MutableMapping[str, Any]) -> None:
    """The connection of `scope` is established (live, or closing): it no longer counts (idempotent)."""
    done: Callable[[], None] | None = scope.get("extensions", {}).pop(SCOPE_KEY, None)
    if done is not None:
        done()
