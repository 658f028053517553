"""The fold: apply one event to a conversation's state, recording the rows it changed. No I/O.

`apply` first asks `events.admission.refusal` (the check the fanout applies too) whether the event is
one of its conversation, so a refused event (FoldError) leaves the state and the changes as they were.

It refuses (through that check) only what it cannot apply without contradicting its own rows: a second
creation, any other event of an unknown conversation, a sequence not after the last (in order), an event type
it has no fold for, a reused message id, an edit or delete of an unknown or deleted message, adding a current
participant or removing a non-participant, (un)archiving by a non-participant, a read marker of someone never
in it. It trusts, unchecked, the rest of what `command_api/rules.py` decides before an event is appended: that
the actor is a participant (of a send, edit, delete, read, add or remove), is the author of what they edit or
delete, may remove that user (self, or the creator) and does not remove the creator; that a reply's target
exists; that the sequence is the next one (a gap is folded); that a read marker moves forward and not past the
end (the fold keeps the highest); that an archive changes the flag; that a creation lists its creator (the
fold adds them). Why: the log is the truth and the append script, deciding by those rules atomically, is its
only writer; an event it accepted happened, and refusing it here would make the read models disagree with the
log, not undo it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events import schema
from events.admission import refusal
from events.membership import joins
from events.schema import Envelope
from projector.exceptions import FoldError
from projector.state import Changes, Conversation, ConversationState, Inbox, Message, Span, Version

PREVIEW_CHARS = 140


def preview(body: str) -> str:
    """The start of a message's body, shown in inbox listings."""
    return body[:PREVIEW_CHARS]


def apply(
    state: ConversationState | None,
    event: Envelope,
    stream_id: str,
    changes: Changes,
    *,
    in_order: bool = True,
) -> ConversationState:
    """Apply `event` (at log position `stream_id`) to `state`; returns the state (new for a creation).

    `in_order=False` (re-driving a dead letter) accepts an event older than the conversation's last one.

    Raises:
        FoldError: `events.admission.refusal` refuses the event; nothing was changed.
    """
    reason = refusal(state, event, in_order=in_order)
    if reason is not None:
        raise FoldError(reason)
    payload = event.payload
    if type(payload) is schema.ConversationCreated:
        return _created(event, payload, stream_id, changes)
    assert state is not None  # `refusal` refuses any other event of an unknown conversation
    conv = state.conversation
    handler = _HANDLERS[type(payload)]
    handler(state, event, payload, changes, stream_id, in_order)
    if event.seq > conv.last_seq:
        conv.last_seq = event.seq
    changes.touch(conv)
    return state


def _created(
    event: Envelope, payload: schema.ConversationCreated, stream_id: str, changes: Changes
) -> ConversationState:
    at, cid = event.occurred_at, event.conversation_id
    conv = Conversation(cid, payload.title, event.actor, at, event.seq, at, 0)
    state = ConversationState(conv)
    changes.touch(conv)
    for user in joins(event):
        span = state.spans[user] = [Span(cid, user, event.seq, stream_id)]
        inbox = state.inbox[user] = Inbox(user, cid, 0, 0, False, True, at, event.seq)
        changes.touch(span[0])
        changes.touch(inbox)
    return state


# Each handler runs only after `refusal` admitted its event: the rows it reads exist.


def _sent(
    state: ConversationState, event: Envelope, payload: schema.MessageSent, changes: Changes, *_: object
) -> None:
    conv, actor = state.conversation, event.actor
    at = conv.last_activity_at if conv.last_activity_at > event.occurred_at else event.occurred_at
    conv.last_activity_at = at
    conv.message_count += 1
    conv.last_message_id = payload.message_id
    conv.last_message_seq = event.seq
    conv.last_message_author = actor
    conv.last_message_preview = preview(payload.body)
    message = Message(
        conv.conversation_id, event.seq, payload.message_id, actor, payload.body, event.occurred_at,
        payload.reply_to,
    )  # fmt: skip
    state.messages[payload.message_id] = message
    changes.touch(message)
    inbox, touched = state.inbox, changes.touched[Inbox]
    sent_at, seq = event.occurred_at, event.seq
    for user in state.current_members():  # the hot loop: `touch` inlined
        row = inbox[user]
        if user != actor:
            row.unread_count += 1
        row.message_count += 1
        row.last_message_seq = seq
        if sent_at > row.last_activity_at:
            row.last_activity_at = sent_at
        if not row.dirty:
            row.dirty = True
            touched.append(row)


def _edited(
    state: ConversationState, event: Envelope, payload: schema.MessageEdited, changes: Changes, *_: object
) -> None:
    message = state.message(payload.message_id)
    conv = state.conversation
    if conv.last_message_id == message.message_id:
        conv.last_message_preview = preview(payload.body)
    # The replaced body, for whoever saw it and not this edit (None: already written, the store copies it).
    changes.touch(Version(conv.conversation_id, message.seq, event.seq, message.body, message.edited_at))
    message.body, message.edited_at = payload.body, event.occurred_at
    changes.touch(message)


def _deleted(
    state: ConversationState, event: Envelope, payload: schema.MessageDeleted, changes: Changes, *_: object
) -> None:
    message = state.message(payload.message_id)
    conv = state.conversation
    conv.message_count -= 1
    if conv.last_message_id == message.message_id:
        conv.last_message_preview = None
    for user, row in state.inbox.items():
        if not state.saw(user, message.seq):
            continue
        row.message_count -= 1
        if message.seq > row.read_seq and message.author != user:
            row.unread_count -= 1
        changes.touch(row)
    if message.edited_at is not None:  # its versions lose their bodies too: a deletion is for everyone
        changes.purged.append(message)
    message.body, message.deleted_at = None, event.occurred_at
    changes.touch(message)


def _read(
    state: ConversationState,
    event: Envelope,
    payload: schema.MessagesRead,
    changes: Changes,
    _sid: str,
    in_order: bool,
) -> None:
    row = state.inbox[event.actor]
    read_seq = max(row.read_seq, payload.up_to_seq)
    if read_seq >= (state.conversation.last_message_seq or 0):
        row.unread_count = 0  # no message after the marker
    elif in_order and state.holds_after(row.read_seq):
        # the count is exact, so moving the marker forward only drops the messages it passes
        if row.unread_count:
            row.unread_count -= state.unread_between(event.actor, row.read_seq, read_seq)
    else:
        row.unread_count = state.unread_after(event.actor, read_seq)
    row.read_seq = read_seq
    changes.touch(row)


def _archived(
    state: ConversationState,
    event: Envelope,
    payload: schema.ConversationArchived | schema.ConversationUnarchived,
    changes: Changes,
    *_: object,
) -> None:
    row = state.inbox[event.actor]
    row.archived = type(payload) is schema.ConversationArchived
    changes.touch(row)


def _added(
    state: ConversationState,
    event: Envelope,
    payload: schema.ParticipantAdded,
    changes: Changes,
    stream_id: str,
    _: bool,
) -> None:
    user = payload.user_id
    conv = state.conversation
    row = state.inbox.get(user)
    if row is None:
        at = max(conv.created_at, event.occurred_at)
        row = state.inbox[user] = Inbox(user, conv.conversation_id, 0, 0, False, True, at, event.seq)
    else:  # being added is activity the user sees; what happened while they were out is not
        row.is_member, row.archived, row.joined_seq = True, False, event.seq
        if event.occurred_at > row.last_activity_at:
            row.last_activity_at = event.occurred_at
    changes.touch(row)
    span = Span(conv.conversation_id, user, event.seq, stream_id)
    state.spans.setdefault(user, []).append(span)
    changes.touch(span)
    state.members = None


def _removed(
    state: ConversationState,
    event: Envelope,
    payload: schema.ParticipantRemoved,
    changes: Changes,
    stream_id: str,
    _: bool,
) -> None:
    user = payload.user_id
    span = state.spans[user][-1]
    span.left_seq, span.left_stream_id = event.seq, stream_id
    changes.touch(span)
    row = state.inbox[user]
    row.is_member, row.archived = False, False
    changes.touch(row)
    state.members = None


_Handler = Callable[[ConversationState, Any, Any, Changes, str, bool], None]
_HANDLERS: dict[type, _Handler] = {
    schema.MessageSent: _sent,
    schema.MessageEdited: _edited,
    schema.MessageDeleted: _deleted,
    schema.MessagesRead: _read,
    schema.ConversationArchived: _archived,
    schema.ConversationUnarchived: _archived,
    schema.ParticipantAdded: _added,
    schema.ParticipantRemoved: _removed,
}
