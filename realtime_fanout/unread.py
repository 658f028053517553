"""Live unread counts and read receipts for one user, sans I/O: folded from the events after a seed.

unread(u, c) is the read model's: messages of c by someone else, not deleted, with seq > u's read marker,
sent while u was a participant. The tracker keeps, per conversation, u's read marker, the ids of the newest
`window` unread messages (id -> seq, so deletes and reads of them stay exact) and how many older ones
there are (`older`, none above `older_top`): a connection's memory is bounded per conversation, not by its
user's unread backlog. A read below `older_top` or a delete of an id it does not hold, while older ones
exist, cannot be decided from that: the conversation turns uncertain, its frames stop, its items are kept
(`max_pending`), and the tracker asks its I/O layer for a fresh seed (`asks`, which the connection looks
at when it flushes: no callback, so no reference back to the connection); `reseeded` installs
the read model's state and folds the kept items after the seed's position. It is seeded from a read-model
snapshot taken at known log positions (one per partition) and folds only events after them; a partition
without a seed position gets no unread frames. While the user is out of a conversation its state is
frozen, as the read model's row, except that deletions still reach the connection (the hub routes them)
and drop their messages silently; being added back reports the count. Read receipts need no state and
are always produced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from events.membership import joins
from events.schema import MessageDeleted, MessageSent, MessagesRead
from realtime_fanout.cursor import StreamKey
from realtime_fanout.frames import ReadFrame, UnreadFrame, encode_frame
from realtime_fanout.item import Item
from realtime_fanout.membership import UserMemberships

UNREAD_WINDOW = 64
"""Unread message ids a connection holds per conversation (PARLEY_FANOUT_UNREAD_WINDOW's default)."""
MAX_PENDING = 256
"""Items of an uncertain conversation kept until its seed comes; past it, the conversation is dropped."""


@dataclass(slots=True)
class ConversationUnread:
    """The user's read marker in one conversation, the newest unread messages after it (id -> seq, in
    ascending seq), and the count of older unread ones (each at or below `older_top`)."""

    read_seq: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    older: int = 0
    older_top: int = 0

    @property
    def count(self) -> int:
        return len(self.messages) + self.older


@dataclass(slots=True)
class UnreadSeed:
    """A read-model snapshot: per partition the log position it reflects (None: not usable), per
    conversation the user's state at that position (every conversation the user ever joined)."""

    positions: list[StreamKey | None]
    conversations: dict[str, ConversationUnread] = field(default_factory=dict)
    lagging: bool = False  # some partition's read model was behind the hub (see unreadseed)

    @classmethod
    def none(cls, partitions: int) -> UnreadSeed:
        return cls([None] * partitions)


@dataclass(slots=True)
class _Uncertain:
    """An uncertain conversation: the event its state could not fold (at `after`, seq `seq`) and the
    conversation's items observed since."""

    partition: int
    after: StreamKey
    seq: int
    items: list[Item] = field(default_factory=list)


class _Unknowable(Exception):
    """The bounded state cannot tell the effect of an event: the conversation needs a fresh seed."""


class UnreadTracker:
    """Feed every item of the user's conversations once or more, in log order per partition (`observe`);
    it returns the notification frames the item causes, each exactly once."""

    def __init__(
        self,
        user_id: str,
        seed: UnreadSeed,
        window: int = UNREAD_WINDOW,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.user_id = user_id
        self.positions = list(seed.positions)
        self.window = max(1, window)
        self.max_pending = max_pending
        self.states = {cid: self._bound(state) for cid, state in seed.conversations.items()}
        self.uncertain: dict[str, _Uncertain] = {}
        self.asks: list[str] = []  # uncertain conversations whose seed is not yet asked for (`take_asks`)
        self.skips: dict[str, StreamKey] = {}  # a reseed ahead of the items: theirs up to here are in it
        self.forgotten: set[str] = set()  # no seed could serve them: no frames on this connection

    def count(self, conversation_id: str) -> int | None:
        """The current unread count, or None when the conversation is not tracked (or uncertain)."""
        state = self.states.get(conversation_id)
        return None if state is None or conversation_id in self.uncertain else state.count

    def observe(self, item: Item, memberships: UserMemberships) -> list[bytes]:
        """The `unread` frame `item` causes (if any); `memberships` must already include `item`."""
        position = self.positions[item.partition]
        if position is None or item.key <= position:
            return []
        self.positions[item.partition] = item.key
        cid = item.envelope.conversation_id
        if self.skips:
            skip = self.skips.get(cid)
            if skip is not None:
                if item.key > skip:
                    del self.skips[cid]
                elif self.user_id in joins(item.envelope) and cid in self.states:
                    return [self._frame(cid, item.envelope.seq)]  # in the seed; being added still reports it
                else:
                    return []
        pending = self.uncertain.get(cid)
        if pending is not None:
            pending.items.append(item)
            if len(pending.items) > self.max_pending:
                self._forget(cid)
            return []
        try:
            changed = self._apply(item, memberships)
        except _Unknowable:
            self._doubt(cid, item, [])
            return []
        return [self._frame(cid, item.envelope.seq)] if changed else []

    def take_asks(self) -> list[str]:
        """The uncertain conversations to ask a seed for now (each once; `reseeded` answers them)."""
        asks, self.asks = self.asks, []
        return asks

    def reseeded(self, conversation_id: str, seed: UnreadSeed, memberships: UserMemberships) -> list[bytes]:
        """Install `seed`'s state of an uncertain conversation and fold the items kept after its position;
        the frame of the result when the user is in the conversation. A seed that cannot serve the
        conversation's partition, or is older than the event that made it uncertain, drops the
        conversation: no more unread frames for it on this connection."""
        pending = self.uncertain.pop(conversation_id, None)
        if pending is None:
            return []
        at = seed.positions[pending.partition]
        if at is None or at < pending.after:
            self._forget(conversation_id)
            return []
        state = seed.conversations.get(conversation_id)
        if state is None:
            self.states.pop(conversation_id, None)
        else:
            self.states[conversation_id] = self._bound(state)
        seq = pending.seq
        for n, item in enumerate(pending.items):
            if item.key <= at:
                seq = max(seq, item.envelope.seq)
                continue
            try:
                self._apply(item, memberships)
            except _Unknowable:
                self._doubt(conversation_id, item, pending.items[n + 1 :])
                return []
            seq = item.envelope.seq
        current = self.positions[pending.partition]
        if current is not None and at > current:
            self.skips[conversation_id] = at
        if conversation_id not in self.states or not memberships.is_member(conversation_id):
            return []
        return [self._frame(conversation_id, seq)]

    def give_up(self, conversation_ids: Iterable[str]) -> None:
        """No seed will come for these: no more unread frames for them on this connection."""
        for cid in conversation_ids:
            self._forget(cid)

    def _doubt(self, cid: str, item: Item, later: list[Item]) -> None:
        self.uncertain[cid] = _Uncertain(item.partition, item.key, item.envelope.seq, later)
        self.asks.append(cid)

    def _forget(self, cid: str) -> None:
        self.uncertain.pop(cid, None)
        self.states.pop(cid, None)
        self.skips.pop(cid, None)
        if cid in self.asks:
            self.asks.remove(cid)
        self.forgotten.add(cid)

    def _frame(self, cid: str, seq: int) -> bytes:
        state = self.states[cid]
        return encode_frame(UnreadFrame(cid, state.count, state.read_seq, seq))

    def _bound(self, state: ConversationUnread) -> ConversationUnread:
        """Keep the newest `window` ids (the dict is in ascending seq); the older ones become a count."""
        while len(state.messages) > self.window:
            oldest = next(iter(state.messages))
            state.older_top = max(state.older_top, state.messages.pop(oldest))
            state.older += 1
        return state

    def _apply(self, item: Item, memberships: UserMemberships) -> bool:
        """Fold `item` into its conversation's state; whether the user is told (a frame). Raises
        _Unknowable when the bounded state cannot tell the item's effect."""
        env, payload = item.envelope, item.envelope.payload
        cid = env.conversation_id
        state = self.states.get(cid)
        if self.user_id in joins(env):
            if cid in self.forgotten:
                return False
            self.states.setdefault(cid, ConversationUnread())  # a re-add keeps the frozen state
        elif state is None:
            return False
        elif isinstance(payload, MessageSent):
            if (
                env.actor == self.user_id
                or env.seq <= state.read_seq
                or not memberships.can_see(cid, env.seq)
            ):
                return False
            state.messages[payload.message_id] = env.seq
            self._bound(state)
        elif isinstance(payload, MessageDeleted):
            if state.messages.pop(payload.message_id, None) is None:
                if state.older:
                    raise _Unknowable  # one of the older unread ones, or a message that is not unread
                return False
            if not memberships.can_see(cid, env.seq):
                return False  # the user is out: their re-add will report the count
        elif isinstance(payload, MessagesRead) and env.actor == self.user_id:
            up_to = payload.up_to_seq
            if state.older and state.read_seq < up_to < state.older_top:
                raise _Unknowable  # reads some of the older ones, but which is not known
            state.read_seq = max(state.read_seq, up_to)
            state.messages = {m: s for m, s in state.messages.items() if s > state.read_seq}
            if state.older_top <= state.read_seq:
                state.older = state.older_top = 0
        else:
            return False
        return True


def receipt(item: Item) -> list[bytes]:
    """The `read` frame of a MessagesRead event (sent to whoever may see the event), else nothing."""
    payload = item.envelope.payload
    if not isinstance(payload, MessagesRead):
        return []
    env = item.envelope
    return [encode_frame(ReadFrame(env.conversation_id, env.actor, payload.up_to_seq, env.seq))]


def seed_of(
    positions: list[StreamKey | None],
    read_seqs: dict[str, int],
    unread: Iterable[tuple[str, str, int]],
    totals: dict[str, int] | None = None,
) -> UnreadSeed:
    """A seed from read-model rows: the user's read marker per conversation, (conversation, message, seq)
    for the newest unread messages at `positions` (all of them, or the newest of each conversation), and
    per conversation how many are unread in all (`totals`; None: the rows are all of them). The ones not
    among the rows are older than every row: their count, and a bound on their seq, are kept."""
    states = {cid: ConversationUnread(read_seq) for cid, read_seq in read_seqs.items()}
    for cid, message_id, seq in sorted(unread, key=lambda row: (row[0], row[2])):
        state = states.get(cid)
        if state is not None and seq > state.read_seq:
            state.messages[message_id] = seq
    for cid, total in (totals or {}).items():
        state = states.get(cid)
        if state is not None and total > len(state.messages):
            state.older = total - len(state.messages)
            state.older_top = min(state.messages.values(), default=1 << 62) - 1  # none: any read doubts
    return UnreadSeed(positions, states)
