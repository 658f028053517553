"""Fold a run of log entries into one batch: coalesced rows per table, archive rows, dead letters. No I/O."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.codec import decode
from events.exceptions import DecodeError
from events.log import LogEntry
from events.position import parse_stream_id
from events.schema import Envelope
from projector.fold import ConversationState, absorb, changes
from projector.rows import ROW_TYPES, Row

ArchiveRow = tuple[str, int, str, int, int, str, str, int, str, str, Any, bytes]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry that could not be applied: kept with its raw bytes and the reason."""

    partition: int
    stream_id: str
    data: bytes
    error: str
    reason: str  # decode | fold | db


@dataclass(slots=True)
class Batch:
    """What one transaction writes: every table's final rows by key, the archive, the dead letters."""

    partition: int
    epoch: str
    after: str
    version: int = 0
    last: str = ""
    entries: int = 0
    rows: dict[type[Row], dict[tuple[Any, ...], Row]] = field(
        default_factory=lambda: {t: {} for t in ROW_TYPES}
    )
    archive: list[ArchiveRow] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


def decode_entries(entries: Sequence[LogEntry]) -> list[Envelope | DecodeError]:
    """Each entry decoded, or the DecodeError that says why not."""
    out: list[Envelope | DecodeError] = []
    for entry in entries:
        try:
            out.append(decode(entry.data))
        except DecodeError as exc:
            out.append(exc)
    return out


def archive_row(epoch: str, entry: LogEntry, event: Envelope) -> ArchiveRow:
    ms, seq = parse_stream_id(entry.stream_id)
    return (
        epoch, entry.partition, entry.stream_id, ms, seq, event.event_id, event.conversation_id,
        event.seq, event.type, event.actor, event.occurred_at, entry.data,
    )  # fmt: skip


def fold_batch(
    batch: Batch,
    entries: Sequence[LogEntry],
    decoded: Sequence[Envelope | DecodeError],
    states: MutableMapping[str, ConversationState],
    *,
    archive: bool = True,
) -> Batch:
    """Fold `entries` into `batch`, moving `states` forward; every conversation's state must be loaded.

    A failing entry becomes a dead letter and changes nothing else; the batch still moves past it.
    """
    for entry, event in zip(entries, decoded, strict=True):
        batch.entries += 1
        batch.last = entry.stream_id
        if isinstance(event, DecodeError):
            batch.dead.append(DeadLetter(entry.partition, entry.stream_id, entry.data, str(event), "decode"))
            continue
        if archive:
            batch.archive.append(archive_row(batch.epoch, entry, event))
        state = states.get(event.conversation_id)
        try:
            rows = changes(state, event, entry.stream_id)
            new_state = absorb(state, rows)
        except Exception as exc:  # any failure to apply one event makes it a dead letter
            error = f"{type(exc).__name__}: {exc}"
            batch.dead.append(DeadLetter(entry.partition, entry.stream_id, entry.data, error, "fold"))
            continue
        states[event.conversation_id] = new_state
        for row in rows:
            batch.rows[type(row)][row.key] = row
    return batch
