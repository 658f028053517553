"""The fanout client's `close` holds whatever the client is doing at that moment (found by the fault suite)."""

from __future__ import annotations

import asyncio
from typing import Any

from command_api.append import Appender
from realtime_fanout.client import FanoutClient, Live
from tests.fanout_fixtures import Log, token


async def test_close_during_a_reconnect_ends_the_subscription(appender: Appender, make_fanout: Any) -> None:
    await Log(appender).create("room", "alice")
    fanout = await make_fanout()
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # closed while reconnecting: between connections, before the next one opens
            await client.close()
        return token("alice")

    client = FanoutClient(fanout.url, provider, backoff_initial_s=0.01)

    async def consume() -> None:
        async for item in client:
            if isinstance(item, Live):
                client.drop()

    await asyncio.wait_for(consume(), 5)
    assert (calls, client.connects) == (2, 1)
