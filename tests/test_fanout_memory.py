"""A closed connection is freed by reference counting alone. The fanout runs Python's cyclic collector in
full only every PARLEY_FANOUT_GC_FULL_EVERY_S (600 s; servicekit.gcpacing), so a reference cycle through a
closed connection holds its session, unread state, protocol and zlib contexts (~300 KiB) that long: the soak
measured the fanouts growing 5-6 MiB a minute of reconnects from such cycles. The fanout runs in-process
under the real uvicorn options (`ws_options`: admission, deflate, keepalive), with the collector off.
Cycles found in the soak and broken (BENCHMARKS.md, Soak): the connection's re-raised reader error, uvicorn's
HTTP parser after the upgrade, 3.11's `wait_for`, websockets' parser generator and the scope's admission
callback (wsproto.py), psycopg_pool's timed-out wait (pooltimeout.py), a failed shared page read."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.pool_async import WaitingClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.server import ServerProtocol

from command_api.append import Appender
from projector.migrate import migrate
from realtime_fanout.app import create_app
from realtime_fanout.archive import Archive
from realtime_fanout.connection import Connection
from realtime_fanout.edge import StreamEdge, ws_options
from realtime_fanout.pageflights import Page, PageFlights
from realtime_fanout.session import Session
from realtime_fanout.settings import FanoutSettings
from realtime_fanout.unreadseed import UnreadSeeder
from realtime_fanout.wsproto import AbortingWebSocketProtocol
from servicekit.httpedge import BoundedHttpToolsProtocol, server_config
from servicekit.settings import Env
from tests.fanout_fixtures import SECRET, Log, close_code, token
from tests.inprocess import uvicorn_serving

SERVER_SIDE = (
    Connection,
    Session,
    StreamEdge,
    AbortingWebSocketProtocol,
    ServerProtocol,
    BoundedHttpToolsProtocol,
)


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
async def fanout_in_process(
    redis_url: str, namespace: str, database_url: str | None = None
) -> AsyncIterator[str]:
    env = Env({
        **({"DATABASE_URL": database_url} if database_url else {}), "REDIS_URL": redis_url, "PARLEY_LOG_NAMESPACE": namespace, "PARLEY_PARTITIONS": "4",
        "PARLEY_JWT_SECRET": SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_FANOUT_GC_PACED": "0",
        "PARLEY_FANOUT_READ_BLOCK_MS": "200",
    })  # fmt: skip
    settings = FanoutSettings.from_env(env)
    app = create_app(settings)
    config = server_config(app, settings.http, "127.0.0.1", 0, loop="asyncio", log_level="warning",
                           **ws_options(settings, app))  # fmt: skip
    async with uvicorn_serving(config) as port:
        yield f"ws://127.0.0.1:{port}/v1/stream"


async def subscribed(url: str, user: str, ttl_s: float = 3600) -> ClientConnection:
    ws = await connect(url, open_timeout=5, close_timeout=2)
    await ws.send(msgspec.json.encode({"type": "auth", "token": token(user, ttl_s)}).decode())
    await ws.send('{"type":"subscribe"}')
    while msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))["type"] != "live":
        pass
    return ws


async def close_normally(ws: ClientConnection) -> None:
    await ws.close()


async def drop(ws: ClientConnection) -> None:
    ws.transport.abort()


async def subscribe_twice(ws: ClientConnection) -> None:  # the server closes 4400 (already-subscribed)
    await ws.send('{"type":"subscribe"}')
    await close_code(ws)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """The collector off for the block (objects found in `gc.get_objects()` are then alive or garbage)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def until_freed(limit_s: float = 5) -> dict[str, int]:
    """What is left once the server has ended every connection (or `limit_s` passed)."""
    deadline = time.monotonic() + limit_s
    while (left := alive()) != NONE_LEFT and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def test_with_a_read_model_closed_connections_leave_nothing_either(
    appender: Appender, redis_server_url: str, log_namespace: str, database_url: str
) -> None:
    """With a database the fanout seeds unread counts from the read model and serves the archive."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await migrate(conn)
    await closed_connections_leave_nothing(appender, redis_server_url, log_namespace, drop, database_url)


@pytest.mark.parametrize("end", [close_normally, drop, subscribe_twice], ids=lambda f: f.__name__)
async def test_closed_connections_leave_nothing_for_the_cyclic_collector(
    appender: Appender, redis_server_url: str, log_namespace: str, end: Callable[[ClientConnection], Any]
) -> None:
    await closed_connections_leave_nothing(appender, redis_server_url, log_namespace, end)


async def closed_connections_leave_nothing(
    appender: Appender, redis_url: str, namespace: str, end: Callable[[ClientConnection], Any],
    database_url: str | None = None,
) -> None:  # fmt: skip
    log = Log(appender)
    await log.create("room", "alice", "bob")
    with collector_off():
        async with fanout_in_process(redis_url, namespace, database_url) as url:
            for _ in range(3):
                clients = [await subscribed(url, user) for user in ("alice", "bob", "alice")]
                await log.send("room", "bob", "hi")
                for ws in clients:
                    await asyncio.wait_for(ws.recv(), 10)
                await asyncio.gather(*(end(ws) for ws in clients))
                assert await until_freed() == NONE_LEFT


async def test_a_connection_ended_by_token_expiry_is_freed_too(
    appender: Appender, redis_server_url: str, log_namespace: str
) -> None:
    await Log(appender).create("room", "alice")
    with collector_off():
        async with fanout_in_process(redis_server_url, log_namespace) as url:
            lapsing = await subscribed(url, "alice", ttl_s=1)
            assert await close_code(lapsing) == 4401
            assert await until_freed() == NONE_LEFT


async def test_a_client_gone_in_the_middle_of_the_handshake_leaves_nothing(
    appender: Appender, redis_server_url: str, log_namespace: str
) -> None:
    """It is waited for with a timeout (authenticate and subscribe in time), which Python 3.11's
    `asyncio.wait_for` turned into a cycle through the error when the peer left meanwhile."""
    await Log(appender).create("room", "alice")
    with collector_off():
        async with fanout_in_process(redis_server_url, log_namespace) as url:
            for leave in (close_normally, drop):
                ws = await connect(url, open_timeout=5, close_timeout=2)
                await ws.send(msgspec.json.encode({"type": "auth", "token": token("alice")}).decode())
                assert msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))["type"] == "authenticated"
                await leave(ws)
            assert await until_freed() == NONE_LEFT


async def test_a_timed_out_wait_for_a_pooled_connection_leaves_no_cycle(database_url: str) -> None:
    """psycopg_pool's timed-out wait is a cycle (its waiting client keeps the error whose traceback holds
    it), which held the asking connection's frames; the archive and the unread seed break it."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, open=False, min_size=1, max_size=1,
                                                          timeout=0.05)  # fmt: skip
    await pool.open(wait=True)
    archive, seeder = Archive(pool, 10), UnreadSeeder(pool, 0.0)
    try:
        with collector_off():
            async with pool.connection():  # the pool's only connection is taken: every wait times out
                for _ in range(3):
                    with pytest.raises(PoolTimeout):
                        await archive.head("epoch", 0)
                    assert (await seeder.seed("alice", "epoch", ["0-0"])).positions == [None]
            # given back, the connection is offered to the queued clients, which then leave the queue
            assert sum(type(obj) is WaitingClient for obj in gc.get_objects()) == 0
    finally:
        await pool.close()


async def test_a_failed_shared_page_read_leaves_no_cycle() -> None:
    """The read's future keeps the error, whose traceback holds the frame that held the future."""

    class LogGone(Exception):
        pass

    async def failing() -> Page:
        raise LogGone

    flights: PageFlights[int] = PageFlights()
    with collector_off():
        try:
            await flights.read(0, (0, 0), None, failing)
        except LogGone as exc:
            error = weakref.ref(exc)
        assert error() is None
