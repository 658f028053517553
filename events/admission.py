"""Which decodable log entries are events of their conversation: the one check every reader applies. No I/O.

Decoding (`events.codec`) refuses what no reader can store (malformed JSON, a NUL in text, a seq outside
bigint). `refusal` then checks an event against what its conversation holds so far: it exists (or, for a
creation, does not), the seq is after the last one, a new message's id is unused, an edited or deleted
message is live, whoever marks it read was a participant, whoever archives it is one, an added user is
not one and a removed user is. The projector's fold refuses exactly these (its entry becomes a dead
letter); the fanout's hub applies the same function to every entry it reads, through a `Ledger`, and
never delivers a refused one.

The log trusts its writer: an entry appended by anyone with XADD rights at the conversation's next seq is
indistinguishable from the command API's, so both readers keep the first and refuse the later one with
the same seq (only Redis ACLs keep forgers out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from events import schema
from events.membership import joins
from events.schema import Envelope


class MessageFact(Enum):
    """What a reader knows of a message id in one conversation."""

    ABSENT = "absent"  # never sent
    LIVE = "live"
    DELETED = "deleted"
    FORGOTTEN = "forgotten"  # the reader keeps a bounded window and no longer knows: it trusts the entry


class ConversationFacts(Protocol):
    """What `refusal` needs to know of a conversation, as each reader keeps it."""

    @property
    def last_seq(self) -> int: ...

    def is_member(self, user_id: str) -> bool: ...

    def was_member(self, user_id: str) -> bool:
        """True when the user ever was a participant (they have a read marker)."""

    def message_fact(self, message_id: str) -> MessageFact: ...


def refusal(facts: ConversationFacts | None, event: Envelope, *, in_order: bool = True) -> str | None:
    """Why `event` is not an event of its conversation, whose state is `facts` (None: unknown), or None.

    `in_order=False` (re-driving a dead letter) accepts a seq at or before the conversation's last.
    """
    payload = event.payload
    kind = type(payload)
    if facts is None:
        if kind is schema.ConversationCreated:
            return None
        return f"{event.type} for unknown conversation {event.conversation_id}"
    if in_order and event.seq <= facts.last_seq:
        if kind is schema.ConversationCreated:
            return f"conversation {event.conversation_id} already exists"
        return f"seq {event.seq} is not after the conversation's last seq {facts.last_seq}"
    if kind is schema.MessageSent:  # the common case first
        if facts.message_fact(payload.message_id) in _USED:  # type: ignore[union-attr]
            return f"message {payload.message_id} already exists"  # type: ignore[union-attr]
        return None
    if kind is schema.MessageEdited or kind is schema.MessageDeleted:
        mid = payload.message_id  # type: ignore[union-attr]
        fact = facts.message_fact(mid)
        if fact is MessageFact.ABSENT:
            return f"unknown message {mid}"
        return f"message {mid} is deleted" if fact is MessageFact.DELETED else None
    cid = event.conversation_id
    if kind is schema.MessagesRead:
        return None if facts.was_member(event.actor) else f"{event.actor} was never a participant of {cid}"
    if kind is schema.ConversationArchived or kind is schema.ConversationUnarchived:
        return None if facts.is_member(event.actor) else f"{event.actor} is not a participant of {cid}"
    if kind is schema.ParticipantAdded:
        user = payload.user_id  # type: ignore[union-attr]
        return f"{user} is already a participant" if facts.is_member(user) else None
    if kind is schema.ParticipantRemoved:
        user = payload.user_id  # type: ignore[union-attr]
        return None if facts.is_member(user) else f"{user} is not a participant"
    if kind is schema.ConversationCreated:
        return f"conversation {cid} already exists"
    return f"no rule for event type {event.type}"


_USED = (MessageFact.LIVE, MessageFact.DELETED)

MESSAGE_WINDOW = 4096
MAX_MESSAGES = 250_000


@dataclass(slots=True)
class _Conversation:
    last_seq: int
    members: set[str] = field(default_factory=set)
    ever: set[str] = field(default_factory=set)
    messages: dict[str, bool] = field(default_factory=dict)  # id -> deleted, the latest `window` ids
    complete: bool = True  # every message since the creation is in `messages`
    window: int = MESSAGE_WINDOW

    def is_member(self, user_id: str) -> bool:
        return user_id in self.members

    def was_member(self, user_id: str) -> bool:
        return user_id in self.ever

    def message_fact(self, message_id: str) -> MessageFact:
        deleted = self.messages.get(message_id)
        if deleted is None:
            return MessageFact.ABSENT if self.complete else MessageFact.FORGOTTEN
        return MessageFact.DELETED if deleted else MessageFact.LIVE

    def note(self, event: Envelope) -> None:
        payload = event.payload
        self.last_seq = max(self.last_seq, event.seq)
        kind = type(payload)
        if kind is schema.MessageSent:
            self.messages[payload.message_id] = False  # type: ignore[union-attr]
            if len(self.messages) > self.window:
                del self.messages[next(iter(self.messages))]
                self.complete = False
        elif kind is schema.MessageDeleted and payload.message_id in self.messages:  # type: ignore[union-attr]
            self.messages[payload.message_id] = True  # type: ignore[union-attr]
        elif kind is schema.ParticipantRemoved:
            self.members.discard(payload.user_id)  # type: ignore[union-attr]
        else:
            users = joins(event)
            self.members.update(users)
            self.ever.update(users)


class Ledger:
    """Per conversation, what `refusal` needs, for a reader without the read models (the fanout).

    Per conversation it holds the last seq and the current and past participants, and message ids within
    two bounds: the latest `window` of each conversation, and `max_messages` in all (the conversations
    least recently written to lose theirs first). An id beyond them is `FORGOTTEN`, so a reused or unknown
    old id is admitted (the projector, which has every message in Postgres, still refuses it). A
    conversation first learnt from an archive summary (`learn_conversation`) has no message ids at all.
    """

    def __init__(self, window: int = MESSAGE_WINDOW, max_messages: int = MAX_MESSAGES) -> None:
        self.window = window
        self.max_messages = max_messages
        self._conversations: dict[str, _Conversation] = {}
        self._by_activity: dict[str, None] = {}  # conversations holding message ids, least recent first
        self._held = 0

    def admit(self, event: Envelope) -> str | None:
        """Check `event` (`refusal`) and, when it is admitted, learn it; returns the refusal or None."""
        conv = self._conversations.get(event.conversation_id)
        reason = refusal(conv, event)
        if reason is None:
            if conv is None:
                conv = self._conversations[event.conversation_id] = _Conversation(0, window=self.window)
            self._note(conv, event)
        return reason

    def learn(self, event: Envelope) -> None:
        """Learn an event another reader admitted (e.g. archived and not a dead letter), unchecked."""
        conv = self._conversations.get(event.conversation_id)
        if conv is None:
            conv = self._conversations[event.conversation_id] = _Conversation(0, window=self.window)
            conv.complete = type(event.payload) is schema.ConversationCreated
        self._note(conv, event)

    def learn_conversation(self, conversation_id: str, last_seq: int) -> None:
        """Learn that the conversation exists up to `last_seq`, without its messages (they are forgotten)."""
        conv = self._conversations.get(conversation_id)
        if conv is None:
            conv = self._conversations[conversation_id] = _Conversation(last_seq, window=self.window)
        conv.last_seq = max(conv.last_seq, last_seq)
        conv.complete = False

    def last_seq(self, conversation_id: str) -> int | None:
        conv = self._conversations.get(conversation_id)
        return None if conv is None else conv.last_seq

    @property
    def messages_held(self) -> int:
        return self._held

    def _note(self, conv: _Conversation, event: Envelope) -> None:
        if type(event.payload) is not schema.MessageSent:
            conv.note(event)
            return
        before = len(conv.messages)
        conv.note(event)
        self._held += len(conv.messages) - before
        cid = event.conversation_id
        self._by_activity.pop(cid, None)
        self._by_activity[cid] = None
        while self._held > self.max_messages:
            oldest = next(iter(self._by_activity))
            del self._by_activity[oldest]
            dropped = self._conversations[oldest]
            self._held -= len(dropped.messages)
            dropped.messages = {}
            dropped.complete = False
