"""Fixtures and helpers of the fanout's end-to-end tests: a real `python -m realtime_fanout` child process
on a free port, the command side's appender on the shared Redis, a raw protocol client, the archive filled
as the projector fills it. Registered for every test module by `conftest.py` (`pytest_plugins`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from command_api import commands
from command_api.append import Appender
from command_api.bodies import AddParticipant, CreateConversation, SendMessage
from command_api.commands import Context
from devstack.ports import free_port
from events.codec import decode
from events.log import EventLog
from events.redisclient import RedisClient
from projector.migrate import migrate
from servicekit.auth_settings import AuthSettings
from servicekit.log_settings import LogSettings
from servicekit.tokens import mint_token
from tests.cluster_fixtures import LOG_REDIS_AND_CLUSTERS, LogRedis

SECRET = "0123456789abcdef0123456789abcdef-fanout-secret"

AUTH = AuthSettings(algorithms=("HS256",), secret=SECRET, dev_mode=True)

PARTITIONS = 4

ROOT = Path(__file__).resolve().parent.parent


def token(user: str, ttl_s: float = 3600) -> str:
    return mint_token(AUTH, user, ttl_s=ttl_s)


@dataclass
class Fanout:
    """A `python -m realtime_fanout` child process on a free loopback port."""

    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def spawn(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "realtime_fanout"], env=self.env, cwd=ROOT, stdout=out, stderr=out
            )

    async def start(self) -> None:
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, "fanout exited at start"
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("fanout did not become ready")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def fanout_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(
        REDIS_URL=redis_url, PARLEY_LOG_NAMESPACE=namespace, PARLEY_PARTITIONS=str(PARTITIONS),
        PARLEY_JWT_SECRET=SECRET, PARLEY_DEV_MODE="1", PARLEY_FANOUT_READ_BLOCK_MS="500",
        PARLEY_FANOUT_PING_INTERVAL_S="1", PARLEY_FANOUT_PING_TIMEOUT_S="5",
        # transitions at once when a connection ends, as the presence tests expect; the leave grace (a quick
        # return is no transition) is tested at the store (test_fanout_signals) and measured in bench-c100k
        PARLEY_FANOUT_PRESENCE_LEAVE_GRACE_S="0",
    )  # fmt: skip
    env.update(extra)
    return env


on_clusters_too = pytest.mark.parametrize("log_redis", LOG_REDIS_AND_CLUSTERS, indirect=True)


@pytest.fixture
async def appender(log_redis: LogRedis, log_namespace: str) -> AsyncIterator[Appender]:
    layout = LogSettings("", log_namespace, PARTITIONS).layout()
    client = log_redis.client()
    app = Appender(client, layout)
    await app.open()
    try:
        yield app
    finally:
        await app.close()
        await client.aclose()


@pytest.fixture
def make_fanout(log_redis: LogRedis, log_namespace: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Fanout] = []

    async def make(**extra: str) -> Fanout:
        env = fanout_env(log_redis.url, log_namespace, **{**log_redis.env(), **extra})
        fanout = Fanout(env, free_port(), tmp_path / f"fanout{len(started)}.log")
        started.append(fanout)
        fanout.env["PARLEY_FANOUT_PORT"] = str(fanout.port)
        await fanout.start()
        return fanout

    yield make
    for fanout in started:
        fanout.stop()


class Log:
    """Puts real events in the log through the command side's appender."""

    def __init__(self, appender: Appender) -> None:
        self.appender = appender

    async def create(self, cid: str, creator: str, *others: str) -> None:
        body = CreateConversation(title="t", participants=list(others))
        await self.appender.append(commands.create_conversation_with_id(Context(actor=creator), body, cid))

    async def add(self, cid: str, actor: str, user: str) -> None:
        await self.appender.append(commands.add_participant(Context(actor=actor), cid, AddParticipant(user)))

    async def remove(self, cid: str, actor: str, user: str) -> None:
        await self.appender.append(commands.remove_participant(Context(actor=actor), cid, user))

    async def send(self, cid: str, actor: str, body: str) -> None:
        await self.appender.append(commands.send_message(Context(actor=actor), cid, SendMessage(body=body)))


class Client:
    """A raw protocol client: collects (event, cursor) pairs and control frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.cursor: str | None = None
        self.control: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str, user: str, cursor: str | None = None, **subscribe: Any) -> Client:
        ws = await connect(url, open_timeout=5, close_timeout=2)
        client = cls(ws)
        await ws.send(msgspec.json.encode({"type": "auth", "token": token(user)}).decode())
        await ws.send(msgspec.json.encode({"type": "subscribe", "cursor": cursor, **subscribe}).decode())
        await client.until(lambda c: any(f["type"] == "live" for f in c.control))
        return client

    async def next_frame(self, wait_s: float = 5) -> dict[str, Any]:
        frame: dict[str, Any] = msgspec.json.decode(await asyncio.wait_for(self.ws.recv(), wait_s))
        if frame["type"] == "event":
            self.events.append(frame["event"])
            self.cursor = frame["cursor"]
        elif frame["type"] == "events":
            self.events.extend(frame["events"])
            self.cursor = frame["cursor"]
        else:
            self.control.append(frame)
            if frame["type"] in ("live", "resync"):
                self.cursor = frame.get("cursor") or frame.get("position")
        return frame

    async def until(self, done: Any, wait_s: float = 10) -> None:
        deadline = time.monotonic() + wait_s
        while not done(self):
            left = deadline - time.monotonic()
            try:
                await self.next_frame(max(left, 0))
            except TimeoutError:
                raise AssertionError(
                    f"timed out; have events {self.events}, control {self.control}"
                ) from None

    def bodies(self) -> list[str]:
        return [e["payload"].get("body") for e in self.events if e["payload"]["type"] == "message_sent"]

    async def close(self) -> None:
        await self.ws.close()


async def cursor_after_one(log: Log, url: str, sender: str, user: str, conversation: str) -> str:
    """`user`'s cursor once it received one message `sender` posted to `conversation` (then it leaves)."""
    client = await Client.open(url, user)
    await log.send(conversation, sender, "first")
    await client.until(lambda c: c.bodies() == ["first"])
    await client.close()
    assert client.cursor is not None
    return client.cursor


async def close_code(ws: ClientConnection, wait_s: float = 10) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        async with asyncio.timeout(wait_s):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return None if closed.rcvd is None else closed.rcvd.code


async def archive_everything(database_url: str, redis: RedisClient, namespace: str, epoch: str) -> int:
    """Create the store (the projector's migrations) and archive every log entry as the projector does."""
    log = EventLog(redis, LogSettings("", namespace, PARTITIONS).layout())
    rows = 0
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await migrate(conn)
        for partition in range(PARTITIONS):
            for entry in await log.read_range(partition, "-", "+"):
                env = decode(entry.data)
                ms, sq = (int(x) for x in entry.stream_id.split("-"))
                await conn.execute(
                    "INSERT INTO parley_store.event_archive VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (epoch, partition, entry.stream_id, ms, sq, env.event_id, env.conversation_id, env.seq,
                     env.type, env.actor, env.occurred_at, entry.data),
                )  # fmt: skip
                rows += 1
        await conn.commit()
    return rows
