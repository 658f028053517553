"""`Flag`: the part of asyncio.Event the fanout uses per connection, at a fraction of its memory.

An asyncio.Event is an object with a `__dict__` and a deque of waiters (about 0.8 KiB); the fanout holds
two per connection (its writer's wake-up, the WebSocket's `writable`) by the ten thousand. A `Flag` is
slotted and creates its waiter list only while someone waits.
"""

from __future__ import annotations

import asyncio


class Flag:
    """set / clear / is_set / wait with asyncio.Event's semantics (every waiter woken by `set`)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
