"""The fanout's edges against real clients: a stepwise handshake, normal closes, frame and connection limits,
and a Redis outage with a restart (a dedicated redis-server the test stops and starts)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from command_api.append import Appender
from devstack.servers import RedisServer
from realtime_fanout import closecodes
from realtime_fanout.frames import MAX_CLIENT_MESSAGE_BYTES
from servicekit.log_settings import LogSettings
from tests.fanout_fixtures import PARTITIONS, Client, Log, close_code, token


def server_errors(log_text: str) -> list[str]:
    """Lines of a fanout's log at ERROR level, and traceback headers."""
    return [line for line in log_text.splitlines() if " ERROR " in line or line.startswith("Traceback")]


async def test_a_client_that_waits_for_each_reply_gets_authenticated_then_live(
    appender: Appender, make_fanout: Any
) -> None:
    await Log(appender).create("room", "alice")
    fanout = await make_fanout(PARLEY_FANOUT_AUTH_TIMEOUT_S="3")
    async with connect(fanout.url) as ws:
        await ws.send(msgspec.json.encode({"type": "auth", "token": token("alice")}).decode())
        reply = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 2))
        assert reply["type"] == "authenticated" and reply["user_id"] == "alice"
        await ws.send('{"type":"subscribe"}')
        assert msgspec.json.decode(await asyncio.wait_for(ws.recv(), 2))["type"] == "live"
    async with connect(f"{fanout.url}?token={token('alice')}") as ws:  # a token in the handshake too
        assert msgspec.json.decode(await asyncio.wait_for(ws.recv(), 2))["type"] == "authenticated"


async def test_normal_closes_right_after_live_log_no_error(appender: Appender, make_fanout: Any) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER="100")
    for _ in range(4):
        clients = await asyncio.gather(*(Client.open(fanout.url, "bob") for _ in range(25)))
        await asyncio.gather(*(c.close() for c in clients))
    await log.send("room", "alice", "after the burst")
    watcher = await Client.open(fanout.url, "alice")
    await watcher.close()
    await asyncio.sleep(0.3)
    assert server_errors(fanout.log_path.read_text()) == []


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_a_frame_over_the_protocol_limit_is_refused_unbuffered(
    appender: Appender, make_fanout: Any
) -> None:
    """The server's frame limit is the protocol's: a 15 MiB frame is refused (1009) from its header, so the
    process does not grow by it; a frame at the limit still reaches the protocol check (4400)."""
    await Log(appender).create("room", "alice")
    fanout = await make_fanout()
    assert fanout.proc is not None
    before = rss_kib(fanout.proc.pid)
    for _ in range(4):
        async with connect(fanout.url, max_size=None, close_timeout=2) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.send("x" * (15 << 20))
            assert await close_code(ws) == closecodes.MESSAGE_TOO_BIG
    assert rss_kib(fanout.proc.pid) - before < 16 << 10
    async with connect(fanout.url) as ws:
        await ws.send("x" * MAX_CLIENT_MESSAGE_BYTES)  # not JSON, but within the limit
        assert await close_code(ws) == closecodes.PROTOCOL_ERROR


async def test_connections_beyond_the_per_user_cap_are_closed_4429(
    appender: Appender, make_fanout: Any
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER="3")
    held = [await Client.open(fanout.url, "alice") for _ in range(3)]
    async with connect(fanout.url) as ws:
        await ws.send(msgspec.json.encode({"type": "auth", "token": token("alice")}).decode())
        error = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 2))
        assert error["type"] == "error" and error["reason"] == "too-many-connections"
        assert await close_code(ws) == closecodes.TOO_MANY_CONNECTIONS
    async with connect(f"{fanout.url}?token={token('alice')}") as ws:  # a handshake token counts alike
        assert await close_code(ws) == closecodes.TOO_MANY_CONNECTIONS
    bob = await Client.open(fanout.url, "bob")  # per user: others are unaffected
    await held.pop().close()
    await asyncio.sleep(0.2)  # the server has seen the close
    held.append(await Client.open(fanout.url, "alice"))  # a slot freed by a close is free again
    await log.send("room", "bob", "to every connection")
    for client in held:
        await client.until(lambda c: c.bodies() == ["to every connection"])
    for client in (*held, bob):
        await client.close()


@pytest.fixture
async def proc_appender(redis_proc: RedisServer, log_namespace: str) -> AsyncIterator[Appender]:
    """An appender on the test's own Redis (which the test stops and restarts)."""
    client = aioredis.Redis.from_url(redis_proc.url)
    app = Appender(client, LogSettings("", log_namespace, PARTITIONS).layout())
    await app.open()
    try:
        yield app
    finally:
        await app.close()
        await client.aclose()


async def wait_ready(port: int, wait_s: float = 15) -> None:
    async with httpx.AsyncClient() as http:
        async with asyncio.timeout(wait_s):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)


async def test_redis_down_closes_subscribes_4503_and_after_a_restart_none_fails(
    redis_proc: RedisServer, proc_appender: Appender, make_fanout: Any
) -> None:
    """While Redis is down a subscribe that needs history from the log is closed 4503 with a one-line log
    (the hub's recent events in memory are off here: a resume they serve needs no Redis); once it is back,
    no subscribe fails, though the pooled connections from before the restart are dead."""
    log = Log(proc_appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(
        REDIS_URL=redis_proc.url, PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER="100", PARLEY_FANOUT_RECENT_ITEMS="0"
    )
    first = await Client.open(fanout.url, "bob")
    await log.send("room", "alice", "before")
    await first.until(lambda c: c.bodies() == ["before"])
    cursor = first.cursor
    await first.close()
    # Concurrent resumes fill the fanout's Redis pool with connections that the restart will kill.
    await asyncio.gather(*(c.close() for c in await asyncio.gather(
        *(Client.open(fanout.url, "bob", cursor) for _ in range(8))
    )))  # fmt: skip

    redis_proc.stop()
    for _ in range(3):
        async with connect(fanout.url) as ws:
            await ws.send(msgspec.json.encode({"type": "auth", "token": token("bob")}).decode())
            await ws.send(msgspec.json.encode({"type": "subscribe", "cursor": cursor}).decode())
            frames = [msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
            assert frames[1] == {
                "type": "error", "reason": "log-unavailable", "detail": "the log is not readable right now",
            }  # fmt: skip
            assert await close_code(ws) == closecodes.UNAVAILABLE

    redis_proc.start()
    assert isinstance(proc_appender.redis, aioredis.Redis)
    await proc_appender.redis.connection_pool.disconnect()  # the test's own writer: not under test
    await wait_ready(fanout.port)
    await log.send("room", "alice", "after")
    for _ in range(3):
        resumed = await asyncio.gather(*(Client.open(fanout.url, "bob", cursor) for _ in range(8)))
        for client in resumed:
            await client.until(lambda c: c.bodies() == ["after"])
            await client.close()
    text = fanout.log_path.read_text()
    assert server_errors(text) == []
    assert text.count("unavailable") >= 3
