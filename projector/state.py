"""Read-model rows as records, one type per table, the fold's working state, and what a batch touched.

A record's fields are its table's columns in order, then two bookkeeping flags: `dirty` (touched since
the last `Changes.drain`) and `stored` (the row exists in Postgres, so writing it is an update, not an
insert). Records hold only scalars, so they stay out of the cyclic garbage collector (`gc=False`).
Equality is field-wise, so a whole read model (`loaded` records by `key`) compares as a dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any, Self

import msgspec

from events.admission import MessageFact
from events.membership import covers

_astuple = msgspec.structs.astuple


class _Record(msgspec.Struct, gc=False):
    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return cls.__struct_fields__[:-2]

    def row(self) -> tuple[Any, ...]:
        """The record's column values, as written."""
        return _astuple(self)[:-2]

    @classmethod
    def loaded(cls, values: Sequence[Any]) -> Self:
        """The (stored, clean) record of a row's column values; values past the columns are ignored."""
        record = cls(*values[: len(cls.__struct_fields__) - 2])
        record.stored = True  # type: ignore[attr-defined]
        return record


class Conversation(_Record, gc=False):
    """`conversations`: one per conversation; the last message's preview is NULL once it is deleted."""

    conversation_id: str
    title: str
    created_by: str
    created_at: datetime
    last_seq: int
    last_activity_at: datetime
    message_count: int
    last_message_id: str | None = None
    last_message_seq: int | None = None
    last_message_author: str | None = None
    last_message_preview: str | None = None
    dirty: bool = False
    stored: bool = False

    @property
    def key(self) -> tuple[str]:
        return (self.conversation_id,)


class Span(_Record, gc=False):
    """`memberships`: one per span of membership; current while `left_seq` is None."""

    conversation_id: str
    user_id: str
    joined_seq: int
    joined_stream_id: str
    left_seq: int | None = None
    left_stream_id: str | None = None
    dirty: bool = False
    stored: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.conversation_id, self.user_id, self.joined_seq)

    def covers(self, seq: int) -> bool:
        """True when an event at `seq` happened during this span (`events.membership.covers`)."""
        return covers(self.joined_seq, self.left_seq, seq)


class Inbox(_Record, gc=False):
    """`inbox`: a user's read marker, unread count, archived flag and inbox order in one conversation, and
    the conversation as this user sees it (`views.listed` is the rule).

    `unread_count` counts messages by others, not deleted, after `read_seq`, sent while the user was in.
    `last_activity_at` is the latest of the creation, the user's (re-)additions and the messages they saw;
    `message_count` counts those messages not deleted; `last_message_seq` is the latest of them (deleted
    or not); `joined_seq` is where the user's latest span began.
    """

    user_id: str
    conversation_id: str
    read_seq: int
    unread_count: int
    archived: bool
    is_member: bool
    last_activity_at: datetime
    joined_seq: int
    message_count: int = 0
    last_message_seq: int | None = None
    dirty: bool = False
    stored: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.user_id, self.conversation_id)


class Version(_Record, gc=False):
    """`message_versions`: a body an edit replaced, kept so that whoever saw it (and not the edit) still
    sees it (see `views.seen`). `body` is what the message said before the edit at `until_seq`; it is None
    in the fold's record when the store must copy it from the message row (set in an earlier batch), and
    None in the table once the message is deleted. `edited_at` is when that body was set (None: the
    original). Only edits write these rows: a send costs nothing extra."""

    conversation_id: str
    seq: int
    until_seq: int
    body: str | None
    edited_at: datetime | None = None
    dirty: bool = False
    stored: bool = False

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.conversation_id, self.seq, self.until_seq)


class Message(_Record, gc=False):
    """`messages`: `body` is None for good once the message is deleted. In the fold's state a body is kept
    only from the event that set it until the batch is drained; an edit of a message whose body was
    already written leaves it to the store to copy that body into the `Version` it records."""

    conversation_id: str
    seq: int
    message_id: str
    author: str
    body: str | None
    sent_at: datetime
    reply_to: str | None = None
    edited_at: datetime | None = None
    deleted_at: datetime | None = None
    dirty: bool = False
    stored: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.conversation_id, self.seq)

    @property
    def state(self) -> str:
        if self.deleted_at is not None:
            return "deleted"
        return "sent" if self.edited_at is None else "edited"

    def row(self) -> tuple[Any, ...]:
        """The column values, then the derived `state` column."""
        return (*_astuple(self)[:-2], self.state)


Record = Conversation | Span | Inbox | Version | Message
TABLE_OF: dict[type[Record], str] = {
    Conversation: "conversations",
    Span: "memberships",
    Version: "message_versions",  # before `messages`: a version may copy the body the message row had
    Message: "messages",
    Inbox: "inbox",
}
RECORD_OF_TABLE: dict[str, type[Record]] = {table: record for record, table in TABLE_OF.items()}
# {table: (new records, changed records)}; for "message_versions": (new versions, messages deleted in the
# batch whose versions lose their bodies)
Tables = dict[str, tuple[list[Any], list[Any]]]
VERSIONS = TABLE_OF[Version]


_ABSENT, _LIVE, _DELETED, _FORGOTTEN = (
    MessageFact.ABSENT,
    MessageFact.LIVE,
    MessageFact.DELETED,
    MessageFact.FORGOTTEN,
)


class StateIncomplete(Exception):
    """A fold needed a message its state does not hold: the batch's `needs` were not loaded (a bug)."""


@dataclass(slots=True)
class ConversationState:
    """Everything the fold needs to know about one conversation to apply its next event; it is the
    projector's `events.admission.ConversationFacts`.

    `messages` holds every message with seq above `held_after` (0: all of them), in sequence order (the fold
    appends; the store loads them ordered; `trim` keeps the newest). Older ones a batch needs (an edit or
    delete of one, a read marker set below `held_after`) are loaded into `older` first (`needs`), with
    every message in `(older_after, held_after]` when a count needs them; `trim` drops them again.
    """

    conversation: Conversation
    spans: dict[str, list[Span]] = field(default_factory=dict)
    inbox: dict[str, Inbox] = field(default_factory=dict)
    messages: dict[str, Message] = field(default_factory=dict)
    members: list[str] | None = None  # current participants, cached until membership changes
    held_after: int = 0
    older: dict[str, Message] = field(default_factory=dict)
    older_after: int | None = None
    looked_up: set[str] = field(default_factory=set)  # ids `older` was loaded for (absent if not in it)

    @property
    def last_seq(self) -> int:
        return self.conversation.last_seq

    def was_member(self, user_id: str) -> bool:
        return user_id in self.inbox

    def message(self, message_id: str) -> Message:
        message = self.messages.get(message_id) or self.older.get(message_id)
        if message is None:
            raise StateIncomplete(
                f"message {message_id} of {self.conversation.conversation_id} is not loaded"
            )
        return message

    def message_fact(self, message_id: str) -> MessageFact:
        """A send of an id not held is FORGOTTEN (accepted: the write side keeps ids unique, exactly)."""
        message = self.messages.get(message_id) or self.older.get(message_id)
        if message is None:
            return _ABSENT if self.held_after == 0 or message_id in self.looked_up else _FORGOTTEN
        return _LIVE if message.deleted_at is None else _DELETED

    def current_members(self) -> list[str]:
        if self.members is None:
            self.members = [u for u, spans in self.spans.items() if spans and spans[-1].left_seq is None]
        return self.members

    def is_member(self, user_id: str) -> bool:
        spans = self.spans.get(user_id)
        return bool(spans) and spans[-1].left_seq is None  # type: ignore[index]

    def saw(self, user_id: str, seq: int) -> bool:
        """True when `user_id` was a participant when the event at `seq` happened."""
        return any(s.covers(seq) for s in self.spans.get(user_id, ()))

    def counts_for(self, user_id: str, message: Message) -> bool:
        """True when `message` is one `user_id`'s unread count may include (read marker aside)."""
        return message.deleted_at is None and message.author != user_id and self.saw(user_id, message.seq)

    def holds_after(self, seq: int) -> bool:
        """True when `messages` holds every message with a seq above `seq`."""
        return seq >= self.held_after

    def unread_after(self, user_id: str, read_seq: int) -> int:
        """The unread count from its definition (linear in the messages after `read_seq`)."""
        n = sum(1 for m in self.messages.values() if m.seq > read_seq and self.counts_for(user_id, m))
        if read_seq < self.held_after:
            if self.older_after is None or read_seq < self.older_after:
                raise StateIncomplete(
                    f"messages after seq {read_seq} of {self.conversation.conversation_id} are not loaded"
                )
            n += sum(1 for m in self.older.values() if m.seq > read_seq and self.counts_for(user_id, m))
        return n

    def unread_between(self, user_id: str, low: int, high: int) -> int:
        """How many counted messages have `low < seq <= high` (newest first; stops at `low`); `low` is at
        or above `held_after`."""
        n = 0
        for m in reversed(self.messages.values()):
            if m.seq <= low:
                break
            if m.seq <= high and self.counts_for(user_id, m):
                n += 1
        return n

    def trim(self, keep: int) -> None:
        """Hold only the newest `keep` messages (all of them were written) and nothing loaded for a batch."""
        extra = len(self.messages) - keep
        for message_id in list(islice(self.messages, max(extra, 0))):
            self.held_after = self.messages.pop(message_id).seq
        self.older.clear()
        self.older_after = None
        self.looked_up.clear()


@dataclass(slots=True)
class Changes:
    """The records a run of events touched, each listed once per type, in first-touch order."""

    touched: dict[type[Record], list[Any]] = field(default_factory=lambda: {t: [] for t in TABLE_OF})
    purged: list[Message] = field(default_factory=list)  # deleted messages that had versions

    def touch(self, record: Record) -> None:
        if not record.dirty:
            record.dirty = True
            self.touched[type(record)].append(record)

    def drain(self) -> Tables:
        """Each table's (inserts, updates): the touched records, now marked clean and stored.

        They are the fold's own records, written with `row()` while they still describe the database plus
        this batch: write them before folding further, then `forget_bodies`; a failed write must drop the
        state they belong to. No row tuple is made here, so none waits in a batch for the collector to walk.
        """
        out: Tables = {}
        for record_type, records in self.touched.items():
            out[TABLE_OF[record_type]] = (
                [r for r in records if not r.stored],
                [r for r in records if r.stored],
            )
            for r in records:
                r.dirty, r.stored = False, True
            records.clear()
        out[VERSIONS] = (out[VERSIONS][0], self.purged)
        self.purged = []
        return out


def forget_bodies(tables: Tables) -> None:
    """Drop the bodies of written messages from the fold's state: no later change needs a previous body."""
    inserts, updates = tables.get("messages", ((), ()))
    for m in (*inserts, *updates):
        m.body = None
