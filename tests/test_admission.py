"""One validation of log entries (`events.admission`): the projector dead-letters and the fanout never
delivers (live or in replay) the same entries: a seq out of order, a reused message id, a NUL body, and the
second of two entries at the same next seq (a forged one got there first)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from events import schema
from events.admission import Ledger, refusal
from events.codec import decode, encode
from events.exceptions import DecodeError
from events.log import EventLog, LogEntry
from projector.batch import archive_row
from projector.migrate import migrate
from projector.model import fold_entries
from realtime_fanout.archive import Archive
from realtime_fanout.cursor import Cursor
from realtime_fanout.frames import EventFrame, EventsFrame, decode_server_frame
from realtime_fanout.history import History
from realtime_fanout.hub import Hub
from realtime_fanout.item import Item
from realtime_fanout.session import Session
from servicekit.log_settings import LogSettings

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def env(seq: int, actor: str, payload: schema.AnyPayload, cid: str = "c") -> schema.Envelope:
    return schema.Envelope(
        seq=seq, event_id=uuid.uuid4().hex, schema_version=payload.VERSION, occurred_at=T0, actor=actor,
        conversation_id=cid, correlation_id="", payload=payload,
    )  # fmt: skip


def sent(seq: int, mid: str, body: str = "b", actor: str = "ann") -> schema.Envelope:
    return env(seq, actor, schema.MessageSent(mid, body))


# (label, bytes, admitted): the log of conversation "c", in order; `admitted` is what both readers decide.
CASES: list[tuple[str, bytes, bool]] = [
    ("create", encode(env(1, "ann", schema.ConversationCreated("t", ("ann", "bob")))), True),
    ("m1", encode(sent(2, "m1")), True),
    ("reused message id", encode(sent(3, "m1", "again")), False),
    ("m2", encode(sent(3, "m2")), True),
    ("repeated seq", encode(sent(3, "m3")), False),
    ("old seq", encode(sent(1, "m4")), False),
    ("forged next seq", encode(sent(4, "f1", "forged", actor="bob")), True),
    ("the real one after it", encode(sent(4, "r1", "real")), False),
    ("NUL body", encode(sent(5, "m5")).replace(b'"body":"b"', b'"body":"b\\u0000"'), False),
    ("edit of an unknown message", encode(env(5, "ann", schema.MessageEdited("nope", "x"))), False),
    ("add of a participant", encode(env(5, "ann", schema.ParticipantAdded("bob"))), False),
    ("m5", encode(sent(5, "m5")), True),
    ("unknown conversation", encode(env(1, "ann", schema.MessageSent("x", "y"), cid="ghost")), False),
]


def test_the_fold_dead_letters_exactly_the_refused_entries() -> None:
    entries = [LogEntry(0, f"{n + 1}-0", data) for n, (_, data, _) in enumerate(CASES)]
    model = fold_entries(entries)
    refused = [CASES[int(sid.split("-")[0]) - 1][0] for _, sid in model.dead_letters]
    assert sorted(refused) == sorted(label for label, _, ok in CASES if not ok)


def test_the_ledger_refuses_what_the_fold_does_and_forgets_only_beyond_its_window() -> None:
    ledger = Ledger(window=2)
    assert ledger.admit(env(1, "ann", schema.ConversationCreated("t", ("ann",)))) is None
    for n, mid in enumerate(("a", "b", "c"), start=2):
        assert ledger.admit(sent(n, mid)) is None
    assert ledger.admit(sent(5, "c")) == "message c already exists"
    assert ledger.admit(sent(5, "a")) is None  # forgotten: admitted (the projector still refuses it)
    assert ledger.admit(env(6, "ann", schema.MessageEdited("zz", "x"))) is None
    assert refusal(None, sent(1, "x")) == "message_sent for unknown conversation c"


def test_the_ledger_holds_at_most_max_messages_ids_in_all() -> None:
    ledger = Ledger(window=10, max_messages=3)
    for cid in ("a", "b"):
        assert ledger.admit(env(1, "ann", schema.ConversationCreated("t", ("ann",)), cid=cid)) is None
    for n, (cid, mid) in enumerate((("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")), start=2):
        assert ledger.admit(env(n, "ann", schema.MessageSent(mid, "x"), cid=cid)) is None
    assert ledger.messages_held == 2  # a's ids went first: b was written to last
    assert ledger.admit(env(9, "ann", schema.MessageSent("b1", "x"), cid="b")) == "message b1 already exists"
    assert ledger.admit(env(9, "ann", schema.MessageSent("a1", "x"), cid="a")) is None  # forgotten


@dataclass(eq=False)
class Subscriber:
    user_id: str
    conversations: frozenset[str] | None = None
    items: list[Item] = field(default_factory=list)

    def offer(self, item: Item) -> None:
        self.items.append(item)

    def abort(self) -> None:
        raise AssertionError(f"{self.user_id}'s connection aborted")


def label_of(item: Item) -> str:
    return CASES[int(item.stream_id.split("-")[0]) - 1][0]


async def stop(hub: Hub, client: aioredis.Redis) -> None:
    """Stop the hub, then close its client. redis-py (8.1, hiredis) may swallow the cancellation of a blocking
    XREAD and wait on the socket again; closing the connections ends that read."""
    stopper = asyncio.ensure_future(hub.stop())
    done, _ = await asyncio.wait([stopper], timeout=2)
    if not done:
        await client.connection_pool.disconnect()
    await stopper
    await client.aclose()


@pytest.mark.parametrize("live_from", [0, 5, len(CASES)])
async def test_the_hub_refuses_the_same_entries_live_at_bootstrap_and_in_replay(
    redis_client: aioredis.Redis, redis_server_url: str, live_from: int
) -> None:
    layout = LogSettings("", f"admission-{uuid.uuid4().hex[:8]}", 1).layout()
    log = EventLog(redis_client, layout)
    epoch = await log.open(create=True)
    key = layout.stream_key(0)
    for n, (_, data, _) in enumerate(CASES[:live_from]):
        await redis_client.xadd(key, {"e": data}, id=f"{n + 1}-0")
    hub_client = aioredis.Redis.from_url(redis_server_url)
    hub = Hub(hub_client, layout, block_ms=50)
    await hub.start()
    try:
        bob = Subscriber("bob")
        hub.attach(bob)
        for n, (_, data, _) in enumerate(CASES[live_from:], start=live_from):
            await redis_client.xadd(key, {"e": data}, id=f"{n + 1}-0")
        deadline = time.monotonic() + 10
        while hub.positions[0] != f"{len(CASES)}-0" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert [label_of(i) for i in bob.items] == [label for label, _, ok in CASES[live_from:] if ok]
        refused = sorted(CASES[int(sid.split("-")[0]) - 1][0] for _, sid in hub.verdicts.refused)
        assert refused == sorted(label for label, data, ok in CASES if not ok and b"\\u0000" not in data)

        session = Session("bob", Cursor(epoch, ["0-0"]), replayable=hub.replayable)
        async for page in History(log).pages(epoch, 0, "0-0", hub.positions[0]):
            session.feed_replay(page)
        session.replay_done()
        events: list[dict[str, Any]] = []
        for frame in map(decode_server_frame, session.frames()):
            if isinstance(frame, EventFrame):
                events.append(msgspec.json.decode(frame.event))
            elif isinstance(frame, EventsFrame):
                events += [msgspec.json.decode(e) for e in frame.events]
        assert [e["payload"].get("message_id") for e in events] == [None, "m1", "m2", "f1", "m5"]
    finally:
        await stop(hub, hub_client)


async def test_the_archive_the_fanout_reads_leaves_out_the_folds_dead_letters(database_url: str) -> None:
    entries = [LogEntry(0, f"{n + 1}-0", data) for n, (_, data, _) in enumerate(CASES)]
    dead = fold_entries(entries).dead_letters
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await migrate(conn)
        for entry in entries:
            try:
                event = decode(entry.data)
            except DecodeError:
                continue  # never archived
            row = archive_row("e", entry, event)
            await conn.execute(
                f"INSERT INTO parley_store.event_archive VALUES ({', '.join(['%s'] * 12)})", row
            )
        for _, sid in dead:
            await conn.execute(
                "INSERT INTO parley_store.dead_letters (epoch, partition, stream_id, data, error) "
                "VALUES ('e', 0, %s, '', 'refused')",
                (sid,),
            )
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
        archive = Archive(pool)
        page = await archive.read_page("e", 0, "0-0", f"{len(CASES)}-0")
        assert [label_of(i) for i in page.items] == [label for label, _, ok in CASES if ok]
        assert page.last_id == f"{len(CASES)}-0"  # the page moves past refused rows too
        assert await archive.last_seqs("e", 0, (1 << 64, 0)) == [("c", 5)]
        members = await archive.membership_entries("e", 0, (1 << 64, 0))
        assert [e.stream_id for e in members] == ["1-0"]  # not the refused addition
