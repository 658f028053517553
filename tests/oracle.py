"""Test oracles written from the README's words, in plain code that shares nothing with the code they check.

Stream (README, Server frames): "You see a conversation's events from the event that added you (your
`participant_added` or the `conversation_created` naming you or made by you) up to and including the one
that removed you. `conversation_archived` / `conversation_unarchived` are private: only the actor sees
them." Definitions: "unread(u, c) = messages of c by someone else, not deleted, with seq > u's read marker,
sent while u was a participant." Both take a valid log (every event one its conversation admits).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from events.schema import (
    ConversationArchived,
    ConversationCreated,
    ConversationUnarchived,
    Envelope,
    MessageDeleted,
    MessageSent,
    MessagesRead,
    ParticipantAdded,
    ParticipantRemoved,
)


def visible_events(events: Iterable[Envelope], user: str) -> dict[str, list[str]]:
    """Per conversation, the ids of the events `user` sees on the stream, in log order."""
    inside: set[str] = set()
    seen: dict[str, list[str]] = {}
    for event in events:
        payload, cid = event.payload, event.conversation_id
        if isinstance(payload, ConversationCreated) and user in (event.actor, *payload.participants):
            inside.add(cid)
        if isinstance(payload, ParticipantAdded) and payload.user_id == user:
            inside.add(cid)
        shown = cid in inside
        if isinstance(payload, ConversationArchived | ConversationUnarchived) and event.actor != user:
            shown = False
        if isinstance(payload, ParticipantRemoved) and payload.user_id == user:
            inside.discard(cid)
        if shown:
            seen.setdefault(cid, []).append(event.event_id)
    return seen


class Unread(NamedTuple):
    """unread(u, c): the message ids it counts, u's read marker, and whether u is a participant now."""

    messages: frozenset[str]
    read_seq: int
    member: bool


def unread(events: Iterable[Envelope], user: str, cid: str) -> Unread | None:
    """unread(user, cid) after `events`; None when `user` never was a participant of `cid`."""
    inside, ever, read_seq = False, False, 0
    counted: dict[str, tuple[str, int]] = {}  # message id -> (author, seq), sent while `user` was in
    deleted: set[str] = set()
    for event in events:
        payload = event.payload
        if event.conversation_id != cid:
            continue
        if isinstance(payload, ConversationCreated) and user in (event.actor, *payload.participants):
            inside = ever = True
        elif isinstance(payload, ParticipantAdded) and payload.user_id == user:
            inside = ever = True
        elif isinstance(payload, ParticipantRemoved) and payload.user_id == user:
            inside = False
        elif isinstance(payload, MessageSent) and inside:
            counted[payload.message_id] = (event.actor, event.seq)
        elif isinstance(payload, MessageDeleted):
            deleted.add(payload.message_id)
        elif isinstance(payload, MessagesRead) and event.actor == user:
            read_seq = max(read_seq, payload.up_to_seq)
    if not ever:
        return None
    ids = frozenset(
        mid
        for mid, (author, seq) in counted.items()
        if author != user and mid not in deleted and seq > read_seq
    )
    return Unread(ids, read_seq, inside)
