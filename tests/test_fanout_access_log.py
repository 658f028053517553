"""The fanout's line per WebSocket connection follows PARLEY_HTTP_ACCESS_LOG, as the HTTP access log does:
off by default (no record made), on: accepted, open and closed, redacted (the real fanout in process, real
Redis, real WebSocket clients)."""

from __future__ import annotations

import logging

import pytest

from command_api.append import Appender
from servicekit.httpedge import ACCESS_LOGGER
from tests.fanout_fixtures import Client, Log, fanout_env, token
from tests.fanout_inprocess import served_fanout


async def connect_live_and_close(url: str) -> None:
    client = await Client.open(f"{url}?token={token('alice')}", "alice")
    await client.ws.close()


@pytest.mark.parametrize("access_log", ["0", "1"])
async def test_connection_lines_are_written_only_with_the_access_log_on(
    appender: Appender, redis_server_url: str, log_namespace: str, caplog: pytest.LogCaptureFixture,
    access_log: str,
) -> None:  # fmt: skip
    await Log(appender).create("room", "alice", "bob")
    env = fanout_env(redis_server_url, log_namespace, PARLEY_HTTP_ACCESS_LOG=access_log)
    async with served_fanout(env) as fanout:
        with caplog.at_level(logging.INFO):  # the root's level; the access logger's is the fanout's
            await connect_live_and_close(fanout.url)
    lines = [r.getMessage() for r in caplog.records]
    connection_lines = [line for line in lines if "[accepted]" in line or "connection open" in line]
    if access_log == "0":
        assert connection_lines == [], lines
        assert not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
    else:
        assert any('"WebSocket /v1/stream?token=…" [accepted]' in line for line in lines), lines
        assert any(line == "connection open" for line in lines), lines
        assert not any(token("alice") in line for line in lines)
