"""The whole read model in memory: a full fold of log entries, the reference Postgres must equal."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from events.codec import decode
from events.exceptions import DecodeError
from events.log import LogEntry
from projector.exceptions import FoldError
from projector.fold import ConversationState, absorb, changes
from projector.rows import TABLE_OF, Row


@dataclass(slots=True)
class ReadModel:
    """Tables as {table: {primary key: row}}, plus the positions that became dead letters."""

    tables: dict[str, dict[tuple[Any, ...], Row]] = field(
        default_factory=lambda: {name: {} for name in TABLE_OF.values()}
    )
    states: dict[str, ConversationState] = field(default_factory=dict)
    dead_letters: dict[tuple[int, str], str] = field(default_factory=dict)
    archived: set[tuple[int, str]] = field(default_factory=set)

    def apply(self, entry: LogEntry) -> None:
        """Fold one entry; an undecodable or contradicting one becomes a dead letter, as in Postgres."""
        try:
            event = decode(entry.data)
        except DecodeError as exc:
            self.dead_letters[(entry.partition, entry.stream_id)] = str(exc)
            return
        self.archived.add((entry.partition, entry.stream_id))
        state = self.states.get(event.conversation_id)
        try:
            rows = changes(state, event, entry.stream_id)
        except FoldError as exc:
            self.dead_letters[(entry.partition, entry.stream_id)] = str(exc)
            return
        self.states[event.conversation_id] = absorb(state, rows)
        for row in rows:
            self.tables[TABLE_OF[type(row)]][row.key] = row


def fold_entries(entries: Iterable[LogEntry]) -> ReadModel:
    """Fold entries given in log order per partition (partitions may interleave in any way)."""
    model = ReadModel()
    for entry in entries:
        model.apply(entry)
    return model
