"""Fixture support: the real fanout app served by uvicorn inside the test process, so a test can reach
into it (a deliberately failing session, its supervisor, its log records)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from realtime_fanout.app import create_app
from realtime_fanout.edge import ws_options
from realtime_fanout.settings import FanoutSettings
from servicekit.httpedge import server_config
from servicekit.settings import Env


@dataclass
class ServedFanout:
    app: FastAPI
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def served_fanout(env: Mapping[str, str]) -> AsyncIterator[ServedFanout]:
    """The fanout of `env` (as `python -m realtime_fanout` builds it; GC pacing off: it is process-wide)
    on a free loopback port, shut down gracefully after."""
    settings = FanoutSettings.from_env(Env({**env, "PARLEY_FANOUT_GC_PACED": "0", "PARLEY_FANOUT_PORT": "0"}))
    app = create_app(settings)
    config = server_config(
        app,
        settings.http,
        "127.0.0.1",
        0,
        timeout_graceful_shutdown=2,
        loop="none",
        **ws_options(settings, app),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                assert not task.done(), "the fanout did not start"
                await asyncio.sleep(0.01)
        yield ServedFanout(app, server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
