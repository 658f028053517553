"""What one reader sees of a message: the rule the query SQL (`queries.py`) implements. No I/O.

A reader sees a message sent while they were a participant (one of their spans covers it: the rule of
`events.membership`, which the fanout applies too), with the body set by the latest of its events they
saw: its send, or an edit made while they were a participant. So someone who left keeps the body as it
was when they left and never sees (or finds) a later edit. A deletion is honoured for every reader,
whenever they left: it only withdraws text, it never shows anything new. A conversation in a reader's
inbox (`listed`) shows only what they may see of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from projector.fold import preview
from projector.state import Message, Span, Version


class Seen(NamedTuple):
    """A message as one reader sees it: body, state, edit time."""

    body: str | None
    state: str
    edited_at: datetime | None


def seen(message: Message, versions: Sequence[Version], spans: Iterable[Span]) -> Seen | None:
    """`message` as a reader with `spans` sees it, or None when it was sent while they were out.

    `versions` are the message's rows of `message_versions` (any order).
    """
    spans = list(spans)
    if not any(s.covers(message.seq) for s in spans):
        return None
    last_seen = max((v.until_seq for v in versions if any(s.covers(v.until_seq) for s in spans)), default=0)
    later = [v for v in versions if v.until_seq > max(last_seen, message.seq)]
    if not later:
        return Seen(message.body, message.state, message.edited_at)
    version = min(later, key=lambda v: v.until_seq)  # it holds the body that edit replaced
    if message.deleted_at is not None:
        return Seen(None, "deleted", version.edited_at)
    return Seen(version.body, "sent" if version.edited_at is None else "edited", version.edited_at)


class Listed(NamedTuple):
    """A conversation as one reader's inbox lists it."""

    last_activity_at: datetime
    message_count: int
    last_message_id: str | None
    last_message_seq: int | None
    last_message_author: str | None
    last_message_preview: str | None


def listed(
    created_at: datetime,
    messages: Iterable[Message],
    versions: Mapping[int, Sequence[Version]],
    spans: Iterable[Span],
    added_at: Iterable[datetime],
) -> Listed:
    """The conversation as a reader with `spans` sees it: the latest message they saw (as `seen`; its
    preview None once deleted), how many they saw are not deleted, and the latest of the creation, their
    additions (`added_at`: being added is news to them) and those messages' times.

    `versions` are the rows of `message_versions` by message seq.
    """
    spans = list(spans)
    visible = [(m, v) for m in messages if (v := seen(m, versions.get(m.seq, ()), spans)) is not None]
    activity = max([created_at, *added_at, *(m.sent_at for m, _ in visible)])
    count = sum(1 for _, v in visible if v.state != "deleted")
    if not visible:
        return Listed(activity, count, None, None, None, None)
    last, view = max(visible, key=lambda mv: mv[0].seq)
    shown = None if view.body is None else preview(view.body)
    return Listed(activity, count, last.message_id, last.seq, last.author, shown)
