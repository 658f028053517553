"""Who gets each live item, in memory and without I/O: the hub's routing tables and membership index.

Each item goes only to the subscribers of its conversation (plus those of users it names), so the cost grows
with recipients, not with connections. A conversation's deletions also reach the connections of users who
left it: they see no event, but their unread state (frozen while they are out, as in the read model) must
lose a deleted message before a re-add reports it.
"""

from __future__ import annotations

from typing import Protocol

from events.schema import MessageDeleted
from realtime_fanout.item import Item
from realtime_fanout.membership import PRIVATE_PAYLOADS, MembershipIndex, Span


class Abortable(Protocol):
    """A connection that can be ended at once, from outside its own task."""

    @property
    def user_id(self) -> str: ...

    def abort(self) -> None:
        """End this connection with 1011: its handling (or the hub's) failed; must not block or raise."""


class Subscriber(Abortable, Protocol):
    """What the hub needs of a connection: who it is, its filter, a non-blocking `offer`, and `abort`."""

    @property
    def conversations(self) -> frozenset[str] | None: ...

    def offer(self, item: Item) -> None:
        """Take one live item; must not block or await (overflow is the subscriber's business)."""


class Router:
    """The membership index and, per conversation, the local subscribers an item of it goes to."""

    def __init__(self, *, track_acts: bool = False) -> None:
        self.track_acts = track_acts  # who acted where (`engages`), for the `engaged` presence scope
        self.index = MembershipIndex()
        self._by_user: dict[str, set[Subscriber]] = {}
        self._by_conversation: dict[str, set[Subscriber]] = {}
        self._left: dict[str, set[Subscriber]] = {}  # subscribers of users who left the conversation

    def attach(self, subscriber: Subscriber) -> list[Span]:
        """Route live items to `subscriber` from now on; returns its membership seed."""
        user = subscriber.user_id
        self._by_user.setdefault(user, set()).add(subscriber)
        for cid in self.index.conversations_of(user):
            self._route(subscriber, cid, member=True, left=False)
        for cid in self.index.left_conversations_of(user):
            self._route(subscriber, cid, member=False, left=True)
        return self.index.seed_for(user)

    def detach(self, subscriber: Subscriber) -> None:
        user = subscriber.user_id
        subs = self._by_user.get(user)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self._by_user[user]
        for cid in (*self.index.conversations_of(user), *self.index.left_conversations_of(user)):
            self._route(subscriber, cid, member=False, left=False)

    def subscribers(self) -> list[Subscriber]:
        return [s for subs in self._by_user.values() for s in subs]

    def route(self, item: Item) -> set[Subscriber] | tuple[Subscriber, ...]:
        """Update the index with `item`; return every local subscriber that may see it (or, for a
        deletion, must update its unread state)."""
        cid = item.conversation_id
        env = item.envelope
        if self.track_acts and not isinstance(env.payload, PRIVATE_PAYLOADS):
            self.index.note_act(cid, env.actor, env.seq)
        named = item.named_users()
        if named:
            self.index.apply(env)
            targets = set(self._by_conversation.get(cid, ()))
            for user in named:
                member, left = user in self.index.members.get(cid, ()), self.index.has_left(user, cid)
                for sub in self._by_user.get(user, ()):
                    targets.add(sub)
                    self._route(sub, cid, member=member, left=left)
            return targets
        members = tuple(self._by_conversation.get(cid, ()))
        out = self._left.get(cid)
        if out and type(env.payload) is MessageDeleted:
            return members + tuple(out)
        return members

    def _route(self, sub: Subscriber, cid: str, *, member: bool, left: bool) -> None:
        """File `sub` under `cid` as a member's connection, a connection of one who left, or neither."""
        wanted = sub.conversations is None or cid in sub.conversations
        for table, present in ((self._by_conversation, member and wanted), (self._left, left and wanted)):
            if present:
                table.setdefault(cid, set()).add(sub)
            elif (subs := table.get(cid)) is not None:
                subs.discard(sub)
                if not subs:
                    del table[cid]
