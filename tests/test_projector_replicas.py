"""The query API on a real streaming replica (pg_basebackup -R of a primary of our own): read-your-writes
answered from the replica's own replayed state; a lagging or stopped replica shown in /readyz and skipped
(the primary serves)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY

from devstack.servers import PostgresServer, PostgresStandby
from projector.app import create_app
from projector.reads import Reads
from projector.replicas import PrimaryProgress, judge, parse_lsn
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.settings import Env
from tests.apiclient import ApiClient
from tests.conftest import DEV_SECRET
from tests.pgfolders import pg_folder

WRITERS = 4
MESSAGES_PER_WRITER = 15


def test_lag_is_the_age_of_the_oldest_primary_position_not_replayed() -> None:
    progress = PrimaryProgress(keep_s=100)
    assert progress.lag_s(0.0, 5) is None  # nothing sampled
    progress.record(0.0, 100)
    assert progress.lag_s(1.0, 99) is None  # behind the first sample: since when is unknown
    assert progress.lag_s(1.0, 100) == 0.0
    progress.record(2.0, 200)
    progress.record(3.0, 200)  # an idle primary: no new position, no lag
    progress.record(4.0, 300)
    assert progress.lag_s(10.0, 100) == 8.0  # the WAL passed 100 at 2.0
    assert progress.lag_s(10.0, 250) == 6.0
    assert progress.lag_s(10.0, 300) == 0.0
    progress.record(500.0, 400)  # samples older than keep_s pruned, but for the newest of them
    assert progress.lag_s(500.0, 350) == 0.0
    assert progress.lag_s(500.0, 150) == progress.lag_s(500.0, 250) == 496.0  # still beyond keep_s
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848 > parse_lsn("0/FFFFFFFF")


def test_a_replica_serves_only_in_recovery_and_within_the_bound() -> None:
    assert judge(True, "0/1", 0.5, 1.0).serving
    assert not judge(True, "0/1", 1.5, 1.0).serving
    assert "lags 1.5s" in (judge(True, "0/1", 1.5, 1.0).reason or "")
    assert not judge(True, "0/1", None, 1.0).serving
    assert "not in recovery" in (judge(False, None, 0.0, 1.0).reason or "")


@dataclass
class Servers:
    primary: PostgresServer
    standby: PostgresStandby

    def database(self) -> tuple[str, str]:
        """A new database on the primary: its URL there, and on the replica."""
        url = self.primary.create_database(f"t_{uuid.uuid4().hex[:10]}")
        return url, url.replace(f":{self.primary.port}/", f":{self.standby.port}/")


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """A primary of our own (wal_level=replica, initdb's default) and a hot standby streaming from it."""
    with (
        pg_folder() as root,
        PostgresServer(root / "primary", fast=True) as primary,
        PostgresStandby(primary, root / "standby", fast=True) as standby,
    ):
        yield Servers(primary, standby)


@dataclass
class Stack:
    replica_url: str
    query: httpx.AsyncClient
    api: ApiClient
    reads: Reads
    settings: ProjectorSettings

    async def replica(self, *, ready: bool = False) -> dict[str, Any]:
        """What /readyz says of the replica (`ready`: and that the query API is ready all the same)."""
        r = await self.query.get("/readyz")
        assert r.status_code == 200 or not ready, r.text
        state: dict[str, Any] = r.json()["details"]["replicas"]["replica-0"]
        return state

    async def until_replica(self, serving: bool, limit_s: float = 20) -> dict[str, Any]:
        async with asyncio.timeout(limit_s):
            while (state := await self.replica())["serving"] != serving:
                await asyncio.sleep(0.1)
        return state

    async def until_projected(self, limit_s: float = 20) -> None:
        async with asyncio.timeout(limit_s):
            while (await self.query.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.1)


def reads_by(target: str) -> float:
    return REGISTRY.get_sample_value("parley_query_reads_total", {"target": target}) or 0.0


@pytest.fixture
async def stack(
    servers: Servers, redis_server_url: str, log_namespace: str, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """The command API in-process; the projector writes the primary; its query API reads the replica."""
    max_lag_s = getattr(request, "param", 5.0)
    primary_url, replica_url = servers.database()
    env = {
        "REDIS_URL": redis_server_url, "PARLEY_LOG_NAMESPACE": log_namespace, "PARLEY_PARTITIONS": "4",
        "PARLEY_JWT_SECRET": DEV_SECRET, "PARLEY_DEV_MODE": "1", "PARLEY_RATE_LIMIT_PER_S": "0",
        "DATABASE_URL": primary_url, "PARLEY_QUERY_DATABASE_URLS": replica_url,
        "PARLEY_QUERY_REPLICA_MAX_LAG_S": str(max_lag_s), "PARLEY_QUERY_REPLICA_CHECK_S": "0.1",
        "PARLEY_PROJECTOR_BLOCK_MS": "50", "PARLEY_READ_WAIT_S": "3",
    }  # fmt: skip
    settings = ProjectorSettings.from_env(Env(env))
    assert settings.query_database_urls == (replica_url,)
    async with ApiClient.running(env) as api:
        await api.create_conversation("ann", "bob")  # the log exists before the worker starts
        worker = Worker(settings)
        await worker.start()
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(worker.ready.wait(), 10)
        try:
            async with Reads(settings) as reads:
                app = create_app(settings, worker, reads)
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://q"
                ) as q:
                    s = Stack(replica_url, q, api, reads, settings)
                    await s.until_projected()
                    await s.until_replica(serving=True)
                    yield s
        finally:
            stop.set()
            await task
            await worker.close()


def auth(api: ApiClient, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.token(user)}"}


async def send_and_read(s: Stack, conversation: str, user: str, body: str) -> httpx.Response:
    """A message sent, then the conversation read at the position its 202 returned."""
    sent = await s.api.send(user, conversation, body)
    assert sent.status_code == 202, sent.text
    answer = await s.query.get(f"/v1/conversations/{conversation}/messages",
                               params={"position": sent.json()["position_token"], "limit": 200},
                               headers=auth(s.api, user))  # fmt: skip
    if answer.status_code == 200:
        assert body in [m["body"] for m in answer.json()["messages"]], (body, answer.json())
    return answer


async def the_primary_serves(s: Stack, conversation: str, reads: int = 5) -> None:
    """Messages sent and read at their positions: every read has its write, and the primary served it."""
    primary_before = reads_by("primary")
    for n in range(reads):
        answer = await send_and_read(s, conversation, "ann", f"from the primary {n}")
        assert answer.status_code == 200, answer.text
    assert reads_by("primary") - primary_before == reads


async def test_read_your_writes_on_the_replica_under_load(stack: Stack) -> None:
    s = stack
    conversations = [await s.api.create_conversation(f"w{i}", "bob") for i in range(WRITERS)]
    replica_before, primary_before = reads_by("replica-0"), reads_by("primary")

    async def writer(i: int) -> None:
        for n in range(MESSAGES_PER_WRITER):
            answer = await send_and_read(s, conversations[i], f"w{i}", f"w{i} message {n}")
            assert answer.status_code == 200, answer.text

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(WRITERS))), 60)
    assert reads_by("replica-0") - replica_before == WRITERS * MESSAGES_PER_WRITER
    assert reads_by("primary") == primary_before  # the replica answered every one of them


async def test_a_wait_is_answered_by_the_replicas_own_replay_not_the_primarys(stack: Stack) -> None:
    """Replay paused on the replica (within the lag bound, so it still serves): a read at a new position
    waits for the replica, and is refused rather than answered without the write; resumed, it has it."""
    s = stack
    conversation = await s.api.create_conversation("ann", "bob")
    with psycopg.connect(s.replica_url, autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            answer = await send_and_read(s, conversation, "ann", "while paused")
            assert answer.status_code == 503 and answer.json()["type"].endswith("position-not-reached")
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
    answer = await send_and_read(s, conversation, "ann", "after resuming")
    assert answer.status_code == 200


@pytest.mark.parametrize("stack", [0.5], indirect=True)
async def test_a_lagging_replica_is_shown_and_skipped(stack: Stack) -> None:
    s = stack
    conversation = await s.api.create_conversation("ann", "bob")
    with psycopg.connect(s.replica_url, autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            primary_before = reads_by("primary")
            answer = await send_and_read(s, conversation, "ann", "waited for on the replica")
            assert answer.status_code == 200, answer.text  # the wait moved to the primary ...
            assert reads_by("primary") - primary_before == 1
            # ... once the replica lagged past the bound (lag counts from when the primary's WAL first passed
            # what the replica replayed, which may be before this request: no bound on its own wait)
            state = await s.until_replica(serving=False)
            assert "replay lags" in state["reason"] and state["lag_seconds"] > 0.5, state
            assert not (await s.replica(ready=True))["serving"]
            await the_primary_serves(s, conversation)
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
    assert (await s.until_replica(serving=True))["reason"] is None


@pytest.mark.parametrize("stack", [0.5], indirect=True)
async def test_a_stopped_replica_is_shown_and_skipped_until_it_is_back(
    stack: Stack, servers: Servers
) -> None:
    s = stack
    conversation = await s.api.create_conversation("ann", "bob")
    await asyncio.to_thread(servers.standby.stop)
    try:
        state = await s.until_replica(serving=False)
        assert "unreachable" in state["reason"] or "a read failed" in state["reason"], state
        assert not (await s.replica(ready=True))["serving"]  # the query API is ready: the primary serves
        await the_primary_serves(s, conversation)
    finally:
        await asyncio.to_thread(servers.standby.start)
    await s.until_replica(serving=True)
    replica_before = reads_by("replica-0")
    assert (await send_and_read(s, conversation, "ann", "back")).status_code == 200
    assert reads_by("replica-0") - replica_before == 1


def test_the_standby_is_a_streaming_replica(servers: Servers) -> None:
    with psycopg.connect(servers.standby.url) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    with psycopg.connect(servers.primary.url) as conn:
        row = conn.execute("SELECT usename, state FROM pg_stat_replication").fetchone()
        assert row == ("replicator", "streaming")
