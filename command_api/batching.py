"""Group commit: concurrent submissions to one group ride in one round trip to Redis.

While a group's batch is in flight, new submissions queue; when it returns, everything queued goes
in the next batch. At low load a submission is sent at once (no timer, no added latency); under load
batches grow by themselves, and so one fsync and one network round trip serve many requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)

FlushFn = Callable[[Key, Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]


class MicroBatcher(Generic[Key, Item, Result]):
    """Runs `flush(key, items)` with everything submitted under `key`, at most one batch per key in flight.

    `flush` returns one result or exception per item, in order; an exception raised by `flush`
    itself is given to every item of that batch.
    """

    def __init__(self, flush: FlushFn[Key, Item, Result], max_batch: int = 256) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: dict[Key, list[tuple[Item, asyncio.Future[Result]]]] = {}
        self._drainers: dict[Key, asyncio.Task[None]] = {}

    async def submit(self, key: Key, item: Item) -> Result:
        """Queue `item` under `key` and wait for its own result."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((item, future))
        if key not in self._drainers:
            self._drainers[key] = asyncio.create_task(self._drain(key))
        return await future

    async def _drain(self, key: Key) -> None:
        try:
            queue = self._pending[key]
            while queue:
                batch = queue[: self._max_batch]
                del queue[: self._max_batch]
                try:
                    results = await self._flush(key, [item for item, _ in batch])
                except Exception as exc:  # handed to every waiter of this batch, not swallowed
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            del self._drainers[key]
            if not self._pending.get(key):
                self._pending.pop(key, None)
            elif key not in self._drainers:
                self._drainers[key] = asyncio.create_task(self._drain(key))

    async def close(self) -> None:
        """Wait for in-flight batches to finish."""
        while self._drainers:
            await asyncio.gather(*self._drainers.values(), return_exceptions=True)
