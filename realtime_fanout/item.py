"""A log entry decoded once per process and shared by every session it is delivered to."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from events.codec import decode, encode
from events.exceptions import DecodeError
from events.log import LogEntry
from events.schema import (
    ConversationArchived,
    ConversationCreated,
    ConversationUnarchived,
    Envelope,
    ParticipantAdded,
    ParticipantRemoved,
)
from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.membership import engages


@dataclass(frozen=True, slots=True)
class Item:
    """One decoded event at its log position; `json` is the current-schema envelope, encoded once."""

    partition: int
    stream_id: str
    key: StreamKey
    envelope: Envelope
    json: bytes

    @property
    def conversation_id(self) -> str:
        return self.envelope.conversation_id

    def named_users(self) -> tuple[str, ...]:
        """Users an event is routed to beyond the conversation's subscribers: those a membership event
        concerns (maybe not yet indexed under it), and the actor of an archive/unarchive (all of their
        connections, whatever their conversation filter)."""
        payload = self.envelope.payload
        if isinstance(payload, ConversationCreated):
            return payload.participants
        if isinstance(payload, ParticipantAdded | ParticipantRemoved):
            return (payload.user_id,)
        if isinstance(payload, ConversationArchived | ConversationUnarchived):
            return (self.envelope.actor,)
        return ()


def decode_entry(entry: LogEntry) -> Item | None:
    """The entry as an Item, or None when its bytes are not a current event (it is then skipped)."""
    try:
        envelope = decode(entry.data)
    except DecodeError:
        return None
    return Item(entry.partition, entry.stream_id, stream_key(entry.stream_id), envelope, encode(envelope))


_MEMBERSHIP_MARKERS = (b'"conversation_created"', b'"participant_added"', b'"participant_removed"')


def may_change_membership(data: bytes) -> bool:
    """Cheap pre-filter: False only when the raw bytes cannot be a membership event."""
    return any(marker in data for marker in _MEMBERSHIP_MARKERS)


class _Kind(msgspec.Struct):
    type: str


class _Act(msgspec.Struct):
    conversation_id: str
    actor: str
    seq: int
    payload: _Kind


_act_decoder = msgspec.json.Decoder(_Act)


def act_of(data: bytes) -> tuple[str, str, int] | None:
    """(conversation, actor, seq) of an entry whose event `engages` its actor, reading only those envelope
    fields (hub bootstrap; cheaper than a full decode); None for any other entry or unreadable fields."""
    try:
        act = _act_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    return (act.conversation_id, act.actor, act.seq) if engages(act.payload.type) else None
