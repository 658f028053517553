"""Single flight: concurrent calls for the same key share one in-flight computation and its result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """`run(key, make)` awaits `make()` unless a call for `key` is in flight, then shares its outcome."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self.calls = 0

    async def run(self, key: K, make: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The value, and whether it was shared (True) or computed by this call (False)."""
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared), True
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self.calls += 1
        try:
            value = await make()
            future.set_result(value)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]
        return value, False
