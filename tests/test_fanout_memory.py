"""A closed connection is freed by reference counting alone. The fanout runs Python's cyclic collector in
full only every PARLEY_FANOUT_GC_FULL_EVERY_S (servicekit.gcpacing), so a reference cycle through a closed
connection would hold its session, unread state and socket buffers that long (the soak measured +100 MiB in
five minutes of reconnects). The fanout runs in-process under the real uvicorn config, the collector off."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from command_api.append import Appender
from realtime_fanout.app import create_app
from realtime_fanout.connection import Connection
from realtime_fanout.session import Session
from realtime_fanout.settings import FanoutSettings
from realtime_fanout.wsproto import AbortingWebSocketProtocol, protocol_class
from servicekit.httpedge import BoundedHttpToolsProtocol, server_config
from servicekit.settings import Env
from tests.fanout_fixtures import SECRET, Log, close_code, token
from tests.inprocess import uvicorn_serving

SERVER_SIDE = (Connection, Session, AbortingWebSocketProtocol, BoundedHttpToolsProtocol)


def alive() -> dict[str, int]:
    """Server-side per-connection objects the collector tracks, reachable or not (it is off)."""
    found = dict.fromkeys((kind.__name__ for kind in SERVER_SIDE), 0)
    for obj in gc.get_objects():
        for kind in SERVER_SIDE:
            if issubclass(type(obj), kind):  # not isinstance: a dead weak proxy raises on it
                found[kind.__name__] += 1
    return found


NONE_LEFT = dict.fromkeys((kind.__name__ for kind in SERVER_SIDE), 0)


@contextlib.asynccontextmanager
async def fanout_in_process(redis_url: str, namespace: str) -> AsyncIterator[str]:
    env = Env({
        "REDIS_URL": redis_url, "PARLEY_LOG_NAMESPACE": namespace, "PARLEY_PARTITIONS": "4",
        "PARLEY_JWT_SECRET": SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_FANOUT_GC_PACED": "0",
        "PARLEY_FANOUT_READ_BLOCK_MS": "200",
    })  # fmt: skip
    settings = FanoutSettings.from_env(env)
    config = server_config(create_app(settings), settings.http, "127.0.0.1", 0, loop="asyncio",
                           ws=protocol_class(settings.close_timeout_s), log_level="warning")  # fmt: skip
    async with uvicorn_serving(config) as port:
        yield f"ws://127.0.0.1:{port}/v1/stream"


async def subscribed(url: str, user: str, ttl_s: float = 3600) -> ClientConnection:
    ws = await connect(url, open_timeout=5, close_timeout=2)
    await ws.send(msgspec.json.encode({"type": "auth", "token": token(user, ttl_s)}).decode())
    await ws.send('{"type":"subscribe"}')
    while msgspec.json.decode(await asyncio.wait_for(ws.recv(), 5))["type"] != "live":
        pass
    return ws


async def close_normally(ws: ClientConnection) -> None:
    await ws.close()


async def drop(ws: ClientConnection) -> None:
    ws.transport.abort()


async def subscribe_twice(ws: ClientConnection) -> None:  # the server closes 4400 (already-subscribed)
    await ws.send('{"type":"subscribe"}')
    await close_code(ws)


async def until_freed(limit_s: float = 5) -> dict[str, int]:
    """What is left once the server has ended every connection (or `limit_s` passed)."""
    deadline = time.monotonic() + limit_s
    while (left := alive()) != NONE_LEFT and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


@pytest.mark.parametrize("end", [close_normally, drop, subscribe_twice], ids=lambda f: f.__name__)
async def test_closed_connections_leave_nothing_for_the_cyclic_collector(
    appender: Appender, redis_server_url: str, log_namespace: str, end: Callable[[ClientConnection], Any]
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    gc.collect()
    gc.disable()
    try:
        async with fanout_in_process(redis_server_url, log_namespace) as url:
            for _ in range(3):
                clients = [await subscribed(url, user) for user in ("alice", "bob", "alice")]
                await log.send("room", "bob", "hi")
                for ws in clients:
                    await asyncio.wait_for(ws.recv(), 5)
                await asyncio.gather(*(end(ws) for ws in clients))
                assert await until_freed() == NONE_LEFT
    finally:
        gc.enable()
        gc.collect()


async def test_a_connection_ended_by_token_expiry_is_freed_too(
    appender: Appender, redis_server_url: str, log_namespace: str
) -> None:
    await Log(appender).create("room", "alice")
    gc.collect()
    gc.disable()
    try:
        async with fanout_in_process(redis_server_url, log_namespace) as url:
            lapsing = await subscribed(url, "alice", ttl_s=1)
            assert await close_code(lapsing) == 4401
            assert await until_freed() == NONE_LEFT
    finally:
        gc.enable()
        gc.collect()
