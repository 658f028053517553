"""Live unread counts and read receipts (sans I/O): the tracker agrees with the read model's definition."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import encode
from events.log import LogEntry
from events.schema import (
    AnyPayload,
    ConversationArchived,
    ConversationCreated,
    Envelope,
    MessageDeleted,
    MessageSent,
    MessagesRead,
    ParticipantAdded,
    ParticipantRemoved,
)
from realtime_fanout.cursor import Cursor
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.membership import MembershipIndex, UserMemberships
from realtime_fanout.session import Session
from realtime_fanout.unread import UnreadSeed, UnreadTracker, seed_of
from realtime_fanout.unreadseed import usable_positions

NOW = datetime(2024, 1, 1, tzinfo=UTC)
USERS = ("u", "v", "w")


class Log:
    """One partition of valid events of conversation `c` (and `d`), as Items."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.seqs: dict[str, int] = {}

    def append(self, actor: str, payload: AnyPayload, cid: str = "c") -> Item:
        seq = self.seqs[cid] = self.seqs.get(cid, 0) + 1
        env = Envelope(
            seq=seq, event_id=uuid.uuid4().hex, schema_version=type(payload).VERSION, occurred_at=NOW,
            actor=actor, conversation_id=cid, correlation_id="", payload=payload,
        )  # fmt: skip
        item = decode_entry(LogEntry(0, f"{len(self.items) + 1}-0", encode(env)))
        assert item is not None
        self.items.append(item)
        return item


def reference(items: list[Item], user: str) -> tuple[int, int] | None:
    """(unread, read marker) of `user` in `c` after `items`, straight from the definition; None if never in."""
    spans = UserMemberships(user)
    read_seq, sent, deleted = 0, {}, set()
    for item in items:
        env, p = item.envelope, item.envelope.payload
        spans.apply(env)
        if isinstance(p, MessageSent):
            sent[p.message_id] = (env.seq, env.actor)
        elif isinstance(p, MessageDeleted):
            deleted.add(p.message_id)
        elif isinstance(p, MessagesRead) and env.actor == user:
            read_seq = max(read_seq, p.up_to_seq)
    if not spans.spans.get("c"):
        return None
    unread = sum(
        1
        for mid, (seq, author) in sent.items()
        if author != user and mid not in deleted and seq > read_seq and spans.can_see("c", seq)
    )
    return unread, read_seq


@st.composite
def logs(draw: st.DrawFn) -> Log:
    log = Log()
    members = set(draw(st.lists(st.sampled_from(USERS), unique=True)))
    log.append("owner", ConversationCreated(title="t", participants=("owner", *sorted(members))))
    members.add("owner")
    live: dict[str, str] = {}  # message id -> author
    for _ in range(draw(st.integers(0, 40))):
        action = draw(st.sampled_from(("send", "send", "send", "delete", "read", "toggle")))
        user = draw(st.sampled_from(sorted(members)))
        if action == "send":
            mid = uuid.uuid4().hex[:8]
            live[mid] = user
            log.append(user, MessageSent(message_id=mid, body="b"))
        elif action == "delete" and live:
            mid = draw(st.sampled_from(sorted(live)))
            log.append(live.pop(mid), MessageDeleted(message_id=mid))
        elif action == "read":
            log.append(user, MessagesRead(up_to_seq=draw(st.integers(1, log.seqs["c"]))))
        elif action == "toggle":
            other = draw(st.sampled_from(USERS))
            if other in members:
                members.discard(other)
                log.append("owner", ParticipantRemoved(user_id=other))
            else:
                members.add(other)
                log.append("owner", ParticipantAdded(user_id=other))
    return log


def seed_at(log: Log, user: str, k: int) -> UnreadSeed:
    """What the read model holds after the first k items: the user's marker and unread message ids."""
    ref = reference(log.items[:k], user)
    position = log.items[k - 1].key if k else (0, 0)
    if ref is None:
        return UnreadSeed([position])
    spans = UserMemberships(user)
    for item in log.items[:k]:
        spans.apply(item.envelope)
    deleted = {
        i.envelope.payload.message_id for i in log.items[:k] if isinstance(i.envelope.payload, MessageDeleted)
    }
    unread = [
        ("c", p.message_id, i.envelope.seq)
        for i in log.items[:k]
        if isinstance(p := i.envelope.payload, MessageSent)
        and i.envelope.actor != user
        and p.message_id not in deleted
        and spans.can_see("c", i.envelope.seq)
    ]
    return seed_of([position], {"c": ref[1]}, unread)


@settings(max_examples=300, deadline=None)
@given(log=logs(), data=st.data())
def test_the_tracker_follows_the_definition_from_any_seed_point(log: Log, data: st.DataObject) -> None:
    user = data.draw(st.sampled_from(USERS), label="user")
    k = data.draw(st.integers(0, len(log.items)), label="seed point")
    tracker = UnreadTracker(user, seed_at(log, user, k))
    spans = UserMemberships(user)
    for n, item in enumerate(log.items):
        spans.apply(item.envelope)
        before = tracker.count("c")
        frames = [msgspec.json.decode(f) for f in tracker.observe(item, spans)]
        assert tracker.observe(item, spans) == []  # a second delivery changes nothing
        if n < k:
            assert frames == []
            continue
        ref = reference(log.items[: n + 1], user)
        if tracker.count("c") is None:
            continue  # untracked: never joined, or left during the connection
        assert ref is not None and tracker.count("c") == ref[0]
        if before != ref[0]:
            assert frames and frames[-1]["unread"] == ref[0] and frames[-1]["read_seq"] == ref[1]
        for frame in frames:
            assert frame == {"type": "unread", "conversation_id": "c", "unread": ref[0], "read_seq": ref[1],
                             "seq": item.envelope.seq}  # fmt: skip


def test_frames_follow_their_event_and_receipts_reach_every_participant() -> None:
    log = Log()
    log.append("v", ConversationCreated(title="t", participants=("v", "u")))
    index = MembershipIndex()
    index.apply(log.items[0].envelope)
    sessions = {
        user: Session(user, Cursor("e", [log.items[0].stream_id]), seed=index.seed_for(user),
                      unread=UnreadTracker(user, UnreadSeed([log.items[0].key], {})))
        for user in ("u", "v")
    }  # fmt: skip
    sessions["u"].unread = UnreadTracker("u", seed_of([log.items[0].key], {"c": 0}, []))
    for session in sessions.values():
        session.replay_done()
        session.frames()
    sent = [log.append("v", MessageSent(message_id=f"m{n}", body="b")) for n in range(3)]
    read = log.append("u", MessagesRead(up_to_seq=3))
    for item in [*sent, read]:
        for session in sessions.values():
            session.feed_live(item)
    got = {user: [msgspec.json.decode(f) for f in s.frames()] for user, s in sessions.items()}
    kinds = [f["type"] for f in got["u"]]
    assert kinds == ["event", "unread", "event", "unread", "event", "unread", "event", "read", "unread"]
    assert [f["unread"] for f in got["u"] if f["type"] == "unread"] == [1, 2, 3, 1]
    receipt = {"type": "read", "conversation_id": "c", "user_id": "u", "up_to_seq": 3, "seq": 5}
    assert got["u"][-2] == receipt
    assert [f["type"] for f in got["v"]] == ["events", "read"] and got["v"][-1] == receipt  # v: no seed


def test_own_archive_reaches_every_connection_of_the_actor_only() -> None:
    log = Log()
    log.append("v", ConversationCreated(title="t", participants=("v", "u")))
    log.append("v", ConversationCreated(title="t", participants=("v", "u")), cid="d")
    index = MembershipIndex()
    for item in log.items:
        index.apply(item.envelope)
    start = Cursor("e", [log.items[-1].stream_id])
    filtered = Session("u", start, conversations=["d"], seed=index.seed_for("u"))
    other = Session("v", start, seed=index.seed_for("v"))
    archived = log.append("u", ConversationArchived())
    for session in (filtered, other):
        session.replay_done()
        session.frames()
        session.feed_live(archived)
    assert [msgspec.json.decode(f)["type"] for f in filtered.frames()] == ["event"]
    assert other.frames() == []


def test_a_read_model_snapshot_seeds_only_partitions_at_or_after_the_hub() -> None:
    rows = {0: ("e", "5-0"), 1: ("e", "2-0"), 2: ("old", "9-0")}
    positions, lagging = usable_positions(rows, "e", ["4-0", "3-0", "1-0", "0-0"])
    assert positions == [(5, 0), None, None, (0, 0)] and lagging  # ahead; behind; foreign epoch; empty
    assert usable_positions({2: ("old", "9-0")}, "e", ["0-0", "1-0", "1-0"]) == ([(0, 0), None, None], False)
