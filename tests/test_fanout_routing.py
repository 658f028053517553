"""The hub's routing (`realtime_fanout/routing.py`), without a hub or Redis: which local subscribers each
live item is offered to, through joins, leaves, deletions and conversation filters."""

from __future__ import annotations

from dataclasses import dataclass

from events.schema import (
    ConversationCreated,
    MessageDeleted,
    MessageSent,
    ParticipantAdded,
    ParticipantRemoved,
)
from realtime_fanout.item import Item
from realtime_fanout.routing import Router
from tests.test_fanout_session import FakeLog


@dataclass(eq=False)
class Sub:
    user_id: str
    conversations: frozenset[str] | None = None

    def offer(self, item: Item) -> None: ...

    def abort(self) -> None: ...


def test_items_go_to_members_named_users_and_deletions_to_those_who_left() -> None:
    router, log = Router(), FakeLog(1)
    ann, bob, cat, ann_elsewhere = Sub("ann"), Sub("bob"), Sub("cat"), Sub("ann", frozenset({"d"}))

    def route(actor: str, payload: object, cid: str = "c") -> set[Sub]:
        return set(router.route(log.append(cid, actor, payload)))  # type: ignore[arg-type]

    for sub in (ann, bob, cat, ann_elsewhere):
        assert router.attach(sub) == []  # nothing indexed yet: an empty seed
    created = route("ann", ConversationCreated(title="t", participants=("ann", "bob")))
    assert created == {ann, bob, ann_elsewhere}  # every connection of a named user (the session filters)
    assert route("bob", MessageSent("m1", "hi")) == {ann, bob}
    assert route("ann", ParticipantAdded("cat")) == {ann, bob, cat}
    assert route("ann", ParticipantRemoved("bob")) == {ann, bob, cat}  # bob learns he is out
    assert route("cat", MessageSent("m2", "hi")) == {ann, cat}
    assert route("bob", MessageDeleted("m1")) == {ann, cat, bob}  # bob's unread state must lose m1
    assert route("ann", ConversationCreated(title="d", participants=("ann",)), "d") == {ann, ann_elsewhere}
    assert route("ann", MessageSent("m3", "hi"), "d") == {ann, ann_elsewhere}
    router.detach(ann)
    assert route("cat", MessageSent("m4", "hi")) == {cat}
    assert set(router.subscribers()) == {bob, cat, ann_elsewhere}
    late = Sub("bob")
    assert [s.conversation_id for s in router.attach(late)] == ["c"]  # the seed: bob's span in c
    assert route("cat", MessageSent("m5", "hi")) == {cat}  # bob is out: only a deletion reaches him
    assert route("cat", MessageDeleted("m5")) == {cat, bob, late}
