"""The sans-I/O session: splice of replay and live, per-event authorization, cursors and frames."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.codec import encode
from events.log import LogEntry
from events.schema import (
    AnyPayload,
    ConversationCreated,
    Envelope,
    MessageSent,
    ParticipantAdded,
    ParticipantRemoved,
)
from realtime_fanout.cursor import Cursor
from realtime_fanout.exceptions import ForeignEpoch, MalformedCursor
from realtime_fanout.frames import EventFrame, EventsFrame, LiveFrame, decode_server_frame
from realtime_fanout.item import IndexedItems, Item, decode_entry
from realtime_fanout.membership import MembershipIndex, Span
from realtime_fanout.session import Session

EPOCH = "e1"
NOW = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass
class FakeLog:
    """An in-memory log with Redis-like ids, built through valid membership transitions."""

    partitions: int
    conversation_partition: dict[str, int] = field(default_factory=dict)
    items: list[list[Item]] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.items = [[] for _ in range(self.partitions)]

    def append(self, cid: str, actor: str, payload: AnyPayload) -> Item:
        partition = self.conversation_partition.setdefault(
            cid, len(self.conversation_partition) % self.partitions
        )
        seq = self.seqs.get(cid, 0) + 1
        self.seqs[cid] = seq
        envelope = Envelope(
            seq=seq, event_id=uuid.uuid4().hex, schema_version=type(payload).VERSION, occurred_at=NOW,
            actor=actor, conversation_id=cid, correlation_id="", payload=payload,
        )  # fmt: skip
        n = len(self.items[partition])
        entry = LogEntry(partition, f"{1000 + n // 3}-{n % 3}", encode(envelope))
        item = decode_entry(entry)
        assert item is not None
        self.items[partition].append(item)
        return item

    def create(self, cid: str, creator: str, *others: str) -> Item:
        participants = tuple(dict.fromkeys([creator, *others]))
        self.members[cid] = set(participants)
        return self.append(cid, creator, ConversationCreated(title="t", participants=participants))

    def add(self, cid: str, user: str) -> Item:
        self.members[cid].add(user)
        return self.append(cid, "owner", ParticipantAdded(user_id=user))

    def remove(self, cid: str, user: str) -> Item:
        self.members[cid].discard(user)
        return self.append(cid, "owner", ParticipantRemoved(user_id=user))

    def send(self, cid: str, body: str = "hi") -> Item:
        return self.append(cid, "owner", MessageSent(message_id=uuid.uuid4().hex[:8], body=body))

    def position(self, counts: list[int]) -> Cursor:
        """The cursor after the first counts[p] items of each partition."""
        ids = [self.items[p][k - 1].stream_id if k else "0-0" for p, k in enumerate(counts)]
        return Cursor(EPOCH, ids)

    def seed(self, user: str, counts: list[int]) -> list[Span]:
        index = MembershipIndex()
        for p, k in enumerate(counts):
            for item in self.items[p][:k]:
                index.apply(item.envelope)
        return index.seed_for(user)


def expected_visible(log: FakeLog, user: str, after: list[int], only: set[str] | None = None) -> list[str]:
    """Reference model: event ids the user may see after the cursor, in log order per partition."""
    out: list[str] = []
    for p, items in enumerate(log.items):
        member: dict[str, bool] = {}
        for k, item in enumerate(items):
            env, payload = item.envelope, item.envelope.payload
            was = member.get(env.conversation_id, False)
            now = was
            if isinstance(payload, ConversationCreated):
                now = user in payload.participants
            elif isinstance(payload, ParticipantAdded) and payload.user_id == user:
                now = True
            elif isinstance(payload, ParticipantRemoved) and payload.user_id == user:
                now = False
            member[env.conversation_id] = now
            allowed = only is None or env.conversation_id in only
            if k >= after[p] and (was or now) and allowed:
                out.append(env.event_id)
    return out


def delivered(frames: list[bytes]) -> tuple[list[str], list[str]]:
    """(event ids in order, cursors seen) from encoded frames."""
    ids: list[str] = []
    cursors: list[str] = []
    for data in frames:
        frame = decode_server_frame(data)
        if isinstance(frame, EventFrame):
            ids.append(msgspec.json.decode(frame.event)["event_id"])
            cursors.append(frame.cursor)
        elif isinstance(frame, EventsFrame):
            ids.extend(msgspec.json.decode(e)["event_id"] for e in frame.events)
            cursors.append(frame.cursor)
        elif isinstance(frame, LiveFrame):
            cursors.append(frame.cursor)
    return ids, cursors


def per_partition(log: FakeLog, ids: list[str]) -> list[list[str]]:
    where = {i.envelope.event_id: p for p, items in enumerate(log.items) for i in items}
    out: list[list[str]] = [[] for _ in range(log.partitions)]
    for event_id in ids:
        out[where[event_id]].append(event_id)
    return out


def small_log() -> FakeLog:
    log = FakeLog(partitions=1)
    log.create("c1", "bob")  # 1: alice not yet in
    log.send("c1")  # 2
    log.add("c1", "alice")  # 3: alice sees from here
    log.send("c1")  # 4
    log.remove("c1", "alice")  # 5: ... up to and including here
    log.send("c1")  # 6
    log.create("c2", "alice", "bob")  # 7
    log.send("c2")  # 8
    return log


def test_membership_boundaries_are_inclusive() -> None:
    log = small_log()
    session = Session("alice", log.position([0]))
    session.feed_replay(log.items[0])
    session.replay_done()
    ids, _ = delivered(session.frames())
    want = [log.items[0][k].envelope.event_id for k in (2, 3, 4, 6, 7)]
    assert ids == want


def test_outsider_sees_nothing_and_filter_narrows() -> None:
    log = small_log()
    outsider = Session("mallory", log.position([0]))
    outsider.feed_replay(log.items[0])
    outsider.replay_done()
    assert delivered(outsider.frames())[0] == []
    narrowed = Session("alice", log.position([0]), conversations=["c2"])
    narrowed.feed_replay(log.items[0])
    narrowed.replay_done()
    assert delivered(narrowed.frames())[0] == [log.items[0][k].envelope.event_id for k in (6, 7)]


def test_live_is_buffered_during_replay_and_overlap_is_dropped() -> None:
    log = small_log()
    session = Session("bob", log.position([2]), seed=log.seed("bob", [2]))
    for item in log.items[0][5:]:
        session.feed_live(item)  # the hub attached at item 5
    assert session.frames() == []  # nothing leaves before replay is done
    session.feed_replay(log.items[0][2:7])  # replay overshoots into the live buffer
    session.replay_done()
    ids, cursors = delivered(session.frames())
    assert ids == [i.envelope.event_id for i in log.items[0][2:]]
    assert Cursor.decode(cursors[-1], epoch=EPOCH, partitions=1).positions == [log.items[0][-1].stream_id]


def test_live_names_where_history_ended_before_what_was_buffered() -> None:
    """A subscription without a cursor learns its start from `live` before any event; an item the hub
    read between the attach and the end of history follows `live`."""
    log = small_log()
    start = log.position([4]).encode()
    session = Session("alice", log.position([4]), seed=log.seed("alice", [4]))
    for item in log.items[0][4:]:
        session.feed_live(item)
    session.replay_done()
    frames = session.frames()
    first = decode_server_frame(frames[0])
    assert isinstance(first, LiveFrame) and first.cursor == start
    ids, _ = delivered(frames[1:])
    assert ids == [log.items[0][k].envelope.event_id for k in (4, 6, 7)]


def test_batches_carry_the_cursor_after_their_last_event() -> None:
    log = FakeLog(partitions=1)
    log.create("c", "bob")
    for n in range(9):
        log.send("c", str(n))
    session = Session("bob", log.position([0]), max_batch=4)
    session.feed_replay(log.items[0])
    session.replay_done()
    frames = [decode_server_frame(f) for f in session.frames()]
    assert [type(f).__name__ for f in frames] == ["EventsFrame", "EventsFrame", "EventsFrame", "LiveFrame"]
    sizes = [len(f.events) for f in frames if isinstance(f, EventsFrame)]
    assert sizes == [4, 4, 2]
    for f, last in zip(frames, (3, 7, 9), strict=False):
        assert isinstance(f, EventsFrame)
        assert Cursor.decode(f.cursor, epoch=EPOCH, partitions=1).positions == [log.items[0][last].stream_id]
    session.feed_live(log.send("c", "live"))
    (single,) = (decode_server_frame(f) for f in session.frames())
    assert isinstance(single, EventFrame)
    assert session.pending_bytes == 0


def test_cursor_round_trip_and_refusals() -> None:
    cursor = Cursor(EPOCH, ["1-0", "0-0"])
    assert Cursor.decode(cursor.encode(), epoch=EPOCH, partitions=2).positions == ["1-0", "0-0"]
    for bad in ("", "!!!", "bm90IGpzb24", Cursor(EPOCH, ["1-0"]).encode()[:-3], "x" * 5000):
        with pytest.raises(MalformedCursor):
            Cursor.decode(bad, epoch=EPOCH, partitions=2)
    with pytest.raises(ForeignEpoch):
        Cursor.decode(cursor.encode(), epoch="other", partitions=2)
    with pytest.raises(ForeignEpoch):
        Cursor.decode(cursor.encode(), epoch=EPOCH, partitions=3)


USERS = ("u", "v")
CONVERSATIONS = ("c0", "c1", "c2", "c3")


@st.composite
def logs(draw: st.DrawFn) -> FakeLog:
    log = FakeLog(partitions=2)
    for _ in range(draw(st.integers(1, 40))):
        cid = draw(st.sampled_from(CONVERSATIONS))
        if cid not in log.members:
            log.create(cid, "owner", *draw(st.lists(st.sampled_from(USERS), unique=True)))
            continue
        user = draw(st.sampled_from(USERS))
        action = draw(st.sampled_from(("toggle", "send", "send")))
        if action == "send":
            log.send(cid)
        elif user in log.members[cid]:
            log.remove(cid, user)
        else:
            log.add(cid, user)
    return log


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.large_base_example, HealthCheck.too_slow],
)
@given(data=st.data(), log=logs())
def test_any_splice_delivers_exactly_the_visible_events_after_the_cursor(
    data: st.DataObject, log: FakeLog
) -> None:
    sizes = [len(items) for items in log.items]
    after = [data.draw(st.integers(0, n), label=f"cursor p{p}") for p, n in enumerate(sizes)]
    live_from = [data.draw(st.integers(0, n), label=f"hub p{p}") for p, n in enumerate(sizes)]
    replay_to = [
        data.draw(st.integers(max(after[p], live_from[p]), n), label=f"replay p{p}")
        for p, n in enumerate(sizes)
    ]
    only = data.draw(st.none() | st.sets(st.sampled_from(CONVERSATIONS), min_size=1), label="filter")
    indexed = data.draw(st.booleans(), label="indexed pages")  # a history page's index: the same frames
    session = Session(
        "u", log.position(after), conversations=only, seed=log.seed("u", live_from),
        max_batch=data.draw(st.integers(1, 5), label="batch"),
    )  # fmt: skip
    plan = session.replay_plan([log.position(live_from).positions[p] for p in range(2)])
    replay_from = [min(after[p], live_from[p]) for p in range(2)]
    assert plan == {
        p: log.position(replay_from).positions[p]
        for p in range(2)
        if after[p] < live_from[p] or after[p] > live_from[p]
    }
    replay = [list(log.items[p][replay_from[p] : replay_to[p]]) for p in range(2)]
    live = [list(log.items[p][live_from[p] :]) for p in range(2)]
    frames: list[bytes] = []
    done = False
    while any(replay) or any(live) or not done:
        choices = [] if done or any(replay) else ["done"]
        choices += [f"replay{p}" for p in range(2) if replay[p] and not done]
        choices += [f"live{p}" for p in range(2) if live[p]] + ["drain"]
        step = data.draw(st.sampled_from(choices))
        if step == "drain":
            frames += session.frames()
        elif step == "done":
            session.replay_done()
            done = True
        else:
            p = int(step[-1])
            source = replay if step.startswith("replay") else live
            n = len(source[p]) - data.draw(st.integers(0, len(source[p]) - 1))
            chunk, source[p] = source[p][:n], source[p][n:]
            if source is replay:
                session.feed_replay(IndexedItems(chunk) if indexed else chunk)
            else:
                for item in chunk:
                    session.feed_live(item)
    frames += session.frames()
    ids, cursors = delivered(frames)
    want = expected_visible(log, "u", after, only)
    assert sorted(ids) == sorted(want)
    assert per_partition(log, ids) == per_partition(log, want)
    last = Cursor.decode(cursors[-1], epoch=EPOCH, partitions=2)
    keys = {i.envelope.event_id: i for items in log.items for i in items}
    assert all(last.covers(keys[i].partition, keys[i].key) for i in ids)
