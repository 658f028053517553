"""Who may see what, per process: each user's spans of membership per conversation, learned from the log.

The rule (span boundaries, who an event concerns, who may see an event) is `events.membership`; this module
only stores spans and indexes them. Spans are facts about the log, so learning one twice (from a seed and
from replay) is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from events.membership import PRIVATE_PAYLOADS, PRIVATE_TYPES, concerns, covers, joins, leaves
from events.schema import Envelope

__all__ = ["PRIVATE_PAYLOADS", "PRIVATE_TYPES", "MembershipIndex", "Span", "UserMemberships", "engages"]


def engages(event_type: str) -> bool:
    """True when an event shows its actor taking part in the conversation (created it, sent, edited or
    deleted a message, marked it read, added or removed someone); archiving is private, never that.
    For a decoded event the same rule is `not isinstance(payload, PRIVATE_PAYLOADS)`."""
    return event_type not in PRIVATE_TYPES


@dataclass(frozen=True, slots=True)
class Span:
    """`user_id` is a participant of `conversation_id` for seq in [joined_seq, left_seq]."""

    conversation_id: str
    user_id: str
    joined_seq: int
    left_seq: int | None = None


class UserMemberships:
    """One user's spans per conversation: `{conversation: {joined_seq: left_seq | None}}`."""

    __slots__ = ("spans", "user_id")

    def __init__(self, user_id: str, spans: Iterable[Span] = ()) -> None:
        self.user_id = user_id
        self.spans: dict[str, dict[int, int | None]] = {}
        for span in spans:
            self.open(span.conversation_id, span.joined_seq)
            if span.left_seq is not None:
                self.close(span.conversation_id, span.left_seq)

    def open(self, conversation_id: str, seq: int) -> None:
        spans = self.spans.setdefault(conversation_id, {})
        if not any(covers(j, left, seq) for j, left in spans.items()):
            spans[seq] = None

    def close(self, conversation_id: str, seq: int) -> None:
        spans = self.spans.get(conversation_id, {})
        for joined, left in spans.items():
            if joined <= seq and (left is None or seq < left):
                spans[joined] = seq
                return

    def apply(self, envelope: Envelope) -> None:
        """Learn from a membership event that concerns this user; other events change nothing."""
        if self.user_id in joins(envelope):
            self.open(envelope.conversation_id, envelope.seq)
        elif self.user_id in leaves(envelope):
            self.close(envelope.conversation_id, envelope.seq)

    def can_see(self, conversation_id: str, seq: int) -> bool:
        """True when one of the user's spans of the conversation covers `seq` (`events.membership.covers`)."""
        spans = self.spans.get(conversation_id)
        if not spans:
            return False
        return any(covers(j, left, seq) for j, left in spans.items())

    def is_member(self, conversation_id: str) -> bool:
        """True when the user's latest span of the conversation is still open."""
        return any(left is None for left in self.spans.get(conversation_id, {}).values())

    def joined_seq(self, conversation_id: str) -> int | None:
        """Where the user's open span of the conversation starts; None when not a participant now."""
        return max(
            (j for j, left in self.spans.get(conversation_id, {}).items() if left is None), default=None
        )

    def export(self) -> Iterator[Span]:
        for cid, spans in self.spans.items():
            for joined, left in spans.items():
                yield Span(cid, self.user_id, joined, left)


class MembershipIndex:
    """Every user's spans, learned from the membership events a process reads; feeds session seeds."""

    def __init__(self) -> None:
        self._users: dict[str, UserMemberships] = {}
        self.members: dict[str, set[str]] = {}
        self._acted: dict[str, dict[str, int]] = {}  # conversation -> actor -> seq of their latest act

    def note_act(self, conversation_id: str, actor: str, seq: int) -> None:
        """Record that `actor` took part in the conversation at `seq` (see `engages`); any order."""
        acted = self._acted.get(conversation_id)
        if acted is None:
            self._acted[conversation_id] = {actor: seq}
        elif acted.get(actor, 0) < seq:
            acted[actor] = seq

    def engaged(self, conversation_id: str, user_id: str) -> bool:
        """True when the user is a participant and has acted in the conversation since they last joined."""
        memberships = self._users.get(user_id)
        joined = None if memberships is None else memberships.joined_seq(conversation_id)
        return joined is not None and self._acted.get(conversation_id, {}).get(user_id, 0) >= joined

    def apply(self, envelope: Envelope) -> None:
        cid = envelope.conversation_id
        for user in concerns(envelope):
            memberships = self._users.get(user)
            if memberships is None:
                memberships = self._users[user] = UserMemberships(user)
            memberships.apply(envelope)
            if memberships.is_member(cid):
                self.members.setdefault(cid, set()).add(user)
            else:
                self.members.get(cid, set()).discard(user)

    def learn(self, spans: Iterable[Span]) -> None:
        """Add spans known from elsewhere (the Postgres read model)."""
        for span in spans:
            memberships = self._users.get(span.user_id)
            if memberships is None:
                memberships = self._users[span.user_id] = UserMemberships(span.user_id)
            memberships.open(span.conversation_id, span.joined_seq)
            if span.left_seq is not None:
                memberships.close(span.conversation_id, span.left_seq)
            if memberships.is_member(span.conversation_id):
                self.members.setdefault(span.conversation_id, set()).add(span.user_id)
            else:
                self.members.get(span.conversation_id, set()).discard(span.user_id)

    def seed_for(self, user_id: str) -> list[Span]:
        memberships = self._users.get(user_id)
        return [] if memberships is None else list(memberships.export())

    def left_conversations_of(self, user_id: str) -> list[str]:
        """Conversations the user was a participant of and is not now (every span closed)."""
        memberships = self._users.get(user_id)
        if memberships is None:
            return []
        return [cid for cid in memberships.spans if not memberships.is_member(cid)]

    def has_left(self, user_id: str, conversation_id: str) -> bool:
        memberships = self._users.get(user_id)
        return (
            memberships is not None
            and bool(memberships.spans.get(conversation_id))
            and not (memberships.is_member(conversation_id))
        )

    def conversations_of(self, user_id: str) -> list[str]:
        """Conversations the user is a participant of right now (open span)."""
        memberships = self._users.get(user_id)
        if memberships is None:
            return []
        return [cid for cid in memberships.spans if memberships.is_member(cid)]
