"""The fanout's edges against real clients: a stepwise handshake, normal closes, frame and connection limits,
and a Redis outage with a restart (a dedicated redis-server the test stops and starts)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from test_fanout_e2e import Client, Log, appender, close_code, make_fanout, token
from websockets.asyncio.client import connect

from command_api.append import Appender

__all__ = ["appender", "make_fanout"]


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
    fanout = await make_fanout()
    for _ in range(4):
        clients = await asyncio.gather(*(Client.open(fanout.url, "bob") for _ in range(25)))
        await asyncio.gather(*(c.close() for c in clients))
    await log.send("room", "alice", "after the burst")
    watcher = await Client.open(fanout.url, "alice")
    await watcher.close()
    await asyncio.sleep(0.3)
    assert server_errors(fanout.log_path.read_text()) == []


__all__ += ["close_code"]
