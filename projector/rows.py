"""Read-model rows as frozen structs, one type per table, each knowing its primary key.

These are what the fold emits and what the adapter writes; equality is field-wise, so a whole
read model compares as a dict of rows by key.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

PREVIEW_CHARS = 140


class ConversationRow(msgspec.Struct, frozen=True):
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

    @property
    def key(self) -> tuple[str, ...]:
        return (self.conversation_id,)


class MembershipRow(msgspec.Struct, frozen=True):
    """`memberships`: one per span of membership; current while `left_seq` is None."""

    conversation_id: str
    user_id: str
    joined_seq: int
    joined_stream_id: str
    left_seq: int | None = None
    left_stream_id: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.conversation_id, self.user_id, self.joined_seq)

    def covers(self, seq: int) -> bool:
        """True when an event at `seq` happened during this span."""
        return self.joined_seq < seq and (self.left_seq is None or seq < self.left_seq)


class MessageRow(msgspec.Struct, frozen=True):
    """`messages`: `body` is None exactly when the message is deleted."""

    conversation_id: str
    seq: int
    message_id: str
    author: str
    body: str | None
    sent_at: datetime
    reply_to: str | None = None
    edited_at: datetime | None = None
    deleted_at: datetime | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.conversation_id, self.seq)

    @property
    def state(self) -> str:
        if self.deleted_at is not None:
            return "deleted"
        return "sent" if self.edited_at is None else "edited"


class InboxRow(msgspec.Struct, frozen=True):
    """`inbox`: a user's read marker, unread count, archived flag and inbox order in one conversation.

    `unread_count` counts messages by others, not deleted, after `read_seq`, sent while the user was in.
    """

    user_id: str
    conversation_id: str
    read_seq: int
    unread_count: int
    archived: bool
    is_member: bool
    last_activity_at: datetime

    @property
    def key(self) -> tuple[str, str]:
        return (self.user_id, self.conversation_id)


Row = ConversationRow | MembershipRow | MessageRow | InboxRow
ROW_TYPES: tuple[type[Row], ...] = (ConversationRow, MembershipRow, MessageRow, InboxRow)
TABLE_OF: dict[type[Row], str] = {
    ConversationRow: "conversations",
    MembershipRow: "memberships",
    MessageRow: "messages",
    InboxRow: "inbox",
}


def preview(body: str) -> str:
    return body[:PREVIEW_CHARS]
