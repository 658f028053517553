"""Fold a run of log entries into one batch: each changed row once, archive rows, dead letters. No I/O."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events.codec import decode
from events.exceptions import DecodeError
from events.log import LogEntry
from events.position import parse_stream_id
from events.schema import Envelope
from projector.exceptions import FoldCrashed, FoldError
from projector.fold import apply
from projector.state import Changes, ConversationState, Tables

ArchiveRow = tuple[str, int, str, int, int, str, str, int, str, str, Any, bytes]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry that could not be applied: kept with its raw bytes and the reason."""

    partition: int
    stream_id: str
    data: bytes
    error: str
    reason: str  # decode | fold | db (it could not be written, whatever the error)


class Archived(msgspec.Struct, frozen=True, gc=False):
    """An event to archive; its row is made while it is copied, so no row tuple waits in the batch
    (untracked, like the entry and event it holds: see `events.schema.Payload`)."""

    entry: LogEntry
    event: Envelope


@dataclass(slots=True)
class Batch:
    """What one transaction writes: each table's inserts and updates, the archive, the dead letters."""

    partition: int
    epoch: str
    after: str
    version: int = 0
    last: str = ""
    entries: int = 0
    tables: Tables = field(default_factory=dict)
    archive: list[Archived] = field(default_factory=list)
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

    A refused entry (FoldError) becomes a dead letter and changes nothing else; the batch moves past it.

    Raises:
        FoldCrashed: applying an entry failed otherwise; `states` may be half-changed and must be dropped.
    """
    changes = Changes()
    dead = batch.dead
    for entry, event in zip(entries, decoded, strict=True):
        if isinstance(event, DecodeError):
            dead.append(DeadLetter(entry.partition, entry.stream_id, entry.data, str(event), "decode"))
            continue
        if archive:
            batch.archive.append(Archived(entry, event))
        cid = event.conversation_id
        try:
            states[cid] = apply(states.get(cid), event, entry.stream_id, changes)
        except FoldError as exc:
            dead.append(DeadLetter(entry.partition, entry.stream_id, entry.data, f"FoldError: {exc}", "fold"))
        except Exception as exc:
            raise FoldCrashed(entry.partition, entry.stream_id, exc) from exc
    if entries:
        batch.entries += len(entries)
        batch.last = entries[-1].stream_id
    batch.tables = changes.drain()
    return batch
