"""Every implementation of "who sees what" agrees, over random valid logs in real Postgres: the fold's read
models, the query API's SQL, the fanout session's delivery, its unread tracker and its unread seed (SQL
views the projector's migrations own) give each user the same visible events and messages and the same
unread counts as the README's definitions (`tests/oracle.py`); so does the pure rule
(`events.membership.may_see`) over the fold's spans, the audit's deliberately separate restatement
(`projector.audit.may_see`), and the SQL span predicate (`covers_sql`) answers as
`covers`. Bounded: 40 random logs of up to ~50 events, about a minute."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from events import schema
from events.codec import encode
from events.log import LogEntry
from events.membership import covers, covers_sql, may_see
from projector import audit, queries
from projector.fold import apply
from projector.migrate import migrate
from projector.model import fold_entries
from projector.state import Changes, ConversationState, Span, forget_bodies
from projector.store import Store
from realtime_fanout.cursor import Cursor
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.membership import MembershipIndex
from realtime_fanout.session import Session
from realtime_fanout.unread import UnreadSeed, UnreadTracker
from realtime_fanout.unreadseed import UnreadSeeder
from tests.oracle import unread, visible_events

USERS = ("ann", "bob", "cat", "dan")
CONVERSATIONS = ("c1", "c2")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
EPOCH = "e"
SEED_WINDOW = 1
"""The fanout seeder's unread ids per conversation here: 1 (+1 for the older ones' bound), so the SQL's
newest-per-conversation cut is checked against the definition."""


@dataclass
class History:
    """A valid log being written: the write side's rules, kept by hand."""

    events: list[schema.Envelope] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)
    messages: dict[str, dict[str, str]] = field(default_factory=dict)  # conversation -> live id -> author

    def append(self, cid: str, actor: str, payload: schema.AnyPayload) -> None:
        seq = self.seqs[cid] = self.seqs.get(cid, 0) + 1
        at = T0 + timedelta(seconds=len(self.events))
        event = schema.Envelope(
            seq=seq, event_id=uuid.uuid4().hex, schema_version=payload.VERSION, actor=actor, occurred_at=at,
            conversation_id=cid, correlation_id="", payload=payload,
        )  # fmt: skip
        self.events.append(event)


@st.composite
def histories(draw: st.DrawFn) -> History:
    h = History()
    for cid in CONVERSATIONS:
        creator = draw(st.sampled_from(USERS))
        others = draw(st.lists(st.sampled_from(USERS), unique=True, max_size=3))
        if draw(st.booleans()):  # the creator named or not: a member either way
            others = [creator, *others]
        h.append(cid, creator, schema.ConversationCreated("t", tuple(dict.fromkeys(others))))
        h.members[cid] = {creator, *others}
        h.messages[cid] = {}
    for _ in range(draw(st.integers(0, 45))):
        cid = draw(st.sampled_from(CONVERSATIONS))
        members, live = h.members[cid], h.messages[cid]
        action = draw(
            st.sampled_from(("send", "send", "send", "edit", "delete", "read", "toggle", "archive"))
        )
        if not members:
            action = "toggle"
        actor = draw(st.sampled_from(sorted(members))) if members else USERS[0]
        if action == "send":
            mid = f"m{len(h.events)}"
            live[mid] = actor
            h.append(cid, actor, schema.MessageSent(mid, f"body {len(h.events)}"))
        elif action in ("edit", "delete") and live:
            mid = draw(st.sampled_from(sorted(live)))
            author = live[mid]
            if action == "edit":
                h.append(cid, author, schema.MessageEdited(mid, f"edited {len(h.events)}"))
            else:
                del live[mid]
                h.append(cid, author, schema.MessageDeleted(mid))
        elif action == "read" and members:
            h.append(cid, actor, schema.MessagesRead(draw(st.integers(1, h.seqs[cid]))))
        elif action == "archive" and members:
            payload = (
                schema.ConversationArchived() if draw(st.booleans()) else schema.ConversationUnarchived()
            )
            h.append(cid, actor, payload)
        elif action == "toggle":
            user = draw(st.sampled_from(USERS))
            if user in members:
                members.discard(user)
                h.append(cid, actor if members else user, schema.ParticipantRemoved(user))
            else:
                members.add(user)
                h.append(cid, actor, schema.ParticipantAdded(user))
    return h


def entries_of(h: History) -> list[LogEntry]:
    return [LogEntry(0, f"{n + 1}-0", encode(e)) for n, e in enumerate(h.events)]


async def project(conn: psycopg.AsyncConnection[Any], entries: list[LogEntry], cuts: set[int]) -> None:
    """Fold `entries` into Postgres as the worker does, a batch ending after each index in `cuts`."""
    store = Store()
    await store.prepare_connection(conn)
    states: dict[str, ConversationState] = {}
    changes = Changes()
    for n, en in enumerate(entries):
        event = msgspec.json.decode(en.data, type=schema.Envelope)
        states[event.conversation_id] = apply(states.get(event.conversation_id), event, en.stream_id, changes)
        if n in cuts or n == len(entries) - 1:
            tables = changes.drain()
            async with conn.transaction():
                await store.write_tables(conn, tables)
            forget_bodies(tables)
    await conn.execute(
        "INSERT INTO parley.checkpoints (partition, epoch, stream_id) VALUES (0, %s, %s) "
        "ON CONFLICT (partition) DO UPDATE SET epoch = excluded.epoch, stream_id = excluded.stream_id",
        (EPOCH, entries[-1].stream_id),
    )


def fanout_view(items: list[Item], user: str) -> tuple[set[str], dict[str, int | None]]:
    """What one subscriber from the start of the log is sent: event ids, and each conversation's count."""
    session = Session(user, Cursor(EPOCH, ["0-0"]), unread=UnreadTracker(user, UnreadSeed([(0, 0)])))
    session.feed_replay(items)
    session.replay_done()
    sent: set[str] = set()
    for frame in map(msgspec.json.decode, session.frames()):
        sent.update(e["event_id"] for e in frame.get("events", [frame.get("event")]) if e)
    assert session.unread is not None
    return sent, {
        cid: session.unread.count(cid) for cid in {*CONVERSATIONS, *(i.conversation_id for i in items)}
    }


async def check(url: str, h: History, cuts: set[int]) -> None:
    entries = entries_of(h)
    items = [i for i in map(decode_entry, entries) if i is not None]
    ids_of = {e.event_id: e for e in h.events}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "TRUNCATE parley.conversations, parley.memberships, parley.messages, parley.message_versions, "
            "parley.inbox, parley.checkpoints"
        )
        await project(conn, entries, cuts)
        model = fold_entries(entries)
        assert not model.dead_letters  # a valid log
        async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False) as pool:
            seeder = UnreadSeeder(pool, wait_s=0, window=SEED_WINDOW)  # the SQL's bound is exercised
            spans = [s for s in model.tables["memberships"].values() if isinstance(s, Span)]
            for user in USERS:
                await check_user(conn, seeder, user, h, items, ids_of)
                mine = [s for s in spans if s.user_id == user]
                pure = {
                    e.event_id
                    for e in h.events
                    if may_see(user, e, [s for s in mine if s.conversation_id == e.conversation_id])
                }
                assert pure == {i for ids in visible_events(h.events, user).values() for i in ids}, user
                assert audit_view(h, user) == visible_events(h.events, user), (user, "the audit's oracle")
            one_by_one = [await seeder.seed(user, EPOCH, ["0-0"]) for user in USERS]
            before = seeder.snapshots
            together = await asyncio.gather(*(seeder.seed(user, EPOCH, ["0-0"]) for user in USERS))
            assert seeder.snapshots - before == 1  # asked at once: one snapshot for every user
            assert [(s.positions, s.conversations) for s in together] == [
                (s.positions, s.conversations) for s in one_by_one
            ]
        await check_span_sql(conn, model.tables["memberships"].values(), max(h.seqs.values()))


def audit_view(h: History, user: str) -> dict[str, list[str]]:
    """The audit's own restatement (`projector.audit.visible`), per conversation in log order."""
    positioned = [audit.Positioned(0, (n + 1, 0), e) for n, e in enumerate(h.events)]
    seen: dict[str, list[str]] = {}
    for pe in audit.visible(user, positioned, None):
        seen.setdefault(pe.event.conversation_id, []).append(pe.event.event_id)
    return seen


async def check_user(
    conn: psycopg.AsyncConnection[Any],
    seeder: UnreadSeeder,
    user: str,
    h: History,
    items: list[Item],
    ids_of: dict[str, schema.Envelope],
) -> None:
    visible = visible_events(h.events, user)
    sent, tracked = fanout_view(items, user)
    assert sent == {i for ids in visible.values() for i in ids}, user
    listed = {c.conversation_id: c for c in await queries.conversations(conn, user, 100, None, None)}
    seed = await seeder.seed(user, EPOCH, ["0-0"])
    for cid in CONVERSATIONS:
        want_messages = [
            ids_of[i].seq for i in visible.get(cid, []) if isinstance(ids_of[i].payload, schema.MessageSent)
        ]
        got = await queries.messages(conn, user, cid, 1000, after_seq=0, before_seq=None)
        assert [m.seq for m in got] == want_messages, (user, cid)
        ref = unread(h.events, user, cid)
        if ref is None:
            assert cid not in listed and tracked[cid] is None and cid not in seed.conversations
            continue
        count = len(ref.messages)
        assert tracked[cid] == count, (user, cid, "session tracker")
        held = seed.conversations[cid]
        message_seq = {e.payload.message_id: e.seq for e in h.events
                       if e.conversation_id == cid and isinstance(e.payload, schema.MessageSent)}  # fmt: skip
        assert held.count == count, (user, cid, "unread seed")
        newest = sorted(ref.messages, key=lambda m: -message_seq[m])[: SEED_WINDOW + 1]
        assert sorted(held.messages) == sorted(newest), (user, cid, "the seed holds the newest ids")
        assert all(message_seq[m] > held.older_top for m in held.messages) or not held.older
        assert seed.conversations[cid].read_seq == ref.read_seq
        if ref.member:
            assert listed[cid].unread_count == count, (user, cid, "query API")
        else:
            assert cid not in listed
    members = [cid for cid in CONVERSATIONS if (r := unread(h.events, user, cid)) and r.member]
    total = sum(len(r.messages) for cid in members if (r := unread(h.events, user, cid)))
    assert await queries.total_unread(conn, user) == total


async def check_span_sql(conn: psycopg.AsyncConnection[Any], spans: Any, last_seq: int) -> None:
    """`covers_sql` over the stored spans answers as `covers` for every seq of the log."""
    cur = await conn.execute(
        "SELECT s.conversation_id, s.user_id, s.joined_seq, q.seq FROM parley.memberships s "
        f"CROSS JOIN generate_series(0, %s) AS q(seq) WHERE {covers_sql('s', 'q.seq')}",
        (last_seq + 1,),
    )
    got = {tuple(r) for r in await cur.fetchall()}
    want = {
        (s.conversation_id, s.user_id, s.joined_seq, seq)
        for s in spans
        if isinstance(s, Span)
        for seq in range(last_seq + 2)
        if covers(s.joined_seq, s.left_seq, seq)
    }
    assert got == want


@pytest.fixture
def migrated_url(database_url: str) -> str:
    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await migrate(conn)

    asyncio.run(run())
    return database_url


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(h=histories(), cuts=st.sets(st.integers(0, 60), max_size=6))
def test_every_reader_shows_each_user_the_same_messages_and_unread_counts(
    migrated_url: str, h: History, cuts: set[int]
) -> None:
    asyncio.run(check(migrated_url, h, cuts))


def test_a_creator_left_out_of_participants_is_a_member_for_every_reader() -> None:
    h = History()
    h.append("c", "ann", schema.ConversationCreated("t", ("bob",)))
    h.append("c", "bob", schema.MessageSent("m", "hi"))
    entries = entries_of(h)
    inbox = fold_entries(entries).tables["inbox"]
    assert {key[0] for key in inbox} == {"ann", "bob"}
    items = [i for i in map(decode_entry, entries) if i is not None]
    sent, tracked = fanout_view(items, "ann")
    assert sent == {e.event_id for e in h.events} and tracked["c"] == 1
    index = MembershipIndex()
    index.apply(h.events[0])
    assert index.members["c"] == {"ann", "bob"}
