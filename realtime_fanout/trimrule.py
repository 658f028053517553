"""The trimmed-history rule, pure: may the streams alone serve every entry after a cursor, and if not,
can the archive serve the part they may have lost?

Sound on Redis 6.2 and 7 (`XINFO STREAM` replies as redis-py parses them, keys `first-entry`,
`last-generated-id`, `length`, and on 7 `entries-added`). A stream holds every entry after cursor C when C
is at or after its first entry (on an empty stream, its last-generated id), or, on Redis 7, when
`entries-added` equals `length` (nothing was ever trimmed or deleted; `max-deleted-entry-id` does not tell:
XTRIM leaves it at 0-0 on 7.0). Otherwise entries in (C, F) may be gone, F being that first/last id: the
archive serves up to F when its head is at or after F (it holds every entry up to its head, in order). On
Redis 6, which cannot tell, a cursor at "0-0" with nothing archived is assumed served.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from realtime_fanout.cursor import StreamKey, stream_key

ORIGIN: StreamKey = (0, 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Served:
    """Every entry after the cursor can be served: by the archive up to `archive_until` (inclusive), then
    by the stream; `archive_until` None: by the stream alone."""

    archive_until: str | None = None


@dataclass(frozen=True, slots=True)
class NotHeld:
    """Entries after the cursor may be trimmed and the archive does not hold them; `may_catch_up`: it may
    once the projector archives more (worth a short wait)."""

    reason: str
    may_catch_up: bool


def _bound(info: Mapping[Any, Any]) -> str:
    first = info.get("first-entry")
    return _text(first[0]) if first else _text(info.get("last-generated-id", "0-0"))


def _never_trimmed(info: Mapping[Any, Any]) -> bool:
    added = info.get("entries-added")  # Redis 7 only
    return added is not None and int(added) == int(info.get("length", -1))


def stream_holds(info: Mapping[Any, Any] | None, after: StreamKey) -> bool:
    """Whether the stream (its `XINFO STREAM` reply; None: no such key) holds every entry after `after`."""
    if info is None:
        return after == ORIGIN
    return stream_key(_bound(info)) <= after or _never_trimmed(info)


def history_plan(
    info: Mapping[Any, Any] | None, archive_head: StreamKey | None, after: StreamKey
) -> Served | NotHeld:
    """Where the entries after `after` come from, given the stream's `XINFO STREAM` reply (None: no such
    key) and the archive's head for the partition (None: nothing archived, or no archive)."""
    if stream_holds(info, after):
        return Served()
    if info is None:
        return NotHeld("the partition has no stream", may_catch_up=False)
    bound = _bound(info)
    if archive_head is not None and archive_head >= stream_key(bound):
        return Served(bound)
    if archive_head is None and after == ORIGIN and info.get("entries-added") is None:
        return Served()  # Redis 6 cannot tell whether "0-0" lost anything: assumed served
    return NotHeld(f"the stream starts at {bound} and the archive does not reach it", may_catch_up=True)
