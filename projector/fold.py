"""The fold: pure functions from (conversation state, event) to the read-model rows that change.

`changes` never mutates the state; `absorb` moves a state forward by the rows `changes` returned.
The state holds message rows without their bodies: no change ever needs a previous body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from events import schema
from events.schema import Envelope
from projector.exceptions import FoldError
from projector.rows import ConversationRow, InboxRow, MembershipRow, MessageRow, Row, preview

_replace = msgspec.structs.replace


@dataclass(slots=True)
class ConversationState:
    """Everything the fold needs to know about one conversation to apply its next event."""

    conversation: ConversationRow
    spans: dict[str, list[MembershipRow]] = field(default_factory=dict)
    inbox: dict[str, InboxRow] = field(default_factory=dict)
    messages: dict[str, MessageRow] = field(default_factory=dict)
    _members: list[str] | None = None

    def current_members(self) -> list[str]:
        """Current participants (cached until `absorb` applies a membership change)."""
        if self._members is None:
            self._members = [u for u, spans in self.spans.items() if spans and spans[-1].left_seq is None]
        return self._members

    def is_member(self, user_id: str) -> bool:
        spans = self.spans.get(user_id)
        return bool(spans) and spans[-1].left_seq is None  # type: ignore[index]

    def saw(self, user_id: str, seq: int) -> bool:
        """True when `user_id` was a participant when the event at `seq` happened."""
        return any(s.covers(seq) for s in self.spans.get(user_id, ()))

    def unread_after(self, user_id: str, read_seq: int) -> int:
        return sum(
            1
            for m in self.messages.values()
            if m.seq > read_seq and m.deleted_at is None and m.author != user_id and self.saw(user_id, m.seq)
        )


def absorb(state: ConversationState | None, rows: list[Row]) -> ConversationState:
    """The state after `rows` (the output of `changes`) are applied; mutates and returns `state`."""
    for row in rows:
        if isinstance(row, ConversationRow):
            if state is None:
                state = ConversationState(row)
            else:
                state.conversation = row
    if state is None:
        raise FoldError("no conversation row for a conversation without state")
    for row in rows:
        if isinstance(row, MembershipRow):
            state._members = None
            spans = state.spans.setdefault(row.user_id, [])
            if spans and spans[-1].joined_seq == row.joined_seq:
                spans[-1] = row
            else:
                spans.append(row)
        elif isinstance(row, InboxRow):
            state.inbox[row.user_id] = row
        elif isinstance(row, MessageRow):
            state.messages[row.message_id] = _replace(row, body=None) if row.body is not None else row
    return state


def changes(
    state: ConversationState | None, event: Envelope, stream_id: str, *, in_order: bool = True
) -> list[Row]:
    """The rows that `event` (at log position `stream_id`) creates or changes.

    `in_order=False` (re-driving a dead letter) accepts an event older than the conversation's last one.

    Raises:
        FoldError: the event contradicts the state (unknown conversation, sequence not after the last,
            unknown or deleted message, actor not in the conversation).
    """
    payload = event.payload
    if isinstance(payload, schema.ConversationCreated):
        if state is not None:
            raise FoldError(f"conversation {event.conversation_id} already exists")
        return _created(event, payload, stream_id)
    if state is None:
        raise FoldError(f"{event.type} for unknown conversation {event.conversation_id}")
    conv = state.conversation
    if event.seq <= conv.last_seq and in_order:
        raise FoldError(f"seq {event.seq} is not after the conversation's last seq {conv.last_seq}")
    conv = _replace(conv, last_seq=max(event.seq, conv.last_seq))
    if isinstance(payload, schema.MessageSent):
        return _sent(state, conv, event, payload)
    if isinstance(payload, schema.MessageEdited):
        return _edited(state, conv, event, payload)
    if isinstance(payload, schema.MessageDeleted):
        return _deleted(state, conv, event, payload)
    if isinstance(payload, schema.MessagesRead):
        row = _inbox_of(state, event.actor)
        read_seq = max(row.read_seq, payload.up_to_seq)
        return [
            conv,
            _replace(row, read_seq=read_seq, unread_count=state.unread_after(event.actor, read_seq)),
        ]
    if isinstance(payload, schema.ConversationArchived | schema.ConversationUnarchived):
        if not state.is_member(event.actor):
            raise FoldError(f"{event.actor} is not a participant of {event.conversation_id}")
        archived = isinstance(payload, schema.ConversationArchived)
        return [conv, _replace(_inbox_of(state, event.actor), archived=archived)]
    if isinstance(payload, schema.ParticipantAdded):
        return _added(state, conv, event, payload.user_id, stream_id)
    if isinstance(payload, schema.ParticipantRemoved):
        return _removed(state, conv, event, payload.user_id, stream_id)
    raise FoldError(f"no fold for event type {event.type}")


def _created(event: Envelope, payload: schema.ConversationCreated, stream_id: str) -> list[Row]:
    at = event.occurred_at
    rows: list[Row] = [
        ConversationRow(
            conversation_id=event.conversation_id, title=payload.title, created_by=event.actor,
            created_at=at, last_seq=event.seq, last_activity_at=at, message_count=0,
        )
    ]  # fmt: skip
    for user in dict.fromkeys((event.actor, *payload.participants)):
        rows.append(MembershipRow(event.conversation_id, user, event.seq, stream_id))
        rows.append(InboxRow(user, event.conversation_id, 0, 0, False, True, at))
    return rows


def _inbox_of(state: ConversationState, user_id: str) -> InboxRow:
    row = state.inbox.get(user_id)
    if row is None:
        raise FoldError(f"{user_id} was never a participant of {state.conversation.conversation_id}")
    return row


def _sent(
    state: ConversationState, conv: ConversationRow, event: Envelope, payload: schema.MessageSent
) -> list[Row]:
    if payload.message_id in state.messages:
        raise FoldError(f"message {payload.message_id} already exists")
    at = max(conv.last_activity_at, event.occurred_at)
    conv = _replace(
        conv, last_activity_at=at, message_count=conv.message_count + 1,
        last_message_id=payload.message_id, last_message_seq=event.seq,
        last_message_author=event.actor, last_message_preview=preview(payload.body),
    )  # fmt: skip
    rows: list[Row] = [
        conv,
        MessageRow(
            conversation_id=conv.conversation_id, seq=event.seq, message_id=payload.message_id,
            author=event.actor, body=payload.body, sent_at=event.occurred_at, reply_to=payload.reply_to,
        ),
    ]  # fmt: skip
    for user in state.current_members():
        row = state.inbox[user]
        unread = row.unread_count + (user != event.actor)
        rows.append(_replace(row, unread_count=unread, last_activity_at=at))
    return rows


def _live_message(state: ConversationState, message_id: str) -> MessageRow:
    message = state.messages.get(message_id)
    if message is None:
        raise FoldError(f"unknown message {message_id}")
    if message.deleted_at is not None:
        raise FoldError(f"message {message_id} is deleted")
    return message


def _edited(
    state: ConversationState, conv: ConversationRow, event: Envelope, payload: schema.MessageEdited
) -> list[Row]:
    message = _live_message(state, payload.message_id)
    if conv.last_message_id == message.message_id:
        conv = _replace(conv, last_message_preview=preview(payload.body))
    return [conv, _replace(message, body=payload.body, edited_at=event.occurred_at)]


def _deleted(
    state: ConversationState, conv: ConversationRow, event: Envelope, payload: schema.MessageDeleted
) -> list[Row]:
    message = _live_message(state, payload.message_id)
    conv = _replace(conv, message_count=conv.message_count - 1)
    if conv.last_message_id == message.message_id:
        conv = _replace(conv, last_message_preview=None)
    rows: list[Row] = [conv, _replace(message, body=None, deleted_at=event.occurred_at)]
    for user, row in state.inbox.items():
        if user != message.author and message.seq > row.read_seq and state.saw(user, message.seq):
            rows.append(_replace(row, unread_count=row.unread_count - 1))
    return rows


def _added(
    state: ConversationState, conv: ConversationRow, event: Envelope, user: str, stream_id: str
) -> list[Row]:
    if state.is_member(user):
        raise FoldError(f"{user} is already a participant")
    old = state.inbox.get(user)
    inbox = (
        InboxRow(user, conv.conversation_id, 0, 0, False, True, conv.last_activity_at)
        if old is None
        else _replace(old, is_member=True, archived=False, last_activity_at=conv.last_activity_at)
    )
    return [conv, MembershipRow(conv.conversation_id, user, event.seq, stream_id), inbox]


def _removed(
    state: ConversationState, conv: ConversationRow, event: Envelope, user: str, stream_id: str
) -> list[Row]:
    if not state.is_member(user):
        raise FoldError(f"{user} is not a participant")
    span = _replace(state.spans[user][-1], left_seq=event.seq, left_stream_id=stream_id)
    return [conv, span, _replace(state.inbox[user], is_member=False, archived=False)]
