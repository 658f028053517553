"""The whole read model in memory: a full fold of log entries, the reference Postgres must equal.

Production code of the audit (`projector.audit` compares the read models with it); tests use it too."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from events.codec import decode
from events.exceptions import DecodeError
from events.log import LogEntry
from projector.exceptions import FoldError
from projector.fold import apply
from projector.state import (
    RECORD_OF_TABLE,
    TABLE_OF,
    VERSIONS,
    Changes,
    ConversationState,
    Message,
    Record,
    Version,
    forget_bodies,
)


@dataclass(slots=True)
class ReadModel:
    """Tables as {table: {primary key: record}}, plus the positions that became dead letters."""

    tables: dict[str, dict[tuple[Any, ...], Record]] = field(
        default_factory=lambda: {name: {} for name in TABLE_OF.values()}
    )
    states: dict[str, ConversationState] = field(default_factory=dict)
    dead_letters: dict[tuple[int, str], str] = field(default_factory=dict)
    archived: set[tuple[int, str]] = field(default_factory=set)
    changes: Changes = field(default_factory=Changes)

    def apply(self, entry: LogEntry) -> None:
        """Fold one entry; an undecodable or contradicting one becomes a dead letter, as in Postgres."""
        try:
            event = decode(entry.data)
        except DecodeError as exc:
            self.dead_letters[(entry.partition, entry.stream_id)] = str(exc)
            return
        self.archived.add((entry.partition, entry.stream_id))
        cid = event.conversation_id
        try:
            self.states[cid] = apply(self.states.get(cid), event, entry.stream_id, self.changes)
        except FoldError as exc:
            self.dead_letters[(entry.partition, entry.stream_id)] = str(exc)
            return
        drained = self.changes.drain()
        for table, (inserts, updates) in drained.items():
            if table == VERSIONS:
                self._versions(inserts, updates)
                continue
            for record in (*inserts, *updates):
                row = RECORD_OF_TABLE[table].loaded(record.row())
                self.tables[table][row.key] = row
        forget_bodies(drained)

    def _versions(self, versions: list[Version], purged: list[Message]) -> None:
        """As the store writes them: a missing body copied from the message row, then the purges."""
        rows, messages = self.tables[VERSIONS], self.tables["messages"]
        for v in versions:
            body = v.body
            if body is None:
                body = messages[(v.conversation_id, v.seq)].body  # type: ignore[union-attr]
            row = Version.loaded((v.conversation_id, v.seq, v.until_seq, body, v.edited_at))
            rows[row.key] = row
        for m in purged:
            for key, stored in rows.items():
                if key[:2] == m.key:
                    stored.body = None  # type: ignore[union-attr]


def fold_entries(entries: Iterable[LogEntry]) -> ReadModel:
    """Fold entries given in log order per partition (partitions may interleave in any way)."""
    model = ReadModel()
    for entry in entries:
        model.apply(entry)
    return model
