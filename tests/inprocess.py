"""A real uvicorn server inside the test's event loop (for tests that inspect the server's own objects)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn


@asynccontextmanager
async def uvicorn_serving(config: uvicorn.Config) -> AsyncIterator[int]:
    """`config` served until the block ends; yields the loopback port it listens on (give it port 0)."""
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
