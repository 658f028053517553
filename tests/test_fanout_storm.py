"""Reconnect storm: many resumes from the same and nearby cursors read each history page once, from Redis
and from the archive, and every client still gets exactly its events."""

from __future__ import annotations

import asyncio
import functools
import re
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from events.codec import decode
from events.log import EventLog
from events.position import parse_stream_id
from events.schema import Envelope, MessageSent
from realtime_fanout.cursor import Cursor
from realtime_fanout.item import IndexedItems, Item
from realtime_fanout.pageflights import Page, PageFlights
from realtime_fanout.recent import BLOCK, RecentItems
from servicekit.log_settings import LogSettings
from tests.fanout_fixtures import PARTITIONS, Client, Log, archive_everything, cursor_after_one

PAGE = 20


async def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the fanout's /metrics (0 when absent)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{want}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def pages(n: int) -> int:
    """Page reads a chain needs for `n` entries: it stops at the first partial (possibly empty) page."""
    return n // PAGE + 1


@pytest.mark.slow
async def test_a_reconnect_storm_reads_each_page_once(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    await log.create("other", "alice")
    first = await make_fanout()
    bob = await Client.open(first.url, "bob")
    await log.send("room", "alice", "first")
    await bob.until(lambda c: c.bodies() == ["first"])
    assert appender.epoch is not None and bob.cursor is not None
    start = Cursor.decode(bob.cursor, epoch=appender.epoch, partitions=PARTITIONS)
    await bob.close()
    for n in range(70):
        await log.send("room", "alice", f"m{n}")
        await log.send("other", "alice", "not for bob")
    await archive_everything(database_url, redis_client, log_namespace, appender.epoch)
    layout = LogSettings("", log_namespace, PARTITIONS).layout()
    stream = EventLog(redis_client, layout)
    entries = [await stream.read_range(p, "-", "+") for p in range(PARTITIONS)]
    ids = [[e.stream_id for e in part] for part in entries]
    for partition in range(PARTITIONS):  # 25 entries stay in each stream: the rest is the archive's
        await redis_client.xtrim(layout.stream_key(partition), maxlen=25, approximate=False)
    want_archive = want_redis = 0
    for partition in range(PARTITIONS):
        after = start.key(partition)
        keys = [parse_stream_id(i) for i in ids[partition]]
        first_held = await stream.first_id(partition)
        if not keys or keys[-1] == after:
            continue  # the live feed starts at the cursor: nothing to replay
        if first_held is not None and parse_stream_id(first_held) > after:
            bound = parse_stream_id(first_held)
            want_archive += pages(sum(1 for k in keys if after < k <= bound))
            want_redis += pages(sum(1 for k in keys if k > bound))
        else:
            want_redis += pages(sum(1 for k in keys if k > after))
    assert want_archive >= 3  # the storm crosses several archive pages and several stream pages
    room = layout.partition_for("room")
    fanout = await make_fanout(
        DATABASE_URL=database_url, PARLEY_FANOUT_REPLAY_PAGE=str(PAGE), PARLEY_FANOUT_HISTORY_LINGER_S="30",
        PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER="100",  # one user's 60 connections, as a storm of many users'
    )  # fmt: skip
    bodies = [f"m{n}" for n in range(70)]
    later = [e for e in entries[room] if parse_stream_id(e.stream_id) > start.key(room)]
    nearby: dict[str, list[str]] = {}  # cursor -> the room bodies after it: a few entries later
    for k in (1, 2, 3, 5, 7, 9, 11, 13, 15, 17):
        cursor = start.copy()
        cursor.advance(room, later[k - 1].stream_id, parse_stream_id(later[k - 1].stream_id))
        events = [decode(e.data) for e in later[k:]]
        nearby[cursor.encode()] = [
            e.payload.body
            for e in events
            if e.conversation_id == "room" and isinstance(e.payload, MessageSent)
        ]

    same = [asyncio.create_task(Client.open(fanout.url, "bob", bob.cursor)) for _ in range(50)]
    # A page serves only callers at or after its start, so a nearby cursor that read before the same-cursor
    # chain started would read a page of its own. Once one same-cursor client is live, every page of that
    # chain has been read and lingers: the nearby clients join it (while the other 49 still catch up).
    await asyncio.wait(same, return_when=asyncio.FIRST_COMPLETED)
    clients = await asyncio.gather(*same, *(Client.open(fanout.url, "bob", c) for c in nearby))
    for client in clients[:50]:
        assert client.bodies() == bodies and [e["seq"] for e in client.events] == list(range(3, 73))
    for client, want in zip(clients[50:], nearby.values(), strict=True):
        assert client.bodies() == want and want
    assert not [f for c in clients for f in c.control if f["type"] == "resync"]
    reads = {
        s: await metric(fanout.port, "parley_fanout_history_reads_total", source=s)
        for s in ("redis", "archive")
    }
    assert reads == {"redis": want_redis, "archive": want_archive}
    shared = await metric(fanout.port, "parley_fanout_history_coalesced_total", source="redis")
    shared += await metric(fanout.port, "parley_fanout_history_coalesced_total", source="archive")
    assert shared == 59 * (want_redis + want_archive)  # every other client's page reads were joins
    for client in clients:
        await client.close()


def test_a_page_serves_later_positions_it_covers() -> None:
    full = Page([], (1, 0), "9-0", (9, 0), full=True)
    assert full.serves((1, 0), None) and full.serves((5, 0), (0, 0)) and full.serves((8, 9), None)
    assert not full.serves((9, 0), None) and not full.serves((0, 5), None)
    partial = Page([], (1, 0), "4-0", (4, 0), full=False)
    assert partial.serves((3, 0), None)  # bounded (archive) read: complete up to its bound
    assert partial.serves((3, 0), (4, 0)) and not partial.serves((3, 0), (4, 1))  # live starts later: stale
    assert Page([], (5, 0), None, None, full=False).serves((6, 0), (5, 0))


async def test_page_flights_share_in_flight_and_lingering_reads() -> None:
    now = [0.0]
    flights: PageFlights[int] = PageFlights(linger_s=1.0, max_pages=2, clock=lambda: now[0])
    release = asyncio.Event()

    async def read(after: int) -> Page:
        await release.wait()
        return Page([], (after, 0), f"{after + 10}-0", (after + 10, 0), full=True)

    calls = [flights.read(0, (k, 0), None, functools.partial(read, k)) for k in (1, 1, 4, 1)]
    tasks = [asyncio.create_task(c) for c in calls]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert [shared for _, shared in results] == [False, True, True, True] and flights.reads == 1
    assert (await flights.read(0, (10, 9), None, lambda: read(10)))[1] is True  # lingering, covers it
    now[0] = 5.0  # expired
    assert (await flights.read(0, (2, 0), None, lambda: read(2)))[1] is False
    assert (await flights.read(1, (2, 0), None, lambda: read(2)))[1] is False  # another scope
    assert flights.reads == 3


def test_recent_items_serve_every_event_after_a_cursor_at_or_after_their_floor() -> None:
    def item(partition: int, n: int) -> Item:  # the blocks look at positions and conversations
        envelope = SimpleNamespace(conversation_id=f"c{n % 3}", payload=None, actor="a")
        return Item(partition, f"{n}-0", (n, 0), cast(Envelope, envelope), b"{}")

    recent = RecentItems(partitions=2, max_items=2 * 2 * BLOCK)  # two blocks per partition
    recent.start(["5-0", "0-0"])
    for n in range(6, 6 + 3 * BLOCK + 10):
        recent.add(item(0, n))
    assert not recent.covers(0, (5, 0)) and recent.after(0, (5, 0)) is None  # the first block was evicted
    floor = 5 + BLOCK
    assert recent.covers(0, (floor, 0))
    pages = recent.after(0, (floor + 3, 0))
    assert pages is not None
    keys = [i.key[0] for page in pages for i in page if i.key > (floor + 3, 0)]
    assert keys == list(range(floor + 4, 6 + 3 * BLOCK + 10))
    for page in pages:  # the open block's index is kept as it grows: the same as one built afresh
        assert page.lookup == IndexedItems(list(page)).lookup
    assert recent.after(1, (0, 0)) == []  # nothing after the start position yet
    assert RecentItems(2, 0).after(0, (9, 0)) is None  # off: never covers


def test_recent_items_started_warm_serve_every_event_after_the_first_held_one() -> None:
    def item(n: int) -> Item:
        envelope = SimpleNamespace(conversation_id=f"c{n % 3}", payload=None, actor="a")
        return Item(0, f"{n}-0", (n, 0), cast(Envelope, envelope), b"{}")

    recent = RecentItems(partitions=1, max_items=2 * BLOCK)
    assert recent.per_partition == 2 * BLOCK
    held = [item(n) for n in range(100, 100 + 2 * BLOCK)]
    recent.start([held[-1].stream_id], [held])
    assert not recent.covers(0, (99, 0)) and recent.covers(0, (100, 0))
    pages = recent.after(0, (150, 0))
    assert pages is not None
    assert [i.key[0] for page in pages for i in page if i.key > (150, 0)] == list(range(151, 100 + 2 * BLOCK))
    recent.add(item(100 + 2 * BLOCK))  # live after the warm ones: the same blocks go on
    pages = recent.after(0, (100 + 2 * BLOCK - 1, 0))
    assert (
        pages is not None and [i.key[0] for p in pages for i in p if i.key > (355, 0)][-1] == 100 + 2 * BLOCK
    )
    for page in pages:
        assert page.lookup == IndexedItems(list(page)).lookup
    cold = RecentItems(partitions=1, max_items=0)
    cold.start(["5-0"], [held])  # off: nothing held, never covers
    assert cold.after(0, (100, 0)) is None


async def test_a_restarted_fanout_serves_resumes_from_the_events_it_read_at_start(
    appender: Appender, make_fanout: Any
) -> None:
    """After a restart (a deploy, a crash) the hub holds the latest events it bootstrapped from: clients
    resuming from cursors inside them read nothing from Redis, and get exactly what follows."""
    log = Log(appender)
    await log.create("room", "alice", "bob")
    first = await make_fanout()
    cursor = await cursor_after_one(log, first.url, "alice", "bob", "room")
    for body in ("two", "three"):
        await log.send("room", "alice", body)
    restarted = await make_fanout()
    clients = await asyncio.gather(*(Client.open(restarted.url, "bob", cursor) for _ in range(3)))
    for client in clients:
        await client.until(lambda c: c.bodies() == ["two", "three"])
        assert [e["seq"] for e in client.events] == [3, 4]
    assert await metric(restarted.port, "parley_fanout_history_reads_total", source="redis") == 0
    assert await metric(restarted.port, "parley_fanout_history_coalesced_total", source="memory") > 0
    for client in clients:
        await client.close()
