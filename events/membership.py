"""Who is in a conversation and who may see which of its events: the one rule every reader applies. No I/O.

A user's span of membership runs from the event that added them (the conversation's creation, or a
ParticipantAdded naming them) to the event that removed them, both included: they see the event that
added them, the one that removed them and every event between, and nothing before or after. A message
never shares a seq with a membership event, so for messages the ends do not matter; for membership
events they say the added and the removed user are told. The creator of a conversation is always one of
its first members, whether or not `participants` repeats them (the write side makes them a member).

Two kinds of event are private to their actor (archiving and unarchiving): only the actor sees them.

The SQL readers (the query API, the fanout's unread seed) use `covers_sql`, the same predicate in SQL;
`tests/test_visibility_agreement.py` checks it against `covers` over random histories in Postgres.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from events.schema import (
    ConversationArchived,
    ConversationCreated,
    ConversationUnarchived,
    Envelope,
    ParticipantAdded,
    ParticipantRemoved,
    tag_of,
)

PRIVATE_PAYLOADS = (ConversationArchived, ConversationUnarchived)
PRIVATE_TYPES = tuple(tag_of(t) for t in PRIVATE_PAYLOADS)
MEMBERSHIP_TYPES = tuple(tag_of(t) for t in (ConversationCreated, ParticipantAdded, ParticipantRemoved))


class SpanLike(Protocol):
    """A span of membership as any reader stores it: `left_seq` None while it is open."""

    @property
    def joined_seq(self) -> int: ...

    @property
    def left_seq(self) -> int | None: ...


def covers(joined_seq: int, left_seq: int | None, seq: int) -> bool:
    """True when the event at `seq` happened during the span [joined_seq, left_seq] (both included)."""
    return joined_seq <= seq and (left_seq is None or seq <= left_seq)


def covers_sql(span: str, seq: str) -> str:
    """`covers` as a SQL condition on the `joined_seq`/`left_seq` columns of the row alias `span`."""
    return f"({span}.joined_seq <= {seq} AND ({span}.left_seq IS NULL OR {seq} <= {span}.left_seq))"


def saw(spans: Iterable[SpanLike], seq: int) -> bool:
    """True when one of a user's spans of a conversation covers the event at `seq`."""
    return any(covers(s.joined_seq, s.left_seq, seq) for s in spans)


def joins(event: Envelope) -> tuple[str, ...]:
    """The users whose span opens at `event`: a creation's creator and participants, an addition's user."""
    payload = event.payload
    if type(payload) is ConversationCreated:
        return tuple(dict.fromkeys((event.actor, *payload.participants)))
    if type(payload) is ParticipantAdded:
        return (payload.user_id,)
    return ()


def leaves(event: Envelope) -> tuple[str, ...]:
    """The users whose span closes at `event`: a removal's user."""
    payload = event.payload
    return (payload.user_id,) if type(payload) is ParticipantRemoved else ()


def concerns(event: Envelope) -> tuple[str, ...]:
    """The users whose membership `event` changes (empty for every event but the membership ones)."""
    return joins(event) or leaves(event)


def is_private(event: Envelope) -> bool:
    """True for an event only its actor may see (archiving, unarchiving)."""
    return isinstance(event.payload, PRIVATE_PAYLOADS)


def may_see(user_id: str, event: Envelope, spans: Iterable[SpanLike]) -> bool:
    """True when `user_id`, whose spans of `event`'s conversation are `spans`, may see `event`."""
    if is_private(event) and event.actor != user_id:
        return False
    return saw(spans, event.seq)
