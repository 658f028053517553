"""Admission (PARLEY_FANOUT_MAX_ADMITTING): at most that many connections are being established at once;
above it the upgrade is answered 503 with Retry-After, and a connection counts only until it is live or
gone (the real fanout in process, real Redis, real WebSocket clients)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from command_api.append import Appender
from realtime_fanout.client import FanoutClient, Live
from realtime_fanout.metrics import ADMISSION_REFUSED
from tests.fanout_fixtures import Client, Log, fanout_env, token
from tests.fanout_inprocess import served_fanout


def admitting(redis_url: str, namespace: str, limit: int, retry_after_s: int) -> dict[str, str]:
    """The fanout's environment with at most `limit` connections being established at once."""
    return fanout_env(redis_url, namespace, PARLEY_FANOUT_MAX_ADMITTING=str(limit),
                      PARLEY_FANOUT_ADMISSION_RETRY_AFTER_S=str(retry_after_s))  # fmt: skip


async def test_upgrades_beyond_the_limit_get_503_until_the_pending_ones_are_live_or_gone(
    appender: Appender, redis_server_url: str, log_namespace: str
) -> None:
    await Log(appender).create("room", "alice", "bob")
    async with served_fanout(admitting(redis_server_url, log_namespace, 2, retry_after_s=3)) as fanout:
        pending = [await connect(fanout.url, open_timeout=5) for _ in range(2)]  # upgraded, not subscribed
        refused = ADMISSION_REFUSED._value.get()
        with pytest.raises(InvalidStatus) as caught:
            await connect(fanout.url, open_timeout=5)
        assert caught.value.response.status_code == 503
        assert caught.value.response.headers["Retry-After"] == "3"
        assert b'"status":503' in caught.value.response.body
        assert ADMISSION_REFUSED._value.get() == refused + 1

        first = pending[0]
        await first.send(msgspec.json.encode({"type": "auth", "token": token("alice")}).decode())
        await first.send('{"type":"subscribe"}')
        while msgspec.json.decode(await first.recv())["type"] != "live":
            pass
        live = await Client.open(fanout.url, "bob")  # alice went live: her place is free
        await live.ws.close()
        await pending[1].close()  # gone before auth: its place is free too
        async with asyncio.timeout(10):  # the server sees the close a moment after the client
            while True:
                try:
                    again = [await connect(fanout.url, open_timeout=5) for _ in range(2)]
                    break
                except InvalidStatus:
                    await asyncio.sleep(0.1)
        for ws in (*again, first):
            await ws.close()


async def test_the_client_library_retries_a_refused_upgrade_no_sooner_than_its_retry_after(
    appender: Appender, redis_server_url: str, log_namespace: str
) -> None:
    await Log(appender).create("room", "alice", "bob")
    async with served_fanout(admitting(redis_server_url, log_namespace, 1, retry_after_s=2)) as fanout:
        pending = await connect(fanout.url, open_timeout=5)  # holds the only place
        refused = ADMISSION_REFUSED._value.get()
        client = FanoutClient(fanout.url, token("alice"), backoff_initial_s=0.05)
        started = asyncio.get_running_loop().time()
        items = client.items()
        first = asyncio.ensure_future(anext(items))
        async with asyncio.timeout(5):
            while ADMISSION_REFUSED._value.get() == refused:
                await asyncio.sleep(0.01)
        await pending.close()  # the place is free at once; the client was asked to wait 2 s
        async with asyncio.timeout(10):
            assert isinstance(await first, Live)
        waited = asyncio.get_running_loop().time() - started
        assert ADMISSION_REFUSED._value.get() == refused + 1  # one refusal, then the wait it asked for
        assert 2.0 <= waited < 4.0
        await client.close()
        async with asyncio.timeout(5):
            async for _ in items:
                pass
