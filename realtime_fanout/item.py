"""A log entry decoded once per process and shared by every session it is delivered to."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from events.codec import decode, encode
from events.exceptions import DecodeError
from events.log import LogEntry
from events.membership import concerns, is_private
from events.schema import Envelope
from realtime_fanout.cursor import StreamKey, stream_key


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
        if is_private(self.envelope):
            return (self.envelope.actor,)
        return concerns(self.envelope)


def decode_entry(entry: LogEntry) -> Item | None:
    """The entry as an Item, or None when its bytes are not a current event (it is then skipped)."""
    try:
        envelope = decode(entry.data)
    except DecodeError:
        return None
    return item_of(entry, envelope)


def item_of(entry: LogEntry, envelope: Envelope) -> Item:
    """The Item of an entry already decoded to `envelope`."""
    return Item(entry.partition, entry.stream_id, stream_key(entry.stream_id), envelope, encode(envelope))


@dataclass(frozen=True, slots=True)
class PageIndex:
    """Where a page's items are: positions per conversation, and per user those of the membership events
    that concern them."""

    by_conversation: dict[str, list[int]]
    concerning: dict[str, list[int]]


class IndexedItems(list[Item]):
    """A history page's items (in log order) with an index built on first use, once per page: every
    session replaying a shared page looks up its own conversations instead of judging every item."""

    @cached_property
    def lookup(self) -> PageIndex:
        by_conversation: dict[str, list[int]] = {}
        concerning: dict[str, list[int]] = {}
        for n, item in enumerate(self):
            by_conversation.setdefault(item.envelope.conversation_id, []).append(n)
            for user in concerns(item.envelope):
                concerning.setdefault(user, []).append(n)
        return PageIndex(by_conversation, concerning)
