"""Live unread counts and read receipts for one user, sans I/O: folded from the events after a seed.

unread(u, c) is the read model's: messages of c by someone else, not deleted, with seq > u's read marker,
sent while u was a participant. The tracker keeps, per conversation, u's read marker and the unread
messages (id -> seq), so deletes and reads stay exact. It is seeded from a read-model snapshot taken at
known log positions (one per partition) and folds only events after them; a partition without a seed
position gets no unread frames. While the user is out of a conversation its state is frozen, as the read
model's row, except that deletions still reach the connection (the hub routes them) and drop their
messages silently; being added back reports the count. Read receipts need no state and are always
produced.
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


@dataclass(slots=True)
class ConversationUnread:
    """The user's read marker in one conversation and the unread messages after it (id -> seq)."""

    read_seq: int = 0
    messages: dict[str, int] = field(default_factory=dict)


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


class UnreadTracker:
    """Feed every item of the user's conversations once or more, in log order per partition (`observe`);
    it returns the notification frames the item causes, each exactly once."""

    def __init__(self, user_id: str, seed: UnreadSeed) -> None:
        self.user_id = user_id
        self.positions = list(seed.positions)
        self.states = dict(seed.conversations)

    def count(self, conversation_id: str) -> int | None:
        """The current unread count, or None when the conversation is not tracked."""
        state = self.states.get(conversation_id)
        return None if state is None else len(state.messages)

    def observe(self, item: Item, memberships: UserMemberships) -> list[bytes]:
        """The `unread` frame `item` causes (if any); `memberships` must already include `item`."""
        position = self.positions[item.partition]
        if position is None or item.key <= position:
            return []
        self.positions[item.partition] = item.key
        env, payload = item.envelope, item.envelope.payload
        cid = env.conversation_id
        state = self.states.get(cid)
        if self.user_id in joins(env):
            state = self.states.setdefault(cid, ConversationUnread())  # a re-add keeps the frozen state
        elif state is None:
            return []
        elif isinstance(payload, MessageSent):
            if (
                env.actor == self.user_id
                or env.seq <= state.read_seq
                or not memberships.can_see(cid, env.seq)
            ):
                return []
            state.messages[payload.message_id] = env.seq
        elif isinstance(payload, MessageDeleted):
            if state.messages.pop(payload.message_id, None) is None or not memberships.can_see(cid, env.seq):
                return []  # nothing changed, or the user is out: their re-add will report the count
        elif isinstance(payload, MessagesRead) and env.actor == self.user_id:
            state.read_seq = max(state.read_seq, payload.up_to_seq)
            state.messages = {m: s for m, s in state.messages.items() if s > state.read_seq}
        else:
            return []
        return [encode_frame(UnreadFrame(cid, len(state.messages), state.read_seq, env.seq))]


def receipt(item: Item) -> list[bytes]:
    """The `read` frame of a MessagesRead event (sent to whoever may see the event), else nothing."""
    payload = item.envelope.payload
    if not isinstance(payload, MessagesRead):
        return []
    env = item.envelope
    return [encode_frame(ReadFrame(env.conversation_id, env.actor, payload.up_to_seq, env.seq))]


def seed_of(
    positions: list[StreamKey | None], read_seqs: dict[str, int], unread: Iterable[tuple[str, str, int]]
) -> UnreadSeed:
    """A seed from read-model rows: the user's read marker per conversation and (conversation, message,
    seq) for each message unread at `positions`."""
    states = {cid: ConversationUnread(read_seq) for cid, read_seq in read_seqs.items()}
    for cid, message_id, seq in unread:
        state = states.get(cid)
        if state is not None and seq > state.read_seq:
            state.messages[message_id] = seq
    return UnreadSeed(positions, states)
