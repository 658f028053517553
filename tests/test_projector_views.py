"""What a reader sees of edited messages and of their inbox: the query SQL against real Postgres equals
`projector.views.seen` and `listed`, over random histories written by the store in random batches (bodies
known in the batch, or copied)."""

from __future__ import annotations

import random
from typing import Any

import psycopg

from events import schema
from events.codec import decode
from projector import queries
from projector.exceptions import FoldError
from projector.fold import apply
from projector.migrate import migrate
from projector.model import fold_entries
from projector.snapshot import read_tables
from projector.state import Changes, Conversation, ConversationState, Message, Span, Version
from projector.store import Store
from projector.views import listed, seen
from tests.test_projector_fold import build_events, entry

USERS = ["ann", "bob", "cat", "dan"]
WORDS = ["body", "edited", "0", "1", "2", "3", "5", "8"]


def random_ops(rng: random.Random) -> list[tuple[int, int, int, int, int]]:
    """Histories with many edits and membership changes (kinds as in test_projector_fold)."""
    kinds = [1, 1, 3, 3, 3, 4, 6, 7, 7, 5]
    ops = [(0, 0, 0, 1, 1)]
    ops += [(rng.choice(kinds), 0, rng.randrange(4), rng.randrange(6), rng.randrange(10)) for _ in range(40)]
    return ops


async def test_messages_and_search_show_each_reader_what_they_saw(database_url: str) -> None:
    rng = random.Random(8)
    store = Store()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await migrate(conn)
        await store.prepare_connection(conn)
        for _ in range(15):
            async with conn.transaction():
                await conn.execute("TRUNCATE parley.conversations, parley.memberships, parley.messages, "
                                   "parley.message_versions, parley.inbox")  # fmt: skip
            entries = [entry(i, e) for i, e in enumerate(build_events(random_ops(rng)))]
            states: dict[str, ConversationState] = {}
            changes = Changes()
            for n, en in enumerate(entries):
                event = decode(en.data)
                try:
                    states[event.conversation_id] = apply(
                        states.get(event.conversation_id), event, en.stream_id, changes
                    )
                except FoldError:  # a refused event changes nothing, as in the worker
                    pass
                if rng.random() < 0.3 or n == len(entries) - 1:  # a batch boundary
                    tables = changes.drain()
                    async with conn.transaction():
                        await store.write_tables(conn, tables)
                    for m in (*tables["messages"][0], *tables["messages"][1]):
                        m.body = None  # forget_bodies: a later edit must find it in Postgres
            model = fold_entries(entries)
            assert await read_tables(conn, "parley") == model.tables
            await check_reads(conn, model.tables)
            await check_inbox(conn, model.tables, [decode(en.data) for en in entries])


async def check_reads(conn: psycopg.AsyncConnection[Any], tables: dict[str, dict[Any, Any]]) -> None:
    messages: list[Message] = sorted(tables["messages"].values(), key=lambda m: m.seq)
    for user in USERS:
        spans: list[Span] = [s for s in tables["memberships"].values() if s.user_id == user]
        if not spans:
            continue
        expected = {}
        for m in messages:
            versions: list[Version] = [v for k, v in tables["message_versions"].items() if k[:2] == m.key]
            view = seen(m, versions, spans)
            if view is not None:
                expected[m.seq] = view
        got = await queries.messages(conn, user, "c0", 200, after_seq=0, before_seq=None)
        assert {g.seq: (g.body, g.state, g.edited_at) for g in got} == expected
        for word in WORDS:
            hits = await queries.search(conn, user, word, 200)
            want = {s for s, v in expected.items() if v.body is not None and word in v.body.split()}
            assert {h.seq for h in hits} == want, (user, word)
            assert all((h.body, h.state, h.edited_at) == expected[h.seq] for h in hits)


async def check_inbox(
    conn: psycopg.AsyncConnection[Any], tables: dict[str, dict[Any, Any]], events: list[schema.Envelope]
) -> None:
    conv = tables["conversations"].get(("c0",))
    if not isinstance(conv, Conversation):
        return
    messages: list[Message] = list(tables["messages"].values())
    versions: dict[int, list[Version]] = {}
    for v in tables["message_versions"].values():
        versions.setdefault(v.seq, []).append(v)
    for user in USERS:
        spans: list[Span] = [s for s in tables["memberships"].values() if s.user_id == user]
        if not spans or spans[-1].left_seq is not None:  # the inbox lists current conversations only
            continue
        joins = {s.joined_seq for s in spans}
        added_at = [e.occurred_at for e in events if e.conversation_id == "c0" and e.seq in joins]
        want = listed(conv.created_at, messages, versions, spans, added_at)
        (got,) = await queries.conversations(conn, user, 10, None, None)
        assert (got.last_activity_at, got.message_count, got.last_message_id, got.last_message_seq,
                got.last_message_author, got.last_message_preview) == want, user  # fmt: skip
