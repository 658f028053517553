"""Live unread counts and read receipts (sans I/O): the tracker agrees with the read model's definition."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import redis.asyncio as aioredis
from hypothesis import event, given, settings
from hypothesis import strategies as st

from events.codec import encode
from events.log import LogEntry
from events.membership import joins
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
from realtime_fanout.hub import Hub
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.membership import MembershipIndex, UserMemberships
from realtime_fanout.session import Session
from realtime_fanout.unread import UNREAD_WINDOW, UnreadSeed, UnreadTracker, seed_of
from realtime_fanout.unreadseed import usable_positions
from servicekit.log_settings import LogSettings
from tests.oracle import Unread, unread

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


def definition(items: list[Item], user: str, cid: str = "c") -> Unread | None:
    """unread(user, cid) after `items`, from the README's definition (`tests/oracle.py`)."""
    return unread([i.envelope for i in items], user, cid)


@st.composite
def logs(draw: st.DrawFn) -> Log:
    """Valid histories of `c` with membership churn, and deletes of messages whoever is out."""
    log = Log()
    members = set(draw(st.lists(st.sampled_from(USERS), unique=True)))
    log.append("owner", ConversationCreated(title="t", participants=("owner", *sorted(members))))
    members.add("owner")
    live: dict[str, str] = {}  # message id -> author
    for _ in range(draw(st.integers(0, 40))):
        action = draw(
            st.sampled_from(("send", "send", "send", "delete", "delete", "read", "toggle", "toggle"))
        )
        user = draw(st.sampled_from(sorted(members)))
        if action == "send":
            mid = f"m{len(log.items)}"  # deterministic: hypothesis replays the same log
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


def seed_at(log: Log, user: str, k: int, keep: int | None = None) -> UnreadSeed:
    """What the read model holds after the first k items: the user's marker and unread message ids (only
    the newest `keep` and the count, as the fanout's seeder reads them, when given)."""
    ref = definition(log.items[:k], user)
    position = log.items[k - 1].key if k else (0, 0)
    if ref is None:
        return UnreadSeed([position])
    seqs = {
        i.envelope.payload.message_id: i.envelope.seq
        for i in log.items[:k]
        if isinstance(i.envelope.payload, MessageSent)
    }
    rows = sorted((("c", m, seqs[m]) for m in ref.messages), key=lambda row: -row[2])[:keep]
    return seed_of([position], {"c": ref.read_seq}, rows, {"c": len(ref.messages)} if ref.messages else {})


@dataclass(eq=False)
class Subscriber:
    """A hub subscriber feeding a Session, as `realtime_fanout.connection.Connection` does."""

    user_id: str
    session: Session | None = None
    conversations: frozenset[str] | None = None

    def offer(self, item: Item) -> None:
        assert self.session is not None
        self.session.feed_live(item)

    def abort(self) -> None:
        raise AssertionError(f"{self.user_id}'s connection aborted")


def connect(hub: Hub, log: Log, user: str, k: int, window: int = UNREAD_WINDOW) -> Session:
    """A connection of `user` attached to `hub` after the first k items, its unread seeded at k."""
    sub = Subscriber(user)
    _, spans = hub.attach(sub)
    cursor = Cursor("e", [log.items[k - 1].stream_id if k else "0-0"])
    tracker = UnreadTracker(user, seed_at(log, user, k), window=window)
    sub.session = Session(user, cursor, seed=spans, unread=tracker)
    sub.session.replay_done()
    sub.session.frames()
    return sub.session


def new_hub() -> Hub:
    hub = Hub(aioredis.Redis(), LogSettings("", "unread-test", 1).layout())  # never reads: fed by hand
    hub.epoch = "e"
    return hub


@settings(max_examples=300, deadline=None)
@given(log=logs(), data=st.data())
def test_unread_frames_follow_the_definition_through_membership_churn(log: Log, data: st.DataObject) -> None:
    user = data.draw(st.sampled_from(USERS), label="user")
    k = data.draw(st.integers(0, len(log.items)), label="connects after")
    hub = new_hub()
    for item in log.items[:k]:
        hub.dispatch(item)
    session = connect(hub, log, user, k)
    for n in range(k, len(log.items)):
        item = log.items[n]
        hub.dispatch(item)
        frames = [f for f in map(msgspec.json.decode, session.frames()) if f["type"] == "unread"]
        session.feed_live(item)
        assert session.frames() == []  # a second delivery changes nothing
        before, ref = definition(log.items[:n], user), definition(log.items[: n + 1], user)
        if ref is None or not ref.member:
            assert frames == []  # no frames while out (the read model's row is frozen meanwhile)
            continue
        want = {"type": "unread", "conversation_id": "c", "unread": len(ref.messages), "read_seq": ref.read_seq,
                "seq": item.envelope.seq}  # fmt: skip
        assert all(f == want for f in frames)
        if (
            before is None
            or not before.member
            or (before.messages, before.read_seq) != (ref.messages, ref.read_seq)
        ):
            assert frames  # being added, or a change: reported at once


@settings(max_examples=300, deadline=None)
@given(log=logs(), data=st.data())
def test_a_bounded_window_reseeds_and_keeps_every_count_exact(log: Log, data: st.DataObject) -> None:
    """With 1-3 unread ids held, a read or delete the tracker cannot decide turns the conversation
    uncertain (no frames), a reseed from the read model (at the item, or a few items ahead) installs the
    truth, and every frame and the final count equal the definition."""
    user = data.draw(st.sampled_from(USERS), label="user")
    window = data.draw(st.integers(1, 3), label="window")
    k = data.draw(st.integers(0, len(log.items)), label="connects after")
    hub = new_hub()
    for item in log.items[:k]:
        hub.dispatch(item)
    session = connect(hub, log, user, k, window=window)
    tracker = session.unread
    assert tracker is not None
    skip_to = 0  # a reseed ahead of the items: theirs up to here are in it, and make no frame
    seeded = None
    for n in range(k, len(log.items)):
        hub.dispatch(log.items[n])
        frames = [f for f in map(msgspec.json.decode, session.frames()) if f["type"] == "unread"]
        asked = tracker.take_asks()
        if asked:
            assert frames == [] and tracker.count("c") is None  # uncertain: silent until the seed
            at = n + 1 + data.draw(st.integers(0, min(2, len(log.items) - n - 1)), label="seed ahead")
            event(f"reseeded, {at - n - 1} ahead")
            session.notify(
                tracker.reseeded("c", seed_at(log, user, at, keep=window + 1), session.memberships)
            )
            frames = [f for f in map(msgspec.json.decode, session.frames()) if f["type"] == "unread"]
            ref = definition(log.items[:at], user)
            assert ref is not None and tracker.count("c") == len(ref.messages)
            now = definition(log.items[: n + 1], user)
            if now is not None and now.member:  # the count as of the seed, in the user's sight now
                assert frames == [{"type": "unread", "conversation_id": "c", "unread": len(ref.messages),
                                   "read_seq": ref.read_seq, "seq": log.items[n].envelope.seq}]  # fmt: skip
            skip_to, seeded = at, ref
            continue
        if n < skip_to:  # in the seed already: silent, but for being added back (the seed's count)
            joined = user in joins(log.items[n].envelope)
            assert seeded is not None
            assert frames == ([{"type": "unread", "conversation_id": "c", "unread": len(seeded.messages),
                                "read_seq": seeded.read_seq, "seq": log.items[n].envelope.seq}]
                              if joined else [])  # fmt: skip
            continue
        ref = definition(log.items[: n + 1], user)
        if ref is None or not ref.member:
            assert frames == []
            continue
        want = {"type": "unread", "conversation_id": "c", "unread": len(ref.messages), "read_seq": ref.read_seq,
                "seq": log.items[n].envelope.seq}  # fmt: skip
        assert all(f == want for f in frames)
    ref = definition(log.items, user)
    if ref is not None and "c" in tracker.states:
        assert tracker.count("c") == len(ref.messages)
        assert len(tracker.states["c"].messages) <= window


def test_a_message_deleted_while_out_is_not_counted_after_the_re_add() -> None:
    for connected_while_in in (True, False):
        log = Log()
        log.append("v", ConversationCreated(title="t", participants=("v", "u")))
        log.append("v", MessageSent(message_id="m1", body="b"))
        log.append("v", MessageSent(message_id="m2", body="b"))
        hub = new_hub()
        removal = [log.append("v", ParticipantRemoved(user_id="u")), log.append("v", MessageDeleted("m1"))]
        k = 3 if connected_while_in else 4  # connects before the removal, or while out (seeded frozen)
        for item in log.items[:k]:
            hub.dispatch(item)
        session = connect(hub, log, "u", k)
        for item in log.items[k:]:
            hub.dispatch(item)
        hub.dispatch(log.append("v", ParticipantAdded(user_id="u")))
        frames = [msgspec.json.decode(f) for f in session.frames()]
        assert [f for f in frames if f["type"] == "unread"] == [
            {"type": "unread", "conversation_id": "c", "unread": 1, "read_seq": 0, "seq": 6}
        ], connected_while_in
        assert not any(f.get("event", {}).get("seq") == removal[1].envelope.seq for f in frames)
        hub.dispatch(log.append("v", MessageDeleted("m2")))
        (frame,) = map(msgspec.json.decode, session.frames()[1:])  # the event, then its unread frame
        assert frame["unread"] == 0


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
    rows: dict[int, tuple[str | None, str]] = {0: ("e", "5-0"), 1: ("e", "2-0"), 2: ("old", "9-0")}
    positions, lagging = usable_positions(rows, "e", ["4-0", "3-0", "1-0", "0-0"])
    assert positions == [(5, 0), None, None, (0, 0)] and lagging  # ahead; behind; foreign epoch; empty
    assert usable_positions({2: ("old", "9-0")}, "e", ["0-0", "1-0", "1-0"]) == ([(0, 0), None, None], False)


def test_a_connection_holds_window_ids_whatever_the_backlog() -> None:
    """10,000 unread in one conversation: the seed (as the seeder reads it) and every later message keep
    `window` ids and an exact count; a read of everything clears the older ones without a reseed."""
    rows = [("c", f"m{seq}", seq) for seq in range(10_001, 10_001 - (UNREAD_WINDOW + 1), -1)]
    tracker = UnreadTracker("u", seed_of([(0, 0)], {"c": 0}, rows, {"c": 10_000}))
    log = Log()
    memberships = UserMemberships("u")
    memberships.apply(log.append("v", ConversationCreated(title="t", participants=("v", "u"))).envelope)
    log.seqs["c"] = 10_001  # the backlog's messages
    for n in range(3):
        tracker.observe(log.append("v", MessageSent(message_id=f"new{n}", body="b")), memberships)
    state = tracker.states["c"]
    assert len(state.messages) == UNREAD_WINDOW and tracker.count("c") == 10_003
    tracker.observe(log.append("u", MessagesRead(up_to_seq=10_004)), memberships)
    assert tracker.count("c") == 0 and tracker.take_asks() == []
