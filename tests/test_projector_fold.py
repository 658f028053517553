"""The fold is pure: checked against a from-scratch definition of every read model, without a database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import schema
from events.codec import encode
from events.log import LogEntry
from projector.exceptions import FoldError
from projector.fold import apply, preview
from projector.model import fold_entries
from projector.state import Changes, Conversation, Inbox, Message, Span, Version, forget_bodies

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def envelope(
    conv: str, seq: int, actor: str, payload: schema.AnyPayload, at: datetime = T0
) -> schema.Envelope:
    return schema.Envelope(
        seq=seq, event_id=f"e-{conv}-{seq}", schema_version=payload.VERSION, occurred_at=at,
        actor=actor, conversation_id=conv, correlation_id="c", payload=payload,
    )  # fmt: skip


def entry(n: int, env: schema.Envelope, partition: int = 0) -> LogEntry:
    return LogEntry(partition, f"{1000 + n}-0", encode(env))


def run(*events: schema.Envelope) -> Any:
    return fold_entries(entry(i, e) for i, e in enumerate(events))


def test_create_send_read_unread_and_inbox() -> None:
    model = run(
        envelope("c", 1, "ann", schema.ConversationCreated("hi", ("ann", "bob"))),
        envelope("c", 2, "ann", schema.MessageSent("m1", "hello"), T0 + timedelta(seconds=1)),
        envelope("c", 3, "bob", schema.MessageSent("m2", "yo"), T0 + timedelta(seconds=2)),
        envelope("c", 4, "bob", schema.MessagesRead(2)),
    )
    conv = model.tables["conversations"][("c",)]
    assert isinstance(conv, Conversation)
    assert (conv.message_count, conv.last_seq, conv.last_message_preview) == (2, 4, "yo")
    assert conv.last_activity_at == T0 + timedelta(seconds=2)
    ann, bob = model.tables["inbox"][("ann", "c")], model.tables["inbox"][("bob", "c")]
    assert isinstance(ann, Inbox) and isinstance(bob, Inbox)
    assert (ann.unread_count, bob.unread_count, bob.read_seq) == (1, 0, 2)
    assert not model.dead_letters


def test_delete_removes_body_preview_and_unread() -> None:
    model = run(
        envelope("c", 1, "ann", schema.ConversationCreated("hi", ("ann", "bob"))),
        envelope("c", 2, "ann", schema.MessageSent("m1", "secret")),
        envelope("c", 3, "ann", schema.MessageDeleted("m1")),
    )
    message = model.tables["messages"][("c", 2)]
    assert isinstance(message, Message)
    assert message.body is None and message.state == "deleted"
    conv = model.tables["conversations"][("c",)]
    assert isinstance(conv, Conversation)
    assert conv.last_message_preview is None and conv.message_count == 0
    assert model.tables["inbox"][("bob", "c")].unread_count == 0


def test_removed_participant_span_and_rejoin() -> None:
    model = run(
        envelope("c", 1, "ann", schema.ConversationCreated("hi", ("ann", "bob"))),
        envelope("c", 2, "ann", schema.ParticipantRemoved("bob")),
        envelope("c", 3, "ann", schema.MessageSent("m1", "not for bob")),
        envelope("c", 4, "ann", schema.ParticipantAdded("bob")),
        envelope("c", 5, "ann", schema.MessageSent("m2", "for bob")),
    )
    spans = sorted(r.key for r in model.tables["memberships"].values())
    assert spans == [("c", "ann", 1), ("c", "bob", 1), ("c", "bob", 4)]
    first = model.tables["memberships"][("c", "bob", 1)]
    assert isinstance(first, Span) and first.left_seq == 2 and first.left_stream_id == "1001-0"
    assert model.tables["inbox"][("bob", "c")].unread_count == 1


def test_delete_of_message_sent_while_away_does_not_touch_unread() -> None:
    model = run(
        envelope("c", 1, "ann", schema.ConversationCreated("hi", ("ann", "bob"))),
        envelope("c", 2, "ann", schema.MessageSent("m1", "seen")),
        envelope("c", 3, "ann", schema.ParticipantRemoved("bob")),
        envelope("c", 4, "ann", schema.MessageSent("m2", "unseen")),
        envelope("c", 5, "ann", schema.MessageDeleted("m2")),
    )
    assert model.tables["inbox"][("bob", "c")].unread_count == 1


def test_contradicting_events_are_fold_errors() -> None:
    created = envelope("c", 1, "ann", schema.ConversationCreated("hi", ("ann",)))
    with pytest.raises(FoldError):
        apply(None, envelope("c", 1, "ann", schema.MessageSent("m", "x")), "1-0", Changes())
    model = run(created, envelope("c", 2, "ann", schema.MessageEdited("nope", "x")))
    assert list(model.dead_letters) == [(0, "1001-0")]
    assert model.tables["conversations"][("c",)].last_seq == 1


def test_undecodable_bytes_are_dead_letters() -> None:
    model = fold_entries([LogEntry(0, "1-0", b"{not json")])
    assert list(model.dead_letters) == [(0, "1-0")]


# --- property: the incremental fold equals a from-scratch definition -----------------------------------


@dataclass
class Naive:
    """Facts recorded as they come; every read model is computed from its definition at the end."""

    title: str
    creator: str
    created_at: datetime
    last_seq: int
    spans: list[list[Any]] = field(
        default_factory=list
    )  # [user, joined, joined_sid, left, left_sid, joined_at]
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    markers: dict[str, int] = field(default_factory=dict)
    archived: dict[str, bool] = field(default_factory=dict)

    def member(self, user: str) -> bool:
        return any(s[0] == user and s[3] is None for s in self.spans)

    def saw(self, user: str, seq: int) -> bool:
        return any(s[0] == user and s[1] < seq and (s[3] is None or seq < s[3]) for s in self.spans)


def naive_apply(convs: dict[str, Naive], env: schema.Envelope, sid: str) -> bool:
    """Apply if the write side's invariants hold; False means the fold must refuse it."""
    p, c, who = env.payload, convs.get(env.conversation_id), env.actor
    if isinstance(p, schema.ConversationCreated):
        if c is not None:
            return False
        c = convs[env.conversation_id] = Naive(p.title, who, env.occurred_at, env.seq)
        for user in dict.fromkeys((who, *p.participants)):
            c.spans.append([user, env.seq, sid, None, None, env.occurred_at])
            c.markers[user], c.archived[user] = 0, False
        return True
    if c is None or env.seq <= c.last_seq:
        return False
    ok = True
    if isinstance(p, schema.MessageSent):
        ok = p.message_id not in c.messages
        if ok:
            c.messages[p.message_id] = {"seq": env.seq, "author": who, "body": p.body, "at": env.occurred_at,
                                        "reply_to": p.reply_to, "edited": None, "deleted": None,
                                        "replaced": []}  # fmt: skip
    elif isinstance(p, schema.MessageEdited | schema.MessageDeleted):
        m = c.messages.get(p.message_id)
        ok = m is not None and m["deleted"] is None
        if ok and isinstance(p, schema.MessageEdited):
            m["replaced"].append([env.seq, m["body"], m["edited"]])  # type: ignore[index]
            m["body"], m["edited"] = p.body, env.occurred_at  # type: ignore[index]
        elif ok:
            m["body"], m["deleted"] = None, env.occurred_at  # type: ignore[index]
            for replaced in m["replaced"]:  # type: ignore[index]
                replaced[1] = None
    elif isinstance(p, schema.MessagesRead):
        ok = who in c.markers
        if ok:
            c.markers[who] = max(c.markers[who], p.up_to_seq)
    elif isinstance(p, schema.ConversationArchived | schema.ConversationUnarchived):
        ok = c.member(who)
        if ok:
            c.archived[who] = isinstance(p, schema.ConversationArchived)
    elif isinstance(p, schema.ParticipantAdded):
        ok = not c.member(p.user_id)
        if ok:
            c.spans.append([p.user_id, env.seq, sid, None, None, env.occurred_at])
            c.markers.setdefault(p.user_id, 0)
            c.archived[p.user_id] = False
    elif isinstance(p, schema.ParticipantRemoved):
        ok = c.member(p.user_id)
        if ok:
            span = next(s for s in c.spans if s[0] == p.user_id and s[3] is None)
            span[3], span[4] = env.seq, sid
            c.archived[p.user_id] = False
    if ok:
        c.last_seq = env.seq
    return ok


def naive_tables(convs: dict[str, Naive]) -> dict[str, dict[Any, Any]]:
    tables: dict[str, dict[Any, Any]] = {
        "conversations": {}, "memberships": {}, "message_versions": {}, "messages": {}, "inbox": {}
    }  # fmt: skip
    for cid, c in convs.items():
        live = [m for m in c.messages.values() if m["deleted"] is None]
        last = max(c.messages.items(), key=lambda kv: kv[1]["seq"], default=None)
        activity = max([c.created_at, *(m["at"] for m in c.messages.values())])
        tables["conversations"][(cid,)] = Conversation.loaded((
            cid, c.title, c.creator, c.created_at, c.last_seq, activity, len(live),
            last[0] if last else None, last[1]["seq"] if last else None, last[1]["author"] if last else None,
            preview(last[1]["body"]) if last and last[1]["body"] is not None else None,
        ))  # fmt: skip
        for user, joined, jsid, left, lsid, _ in c.spans:
            tables["memberships"][(cid, user, joined)] = Span.loaded((cid, user, joined, jsid, left, lsid))
        for mid, m in c.messages.items():
            for until, body, edited in m["replaced"]:
                tables["message_versions"][(cid, m["seq"], until)] = Version.loaded(
                    (cid, m["seq"], until, body, edited)
                )
            tables["messages"][(cid, m["seq"])] = Message.loaded(
                (
                    cid,
                    m["seq"],
                    mid,
                    m["author"],
                    m["body"],
                    m["at"],
                    m["reply_to"],
                    m["edited"],
                    m["deleted"],
                )
            )
        for user, marker in c.markers.items():
            unread = sum(
                1 for m in live if m["seq"] > marker and m["author"] != user and c.saw(user, m["seq"])
            )
            saw = [m for m in c.messages.values() if c.saw(user, m["seq"])]
            joins = [s for s in c.spans if s[0] == user]
            seen_activity = max([c.created_at, *(s[5] for s in joins), *(m["at"] for m in saw)])
            tables["inbox"][(user, cid)] = Inbox.loaded((
                user, cid, marker, unread, c.archived[user], c.member(user), seen_activity, joins[-1][1],
                sum(1 for m in saw if m["deleted"] is None), max((m["seq"] for m in saw), default=None),
            ))  # fmt: skip
    return tables


USERS = ["ann", "bob", "cat", "dan"]
op_strategy = st.tuples(
    st.integers(0, 9),  # kind
    st.sampled_from([0, 0, 0, 1]),  # conversation
    st.integers(0, 3),  # actor
    st.integers(0, 5),  # target (user or message index)
    st.integers(-5, 30),  # seconds offset: occurred_at is not monotonic
)


def build_events(ops: list[tuple[int, int, int, int, int]]) -> list[schema.Envelope]:
    seqs: dict[str, int] = {}
    sent: list[str] = ["m0"]
    events: list[schema.Envelope] = []
    for kind, ci, ai, ti, dt in ops:
        conv, actor, user = f"c{ci}", USERS[ai], USERS[ti % 4]
        mid = f"m{ti}"
        payload: schema.AnyPayload
        if kind == 0 or (conv not in seqs and kind != 9):
            payload = schema.ConversationCreated("t" * ti, (actor, user))
        elif kind in (1, 2):
            payload = schema.MessageSent(f"m{len(events)}" if kind == 1 else mid, f"body {ti} " * dt)
            sent.append(payload.message_id)
        elif kind == 3:
            payload = schema.MessageEdited(sent[-1 - ti % len(sent)], f"edited {dt}")
        elif kind == 4:
            payload = schema.MessageDeleted(sent[-1 - ti % len(sent)])
        elif kind == 5:
            payload = schema.MessagesRead(max(1, seqs.get(conv, 0) - ti))
        elif kind == 6:
            payload = schema.ParticipantAdded(user)
        elif kind == 7:
            payload = schema.ParticipantRemoved(user)
        elif kind == 8:
            payload = schema.ConversationArchived() if dt % 2 else schema.ConversationUnarchived()
        else:
            payload = schema.MessageSent(f"x{len(events)}", "to nowhere")
            conv = "ghost"
        seqs[conv] = seqs.get(conv, 0) + 1
        events.append(envelope(conv, seqs[conv], actor, payload, T0 + timedelta(seconds=len(events) + dt)))
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_strategy, max_size=60))
def test_fold_equals_definition(ops: list[tuple[int, int, int, int, int]]) -> None:
    events = build_events(ops)
    entries = [entry(i, e) for i, e in enumerate(events)]
    model = fold_entries(entries)
    convs: dict[str, Naive] = {}
    refused = {
        (0, en.stream_id)
        for en, ev in zip(entries, events, strict=True)
        if not naive_apply(convs, ev, en.stream_id)
    }
    assert set(model.dead_letters) == refused
    assert model.tables == naive_tables(convs)


def test_a_batch_writes_each_changed_row_once_new_rows_as_inserts() -> None:
    changes = Changes()
    created = envelope("c", 1, "ann", schema.ConversationCreated("hi", ("bob",)))
    state = apply(None, created, "1-0", changes)
    apply(state, envelope("c", 2, "ann", schema.MessageSent("m1", "one")), "2-0", changes)
    first = changes.drain()
    assert {t: (len(ins), len(upd)) for t, (ins, upd) in first.items()} == {
        "conversations": (1, 0), "memberships": (2, 0), "inbox": (2, 0), "messages": (1, 0),
        "message_versions": (0, 0),
    }  # fmt: skip
    (sent,) = (m.row() for m in first["messages"][0])
    assert sent[4] == "one" and sent[-1] == "sent"
    forget_bodies(first)  # written
    apply(state, envelope("c", 3, "bob", schema.MessageSent("m2", "two")), "3-0", changes)
    apply(state, envelope("c", 4, "bob", schema.MessageEdited("m2", "2")), "4-0", changes)
    apply(state, envelope("c", 5, "ann", schema.MessagesRead(4)), "5-0", changes)
    second = changes.drain()
    assert {t: (len(ins), len(upd)) for t, (ins, upd) in second.items()} == {
        "conversations": (0, 1), "memberships": (0, 0), "inbox": (0, 2), "messages": (1, 0),
        "message_versions": (1, 0),
    }  # fmt: skip
    (version,) = second["message_versions"][0]
    assert version.row() == ("c", 3, 4, "two", None)  # the body the edit replaced, known in the batch
    (message,) = (m.row() for m in second["messages"][0])
    assert message[4] == "2" and message[-1] == "edited"  # the row as it ends, written once
    forget_bodies(second)
    assert state.messages["m1"].body is None and state.messages["m2"].body is None  # none once written
    ann = next(r.row() for r in second["inbox"][1] if r.user_id == "ann")
    assert ann[2:4] == (4, 0)  # read up to the last message: nothing unread
