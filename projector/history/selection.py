"""What an analyst asks to replay: a range of the log and filters, parsed and checked without I/O.

Bounds are per partition keys `(ms, seq)` of Redis stream ids: `after` is exclusive, `until` inclusive.
`--from`/`--to` take a position token (`epoch.partition.stream_id`, as the command API returns it; it
cuts every partition at that stream id, exactly so on its own partition) or a fanout cursor (exact on
every partition). `--since`/`--until` cut by log time, the millisecond part of the stream id (within
milliseconds of `occurred_at`): since inclusive, until exclusive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from events.cursor import decode_cursor
from events.position import LogPosition, parse_stream_id
from events.schema import CURRENT_VERSIONS
from projector.exceptions import SelectionError

StreamKey = tuple[int, int]
# Postgres stores stream seqs as bigint and Redis never comes near it: a key past every real entry of a ms.
MAX_SEQ = 2**63 - 1
START: StreamKey = (0, 0)  # "after 0-0": every entry


@dataclass(frozen=True, slots=True)
class Bound:
    """A position parsed from a token or cursor: one key per partition, in `epoch`."""

    epoch: str
    keys: tuple[StreamKey, ...]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events to replay: per partition `after < key <= until` (None: no end), and the filters."""

    partitions: tuple[int, ...]
    after: tuple[StreamKey, ...]
    until: tuple[StreamKey | None, ...]
    conversations: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    actors: frozenset[str] = frozenset()
    epoch: str | None = None

    @property
    def bounded(self) -> bool:
        return all(u is not None for u in self.until)

    def keeps(self, conversation_id: str, event_type: str, actor: str) -> bool:
        """The filters alone (the range is the reader's): what a stream entry is checked against."""
        return (
            (not self.conversations or conversation_id in self.conversations)
            and (not self.types or event_type in self.types)
            and (not self.actors or actor in self.actors)
        )


def parse_bound(text: str, partitions: int) -> Bound:
    """A position token or a fanout cursor, as one key per partition.

    Raises:
        SelectionError: it is neither, or names another partition count.
    """
    text = text.strip()
    if text.count(".") == 2:
        try:
            position = LogPosition.from_token(text)
        except ValueError as exc:
            raise SelectionError(f"malformed position {text!r}: {exc}", "invalid-position") from None
        if not 0 <= position.partition < partitions:
            raise SelectionError(
                f"position {text!r} names partition {position.partition}; the log has {partitions}",
                "invalid-position",
            )
        key = parse_stream_id(position.stream_id)
        return Bound(position.epoch, (key,) * partitions)
    try:
        wire = decode_cursor(text)
    except ValueError as exc:
        raise SelectionError(
            f"malformed position {text!r}: neither a position token nor a cursor ({exc})", "invalid-position"
        ) from None
    if len(wire.positions) != partitions:
        raise SelectionError(
            f"cursor has {len(wire.positions)} partitions; the log has {partitions}", "invalid-position"
        )
    return Bound(wire.epoch, tuple(parse_stream_id(p) for p in wire.positions))


def parse_time(text: str) -> int:
    """An ISO 8601 instant as unix milliseconds; a time without a zone is UTC.

    Raises:
        SelectionError: it is not ISO 8601.
    """
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise SelectionError(
            f"malformed time {text!r}: give ISO 8601, e.g. 2026-12-01T09:30:00Z", "invalid-time"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


def select(
    partitions: int,
    partition_of: Callable[[str], int],
    *,
    start: str | None = None,
    end: str | None = None,
    since: str | None = None,
    until: str | None = None,
    conversations: Iterable[str] = (),
    types: Iterable[str] = (),
    actors: Iterable[str] = (),
) -> Selection:
    """Build a `Selection` from the user's words; `partition_of(conversation_id)` is the log layout's.

    Raises:
        SelectionError: a malformed position or time, an unknown event type, a range that ends before it
            starts, or bounds from two different log epochs.
    """
    wanted_types = frozenset(types)
    unknown = sorted(wanted_types - CURRENT_VERSIONS.keys())
    if unknown:
        raise SelectionError(
            f"unknown event type {', '.join(unknown)}; known: {', '.join(sorted(CURRENT_VERSIONS))}",
            "unknown-event-type",
        )
    lower = parse_bound(start, partitions) if start else None
    upper = parse_bound(end, partitions) if end else None
    if lower and upper and lower.epoch != upper.epoch:
        raise SelectionError(
            f"from is in log epoch {lower.epoch} but to in {upper.epoch}", "position-from-another-log"
        )
    since_ms = parse_time(since) if since else None
    until_ms = parse_time(until) if until else None
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise SelectionError(f"until {until} is not after since {since}: the range is empty", "empty-range")

    after = [lower.keys[p] if lower else START for p in range(partitions)]
    ends: list[StreamKey | None] = [upper.keys[p] if upper else None for p in range(partitions)]
    for p in range(partitions):
        if since_ms is not None:
            after[p] = max(after[p], (since_ms - 1, MAX_SEQ))
        if until_ms is not None:
            cap = (until_ms - 1, MAX_SEQ)
            current = ends[p]
            ends[p] = cap if current is None else min(current, cap)
    if lower and upper and any(u is not None and u < a for a, u in zip(lower.keys, upper.keys, strict=True)):
        raise SelectionError("to is before from: the range is empty", "empty-range")

    chosen = frozenset(conversations)
    wanted = sorted({partition_of(c) for c in chosen}) if chosen else list(range(partitions))
    return Selection(
        partitions=tuple(wanted),
        after=tuple(after),
        until=tuple(ends),
        conversations=chosen,
        types=wanted_types,
        actors=frozenset(actors),
        epoch=lower.epoch if lower else upper.epoch if upper else None,
    )


def key_text(key: StreamKey) -> str:
    return f"{key[0]}-{key[1]}"


def check_epoch(selection: Selection, log_epoch: str) -> None:
    """Raises SelectionError when the bounds were taken in another incarnation of the log."""
    if selection.epoch is not None and selection.epoch != log_epoch:
        raise SelectionError(
            f"the position is from log epoch {selection.epoch}, but the log is at epoch {log_epoch}: "
            "it was recreated; positions of the old log mean nothing in the new one",
            "position-from-another-log",
        )
