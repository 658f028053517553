"""`Flag` keeps asyncio.Event's semantics for what the fanout uses: set/clear/is_set/wait."""

from __future__ import annotations

import asyncio

from realtime_fanout.flag import Flag


async def test_set_wakes_every_waiter_and_stays_set_until_cleared() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert flag.is_set() and await flag.wait()
    flag.clear()
    assert not flag.is_set()


async def test_a_cancelled_waiter_is_forgotten() -> None:
    flag = Flag()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert flag._waiters == []
    flag.set()
    assert flag.is_set()
