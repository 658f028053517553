"""The event types: frozen msgspec Structs on one tagged base, and the envelope that carries them.

Evolution rule: a published field's type and meaning never change. New fields get defaults;
a change of meaning is a new version of the type with an upcaster (see `upcast.py`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

import msgspec

SEQ_MAX = 2**63 - 1
# A sequence number: 1, 2, ... and within Postgres bigint (the archive's and read models' column type), so a
# decoded event can always be written; an entry outside is refused at decode time, by every reader alike.
Seq = Annotated[int, msgspec.Meta(ge=1, le=SEQ_MAX)]


class Payload(msgspec.Struct, frozen=True, gc=False, tag_field="type"):
    """Base of every event payload; `type` on the wire is the subclass's tag.

    Events are immutable trees of scalars and tuples, never part of a cycle, so they stay out of the
    cyclic garbage collector (`gc=False`): a worker holds tens of thousands in flight.

    Unknown fields are ignored, so a reader keeps working when a writer adds a defaulted field.
    """

    VERSION: ClassVar[int] = 1


class ConversationCreated(Payload, frozen=True, tag="conversation_created"):
    """A conversation came into being; `participants` includes the creator (the actor)."""

    title: str
    participants: tuple[str, ...]


class ParticipantAdded(Payload, frozen=True, tag="participant_added"):
    """`user_id` became a participant; they see the conversation from this event on."""

    user_id: str


class ParticipantRemoved(Payload, frozen=True, tag="participant_removed"):
    """`user_id` stopped being a participant; they see nothing after this event."""

    user_id: str


class MessageSent(Payload, frozen=True, tag="message_sent"):
    """A message was posted. v2 renamed v1's `text` to `body` and added `reply_to`."""

    VERSION: ClassVar[int] = 2

    message_id: str
    body: str
    reply_to: str | None = None


class MessageEdited(Payload, frozen=True, tag="message_edited"):
    """The author replaced a message's body."""

    message_id: str
    body: str


class MessageDeleted(Payload, frozen=True, tag="message_deleted"):
    """The author deleted a message; its body must disappear from every read model."""

    message_id: str


class MessagesRead(Payload, frozen=True, tag="messages_read"):
    """The actor has read the conversation up to and including sequence `up_to_seq`."""

    up_to_seq: Seq


class ConversationArchived(Payload, frozen=True, tag="conversation_archived"):
    """The actor archived the conversation for themselves only."""


class ConversationUnarchived(Payload, frozen=True, tag="conversation_unarchived"):
    """The actor brought the conversation back from their archive."""


UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

AnyPayload = (
    ConversationCreated
    | ParticipantAdded
    | ParticipantRemoved
    | MessageSent
    | MessageEdited
    | MessageDeleted
    | MessagesRead
    | ConversationArchived
    | ConversationUnarchived
)

PAYLOAD_TYPES: tuple[type[Payload], ...] = (
    ConversationCreated,
    ParticipantAdded,
    ParticipantRemoved,
    MessageSent,
    MessageEdited,
    MessageDeleted,
    MessagesRead,
    ConversationArchived,
    ConversationUnarchived,
)


def tag_of(payload_type: type[Payload]) -> str:
    """The wire name (`type`) of a payload class."""
    tag = payload_type.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


CURRENT_VERSIONS: dict[str, int] = {tag_of(t): t.VERSION for t in PAYLOAD_TYPES}
_TAGS: dict[type[Payload], str] = {t: tag_of(t) for t in PAYLOAD_TYPES}


class _EnvelopeFields(msgspec.Struct, frozen=True, gc=False):  # untracked, as Payload
    event_id: str
    schema_version: int
    occurred_at: UtcDatetime
    actor: str
    conversation_id: str
    correlation_id: str
    payload: AnyPayload
    causation_id: str | None = None
    idempotency_key: str | None = None

    @property
    def type(self) -> str:
        """The payload's wire name, e.g. `message_sent`."""
        return _TAGS[type(self.payload)]


class UnsequencedEnvelope(_EnvelopeFields, frozen=True):
    """An envelope before the log assigns `seq`; the append script prepends `"seq":N,` to it."""


class Envelope(_EnvelopeFields, frozen=True, kw_only=True):
    """One event as stored in the log: identity, ordering, provenance, and the payload.

    `seq` is the conversation's sequence number (1, 2, ...; no gap, no repeat), assigned by the
    log at append time. `schema_version` is the payload type's version when it was written.
    """

    seq: Seq
