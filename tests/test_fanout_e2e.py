"""End to end: the real fanout process under uvicorn, real WebSocket clients, events from the real appender."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from command_api import commands
from command_api.append import Appender
from command_api.bodies import CreateConversation, EditMessage, SendMessage
from command_api.commands import Context
from events.codec import decode, encode
from events.log import EventLog
from events.redisclient import RedisClient
from events.schema import MessageSent as SentPayload
from realtime_fanout.client import Event, FanoutClient, Live, Recorder
from realtime_fanout.cursor import Cursor
from servicekit.log_settings import LogSettings
from tests.cluster_fixtures import single_and_cluster
from tests.fanout_fixtures import (
    PARTITIONS,
    Client,
    Log,
    archive_everything,
    close_code,
    cursor_after_one,
    on_clusters_too,
    token,
)
from tests.oracle import visible_events
from tests.rawredis import Entries


@pytest.mark.parametrize("edge", ["native", "uvicorn"])
async def test_a_message_reaches_every_participant_and_nobody_else(
    appender: Appender, make_fanout: Any, edge: str
) -> None:
    """On either WebSocket edge (PARLEY_FANOUT_WS_EDGE; the rest of the suite runs the default, native)."""
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(PARLEY_FANOUT_WS_EDGE=edge)
    alice, bob, eve = [await Client.open(fanout.url, u) for u in ("alice", "bob", "eve")]
    await log.send("room", "alice", "hello")
    await log.create("other", "eve")
    await log.send("other", "eve", "private")
    await alice.until(lambda c: c.bodies() == ["hello"])
    await bob.until(lambda c: c.bodies() == ["hello"])
    await eve.until(lambda c: c.bodies() == ["private"])
    await log.send("room", "bob", "bye")
    await alice.until(lambda c: c.bodies() == ["hello", "bye"])
    assert eve.bodies() == ["private"] and len(eve.events) == 2
    for c in (alice, bob, eve):
        await c.close()


async def test_an_entry_no_reader_may_decode_is_skipped_with_a_log_line(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis
) -> None:
    """The fanout refuses what the projector dead-letters (one decoder): seq beyond bigint, NUL in text."""
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout()
    bob = await Client.open(fanout.url, "bob")
    key = appender.layout.stream_key(appender.layout.partition_for("room"))
    good = decode(cast(Entries, await redis_client.xrange(key, "-", "+", count=1))[0][1][b"e"])
    payload = msgspec.structs.replace(good, seq=2**63, payload=SentPayload("m-huge", "beyond bigint"))
    await redis_client.xadd(key, {"e": encode(payload)})
    await redis_client.xadd(key, {"e": encode(msgspec.structs.replace(payload, seq=2, actor="alice\x00"))})
    await log.send("room", "alice", "after")
    await bob.until(lambda c: c.bodies() == ["after"])
    assert [e["seq"] for e in bob.events] == [2]
    text = fanout.log_path.read_text()
    assert text.count("skipping undecodable entry") == 2 and "Traceback" not in text, text
    await bob.close()


async def test_membership_boundaries_live(appender: Appender, make_fanout: Any) -> None:
    log = Log(appender)
    await log.create("room", "alice")
    fanout = await make_fanout()
    bob = await Client.open(fanout.url, "bob")
    await log.send("room", "alice", "before")
    await log.add("room", "alice", "bob")
    await log.send("room", "alice", "during")
    await log.remove("room", "alice", "bob")
    await log.send("room", "alice", "after")
    # Order holds only within a partition, so the marker that shows "after" was skipped shares room's.
    marker = next(
        cid for n in range(1000)
        if appender.layout.partition_for(cid := f"marker{n}") == appender.layout.partition_for("room")
    )  # fmt: skip
    await log.create(marker, "bob")
    await bob.until(lambda c: c.events and c.events[-1]["conversation_id"] == marker)
    types = [(e["conversation_id"], e["payload"]["type"]) for e in bob.events]
    assert types == [
        ("room", "participant_added"), ("room", "message_sent"), ("room", "participant_removed"),
        (marker, "conversation_created"),
    ]  # fmt: skip
    await bob.close()


@on_clusters_too
async def test_resume_after_disconnect_gets_exactly_the_missed_events(
    appender: Appender, make_fanout: Any
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout()
    cursor = await cursor_after_one(log, fanout.url, "alice", "bob", "room")
    await asyncio.gather(*(log.send("room", "alice", f"m{n}") for n in range(100)))
    again = await Client.open(fanout.url, "bob", cursor)
    await again.until(lambda c: len(c.bodies()) == 100)
    assert again.bodies() == [f"m{n}" for n in range(100)] or sorted(again.bodies()) == sorted(
        f"m{n}" for n in range(100)
    )
    seqs = [e["seq"] for e in again.events]
    assert seqs == list(range(3, 103))
    await log.send("room", "alice", "live")
    await again.until(lambda c: c.bodies()[-1:] == ["live"])
    assert len(again.events) == 101
    await again.close()


async def test_unusable_cursors_get_an_explicit_resync(appender: Appender, make_fanout: Any) -> None:
    log = Log(appender)
    await log.create("room", "alice")
    fanout = await make_fanout()
    foreign = "eyJlcG9jaCI6Im90aGVyIiwicG9zaXRpb25zIjpbIjAtMCIsIjAtMCIsIjAtMCIsIjAtMCJdfQ"
    for cursor, reason in (("garbage!", "malformed-cursor"), (foreign, "foreign-epoch")):
        client = await Client.open(fanout.url, "alice", cursor)
        (resync,) = [f for f in client.control if f["type"] == "resync"]
        assert resync["reason"] == reason
        await log.send("room", "alice", reason)
        await client.until(lambda c, r=reason: c.bodies() == [r])
        await client.close()


async def test_auth_failures_and_alternatives(appender: Appender, make_fanout: Any) -> None:
    await Log(appender).create("room", "alice")
    fanout = await make_fanout()
    async with connect(fanout.url) as ws:
        await ws.send('{"type":"auth","token":"not.a.jwt"}')
        assert await close_code(ws) == 4401
    async with connect(fanout.url) as ws:
        await ws.send('{"type":"subscribe"}')
        assert await close_code(ws) == 4401
    async with connect(fanout.url, subprotocols=[f"bearer.{token('alice')}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == f"bearer.{token('alice')}"
        await ws.send('{"type":"subscribe"}')
        frames = [msgspec.json.decode(await ws.recv())["type"] for _ in range(2)]
        assert frames == ["authenticated", "live"]
    async with connect(f"{fanout.url}?token={token('alice')}") as ws:
        await ws.send('{"type":"subscribe"}')
        assert msgspec.json.decode(await ws.recv())["type"] == "authenticated"


async def test_token_expiry_closes_4401_unless_refreshed(appender: Appender, make_fanout: Any) -> None:
    await Log(appender).create("room", "alice")
    fanout = await make_fanout()
    started = time.monotonic()
    async with connect(fanout.url) as lapsing, connect(fanout.url) as refreshed:
        for ws in (lapsing, refreshed):
            await ws.send(msgspec.json.encode({"type": "auth", "token": token("alice", ttl_s=2)}).decode())
            await ws.send('{"type":"subscribe"}')
        await refreshed.send(msgspec.json.encode({"type": "auth", "token": token("alice")}).decode())
        await refreshed.send(msgspec.json.encode({"type": "auth", "token": token("bob")}).decode())
        assert await close_code(lapsing) == 4401
        assert 0.5 < time.monotonic() - started < 5
        assert await close_code(refreshed) == 4403  # refreshing as another user is refused


def tcp_established(local_port: int) -> bool:
    """True when the kernel lists an ESTABLISHED TCP socket bound to 127.0.0.1:`local_port`."""
    want = f"0100007F:{local_port:04X}"
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return any(row[1] == want and row[3] == "01" for row in rows)


def client_frame(text: str) -> bytes:
    """A masked text frame, as a client must send it."""
    payload, mask = text.encode(), os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class StuckClient:
    """A WebSocket client on a bare stream with a tiny receive buffer: it reads nothing until asked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.reader, self.writer, self.local_port = reader, writer, port

    @classmethod
    async def open(cls, port: int, user: str) -> StuckClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        auth = msgspec.json.encode({"type": "auth", "token": token(user)}).decode()
        writer.write(client_frame(auth) + client_frame('{"type":"subscribe"}'))
        await writer.drain()
        return cls(reader, writer, sock.getsockname()[1])

    async def close_code(self, wait_s: float) -> int | None:
        """Read frames until the server's close frame: its code, or None when the connection drops."""
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    b0, b1 = await self.reader.readexactly(2)
                    n = b1 & 0x7F
                    if n >= 126:
                        n = int.from_bytes(await self.reader.readexactly(2 if n == 126 else 8), "big")
                    payload = await self.reader.readexactly(n)
                    if b0 & 0x0F == 0x8:
                        return int.from_bytes(payload[:2], "big") if n >= 2 else 1005
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            self.writer.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
async def test_slow_consumer_is_closed_4008_and_others_are_unaffected(
    appender: Appender, make_fanout: Any
) -> None:
    """Two stuck clients overflow: the one that reads again in time gets 4008, the one that never reads
    is aborted after the close timeout (its socket is gone); a reading client misses nothing meanwhile."""
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(
        PARLEY_FANOUT_MAX_BUFFER_BYTES="262144", PARLEY_FANOUT_READ_COUNT="20",
        PARLEY_FANOUT_PING_TIMEOUT_S="60", PARLEY_FANOUT_CLOSE_TIMEOUT_S="3",
    )  # fmt: skip
    late, never = [await StuckClient.open(fanout.port, "bob") for _ in range(2)]
    alice = await Client.open(fanout.url, "alice")
    body = "x" * 3900
    closed = False
    async with httpx.AsyncClient() as http:
        for n in range(1, 31):  # bounded: at most 3000 events of ~4 KB; kernel buffers absorb up to ~4 MB
            await asyncio.gather(*(log.send("room", "alice", body) for _ in range(100)))
            await alice.until(lambda c, n=n: len(c.events) == 100 * n, wait_s=10)
            metrics = (await http.get(f"http://127.0.0.1:{fanout.port}/metrics")).text
            if closed := 'parley_fanout_closes_total{code="4008"} 2.0' in metrics:
                break
    assert closed, "the server never decided the two 4008 closes"
    decided = time.monotonic()
    assert await late.close_code(wait_s=10) == 4008  # read within the close timeout: the frame arrives
    while tcp_established(never.local_port) and time.monotonic() - decided < 8:
        await asyncio.sleep(0.1)
    assert not tcp_established(never.local_port), "the stuck connection was not aborted"
    assert await never.close_code(wait_s=5) in (None, 4008)  # the 4008 frame is best effort
    await log.send("room", "alice", "still here")
    await alice.until(lambda c: c.bodies()[-1:] == ["still here"])
    await alice.close()


async def test_a_client_that_misses_pongs_is_closed_and_one_that_answers_stays(
    appender: Appender, make_fanout: Any
) -> None:
    """Server heartbeats: a connection that never answers pings is closed within interval + timeout;
    a client that answers (the websockets library does by itself) stays connected through many pings."""
    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(PARLEY_FANOUT_PING_INTERVAL_S="0.5", PARLEY_FANOUT_PING_TIMEOUT_S="0.5")
    alice = await Client.open(fanout.url, "alice")
    silent = await StuckClient.open(fanout.port, "bob")
    started = time.monotonic()
    assert await silent.close_code(wait_s=8) in (None, 1011)  # keepalive ping timeout, or dropped
    assert time.monotonic() - started < 8
    await asyncio.sleep(1.5)  # three more ping rounds for alice
    await log.send("room", "bob", "alice is still connected")
    await alice.until(lambda c: c.bodies()[-1:] == ["alice is still connected"])
    await alice.close()


async def test_graceful_shutdown_closes_1012_and_a_restart_resumes(
    appender: Appender, make_fanout: Any
) -> None:
    log = Log(appender)
    await log.create("room", "alice")
    fanout = await make_fanout()
    alice = await Client.open(fanout.url, "alice")
    await log.send("room", "alice", "one")
    await alice.until(lambda c: c.bodies() == ["one"])
    fanout.signal(signal.SIGTERM)
    assert await close_code(alice.ws) == 1012
    assert fanout.wait() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    await log.send("room", "alice", "two")
    await fanout.start()
    again = await Client.open(fanout.url, "alice", alice.cursor)
    await again.until(lambda c: c.bodies() == ["two"])
    await again.close()


async def visible_to(
    redis: RedisClient, namespace: str, user: str, conversations: list[str] | None
) -> dict[str, list[str]]:
    """From the whole log: per conversation, the event ids `user` may see (and asked for), in log order."""
    log = EventLog(redis, LogSettings("", namespace, PARTITIONS).layout())
    events = [decode(e.data) for p in range(PARTITIONS) for e in await log.read_range(p, "-", "+")]
    seen = visible_events(events, user)  # per conversation in log order: a conversation is in one partition
    return {cid: ids for cid, ids in seen.items() if conversations is None or cid in conversations}


class Collector:
    """A FanoutClient consumed in the background: every event it hands out, grouped by conversation."""

    def __init__(
        self,
        url: str,
        user: str,
        cursor: str | None,
        conversations: list[str] | None = None,
        recorder: Recorder | None = None,
    ):
        async def fresh_token() -> str:
            return token(user)

        self.user = user
        self.client = FanoutClient(
            url, fresh_token, cursor=cursor, conversations=conversations, backoff_initial_s=0.05,
            backoff_max_s=0.5, max_failures=200, rng=random.Random(user), recorder=recorder,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.lives = 0
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for item in self.client:
            if isinstance(item, Event):
                self.events.append(item.event)
            elif isinstance(item, Live):
                self.lives += 1
            else:
                raise AssertionError(f"unexpected {item}")

    def by_conversation(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for event in self.events:
            out.setdefault(event["conversation_id"], []).append(event["event_id"])
        return out

    async def until(self, count: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while len(self.events) < count and time.monotonic() < deadline:
            assert not self.task.done(), self.task
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.client.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def check_exactly_once(
    collectors: list[Collector], redis: RedisClient, namespace: str, wait_s: float = 20
) -> None:
    """Every collector ends with exactly its visible events, each once, in log order per conversation."""
    expected = [await visible_to(redis, namespace, c.user, c.client.conversations) for c in collectors]
    for collector, want in zip(collectors, expected, strict=True):
        await collector.until(sum(map(len, want.values())), wait_s)
    await asyncio.sleep(0.3)  # anything doubled would arrive now
    for collector, want in zip(collectors, expected, strict=True):
        assert collector.by_conversation() == want, collector.user


def origin(epoch: str) -> str:
    """The cursor before the first event of every partition."""
    return Cursor(epoch, ["0-0"] * PARTITIONS).encode()


@pytest.mark.slow
@pytest.mark.parametrize("log_redis", single_and_cluster("cluster6"), indirect=True)
async def test_sigkill_and_restart_resumes_every_client_with_nothing_lost_or_doubled(
    appender: Appender, make_fanout: Any, log_namespace: str
) -> None:
    log = Log(appender)
    await log.create("a", "u0", "u1", "u2")
    await log.create("b", "u3", "u1")
    fanout = await make_fanout(PARLEY_FANOUT_MAX_BATCH="7")
    assert appender.epoch is not None
    collectors = [Collector(fanout.url, user, origin(appender.epoch)) for user in ("u0", "u1", "u2", "u3")]
    for _ in range(300):  # every client live before the kill, however loaded the host (bounded: 30 s)
        if all(c.lives for c in collectors):
            break
        await asyncio.sleep(0.1)
    for round_ in range(6):  # bounded: 6 rounds of 40 messages
        if round_ == 2:
            fanout.signal(signal.SIGKILL)
            fanout.wait()
        if round_ == 4:
            await fanout.start()
        if round_ == 3:
            await log.remove("a", "u0", "u2")
        await asyncio.gather(
            *(log.send("ab"[n % 2], "u0" if n % 2 == 0 else "u3", f"{round_}.{n}") for n in range(40))
        )
        await asyncio.sleep(0.1)
    await check_exactly_once(collectors, appender.redis, log_namespace)
    assert all(c.client.connects >= 2 and c.lives >= 2 for c in collectors)
    for collector in collectors:
        await collector.stop()


@pytest.mark.slow
async def test_random_connection_kills_under_load_lose_and_double_nothing(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis, log_namespace: str
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    log = Log(appender)
    users = [f"u{n}" for n in range(6)]
    members: dict[str, set[str]] = {}
    for n in range(5):  # c0..c4, owner u{n}, plus two others
        cid, owner = f"c{n}", users[n]
        others = rng.sample([u for u in users if u != owner], 2)
        await log.create(cid, owner, *others)
        members[cid] = {owner, *others}
    fanout = await make_fanout(PARLEY_FANOUT_MAX_BATCH="5")
    assert appender.epoch is not None
    start = origin(appender.epoch)
    collectors = [Collector(fanout.url, user, start) for user in users]
    collectors.append(Collector(fanout.url, "u1", start, conversations=["c0", "c3"]))
    stop_chaos = asyncio.Event()

    async def chaos() -> int:
        drops = 0
        deadline = time.monotonic() + 20
        while not stop_chaos.is_set() and drops < 60 and time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.005, 0.05))
            rng.choice(collectors).client.drop()
            drops += 1
        return drops

    killer = asyncio.create_task(chaos())
    for _ in range(40):  # bounded: 40 rounds of one membership change and 20 messages = 840 events
        cid = rng.choice(sorted(members))
        owner = users[int(cid[1:])]
        user = rng.choice([u for u in users if u != owner])
        if user in members[cid]:
            await log.remove(cid, owner, user)
            members[cid].discard(user)
        else:
            await log.add(cid, owner, user)
            members[cid].add(user)
        sends = [(c, users[int(c[1:])]) for c in rng.choices(sorted(members), k=20)]
        await asyncio.gather(*(log.send(c, actor, "m") for c, actor in sends))
        await asyncio.sleep(0.01)
    stop_chaos.set()
    drops = await killer
    await check_exactly_once(collectors, redis_client, log_namespace)
    assert drops > 10, seed
    assert sum(c.client.connects for c in collectors) > len(collectors) + 10, seed
    for collector in collectors:
        await collector.stop()


async def test_the_client_refreshes_its_token_before_expiry(appender: Appender, make_fanout: Any) -> None:
    log = Log(appender)
    await log.create("room", "alice")
    fanout = await make_fanout()

    async def short_token() -> str:
        return token("alice", ttl_s=2)

    client = FanoutClient(fanout.url, short_token, refresh_margin_s=1, max_failures=0)
    got: list[str] = []

    async def consume() -> None:
        async for item in client:
            if isinstance(item, Event):
                got.append(item.event["payload"].get("body"))
                if len(got) == 2:
                    return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    await log.send("room", "alice", "early")
    await asyncio.sleep(3.5)  # past the first token's expiry
    await log.send("room", "alice", "late")
    await asyncio.wait_for(task, 5)
    assert got == ["early", "late"] and client.connects == 1 and client.refreshes >= 2
    await client.close()


@pytest.mark.slow
async def test_a_cursor_older_than_the_streams_is_served_from_the_archive(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    await log.create("other", "alice")
    fanout = await make_fanout(DATABASE_URL=database_url)
    bob = await Client.open(fanout.url, "bob")
    await log.send("room", "alice", "first")
    await bob.until(lambda c: c.bodies() == ["first"])
    cursor = bob.cursor
    await bob.close()
    for n in range(30):
        await log.send("room", "alice", f"m{n}")
        await log.send("other", "alice", "not for bob")
    assert appender.epoch is not None
    assert await archive_everything(database_url, redis_client, log_namespace, appender.epoch) == 63
    layout = LogSettings("", log_namespace, PARTITIONS).layout()
    for partition in range(PARTITIONS):  # the streams keep 2 entries each: bob's cursor is long gone
        await redis_client.xtrim(layout.stream_key(partition), maxlen=2, approximate=False)
    fresh = await make_fanout(DATABASE_URL=database_url)  # learns bob's membership from the archive
    for url in (fanout.url, fresh.url):
        again = await Client.open(url, "bob", cursor)
        assert not [f for f in again.control if f["type"] == "resync"]
        assert again.bodies() == [f"m{n}" for n in range(30)]
        assert [e["seq"] for e in again.events] == list(range(3, 33))
        await again.close()
    await log.send("room", "alice", "live")
    again = await Client.open(fresh.url, "bob", cursor)
    await again.until(lambda c: c.bodies()[-1:] == ["live"])
    assert len(again.bodies()) == 31
    await again.close()
    no_archive = await make_fanout()
    gone = await Client.open(no_archive.url, "bob", cursor)
    assert [f["reason"] for f in gone.control if f["type"] == "resync"] == ["history-gone"]
    await gone.close()


async def test_an_id_chosen_by_its_creator_streams_and_filters(appender: Appender, make_fanout: Any) -> None:
    """The command API's form of a chosen id (`alice:room`) is delivered and accepted in a subscribe filter."""
    body = CreateConversation(title="t", participants=["bob"], conversation_id="room")
    command = commands.create_conversation(Context(actor="alice"), body)
    assert command.conversation_id == "alice:room"
    await appender.append(command)
    log = Log(appender)
    await log.create("plain", "alice", "bob")
    fanout = await make_fanout()
    bob = await Client.open(fanout.url, "bob", conversations=["alice:room"])
    await log.send("plain", "alice", "not in the filter")
    await log.send("alice:room", "alice", "hello")
    await bob.until(lambda c: c.bodies() == ["hello"])
    assert {e["conversation_id"] for e in bob.events} == {"alice:room"}
    await bob.close()


@pytest.mark.slow
async def test_a_removed_participant_resuming_from_an_old_cursor_never_gets_a_later_edit(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "dan")
    fanout = await make_fanout(DATABASE_URL=database_url)
    dan = await Client.open(fanout.url, "dan")
    alice = Context(actor="alice")
    await appender.append(commands.send_message(alice, "room", SendMessage(body="noon", message_id="m1")))
    await dan.until(lambda c: c.bodies() == ["noon"])
    cursor = dan.cursor
    await dan.close()
    await log.remove("room", "alice", "dan")
    await appender.append(commands.edit_message(alice, "room", "m1", EditMessage(body="5pm")))
    marker = next(
        cid for n in range(1000)
        if appender.layout.partition_for(cid := f"marker{n}") == appender.layout.partition_for("room")
    )  # fmt: skip
    await log.create(marker, "dan")  # after the edit in room's partition: replay reaches past it
    expected = [("room", "participant_removed"), (marker, "conversation_created")]
    again = await Client.open(fanout.url, "dan", cursor)  # history from the streams
    assert [(e["conversation_id"], e["payload"]["type"]) for e in again.events] == expected
    await again.close()
    assert appender.epoch is not None
    await archive_everything(database_url, redis_client, log_namespace, appender.epoch)
    layout = LogSettings("", log_namespace, PARTITIONS).layout()
    for partition in range(PARTITIONS):
        await redis_client.xtrim(layout.stream_key(partition), maxlen=1, approximate=False)
    fresh = await make_fanout(DATABASE_URL=database_url)
    again = await Client.open(fresh.url, "dan", cursor)  # history from the archive
    assert not [f for f in again.control if f["type"] == "resync"]
    assert [(e["conversation_id"], e["payload"]["type"]) for e in again.events] == expected
    await again.close()


@pytest.mark.slow
async def test_resumes_straddling_a_retention_trim_are_gapless_and_duplicate_free(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis, redis_server_url: str,
    log_namespace: str, database_url: str,
) -> None:  # fmt: skip
    """The projector's retention trims the room's stream to its last 3 entries while alice is connected and
    bob is away; both resume from cursors older than the trim point: archive, then stream, no gap, no repeat."""
    from projector.settings import ProjectorSettings
    from tests.test_projector_api import AUTH as PROJECTOR_AUTH
    from tests.test_projector_faults import running

    log = Log(appender)
    await log.create("room", "alice", "bob")
    fanout = await make_fanout(DATABASE_URL=database_url)
    alice = await Client.open(fanout.url, "alice")
    bob = await Client.open(fanout.url, "bob")
    await log.send("room", "alice", "first")
    await bob.until(lambda c: c.bodies() == ["first"])
    away = bob.cursor
    await bob.close()
    settings = ProjectorSettings(
        log=LogSettings(redis_server_url, log_namespace, PARTITIONS), database_url=database_url,
        auth=PROJECTOR_AUTH, block_ms=50, worker_id="retention", retain_stream_s=0, retain_stream_events=3,
        retention_interval_s=0.05,
    )  # fmt: skip
    key = appender.layout.stream_key(appender.layout.partition_for("room"))
    async with running(settings) as (_worker, _client):
        for n in range(5):
            await log.send("room", "alice", f"m{n}")
        await alice.until(lambda c: c.bodies()[-1:] == ["m4"])
        mid = alice.cursor  # taken while connected, trimmed past while still connected
        for n in range(5, 30):
            await log.send("room", "alice", f"m{n}")
        deadline = time.monotonic() + 10
        while await redis_client.xlen(key) > 3:
            assert time.monotonic() < deadline, "the projector's retention did not trim"
            await asyncio.sleep(0.05)
    sent = [f"m{n}" for n in range(30)]
    await alice.until(lambda c: len(c.bodies()) == 31)
    assert alice.bodies() == ["first", *sent] and [e["seq"] for e in alice.events] == list(range(2, 33))
    await alice.close()
    for user, cursor, expected in (("bob", away, sent), ("alice", mid, sent[5:])):
        again = await Client.open(fanout.url, user, cursor)
        assert not [f for f in again.control if f["type"] == "resync"], again.control
        assert again.bodies() == expected
        assert [e["seq"] for e in again.events] == list(range(33 - len(expected), 33))
        await again.close()
