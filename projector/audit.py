"""`python -m projector audit`: check a live deployment's guarantees against its log, archive, read models.

The checks are pure functions of an `AuditInput` (gathered by `gather`, the only I/O): the streams and the
archive agree byte for byte and have no hole; seq per conversation is 1..n; the read models equal the fold
of the log up to their checkpoint; idempotency records point at their events; and, given a record of what
clients received (`--received`, format in README "Audit"), every subscriber got exactly what it may see.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events.codec import decode
from events.cursor import decode_cursor
from events.exceptions import DecodeError
from events.layout import LogLayout
from events.log import LogEntry
from events.position import parse_stream_id
from events.schema import (
    ConversationArchived,
    ConversationCreated,
    ConversationUnarchived,
    Envelope,
    ParticipantAdded,
    ParticipantRemoved,
)
from projector.model import fold_entries
from projector.state import Record

MAX_EXAMPLES = 10  # violations listed per check; the count is always complete
StreamKey = tuple[int, int]
Tables = dict[str, dict[tuple[Any, ...], Record]]


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """One `{ns}:{pN}:idem:<user>:<key>` record: the answer a retry of that command replays."""

    partition: int
    user_id: str
    key: str
    seq: int
    stream_id: str


def parse_idempotency_record(partition: int, user_id: str, key: str, value: bytes) -> IdempotencyRecord:
    """Read a record written by `command_api/append.lua` (`fingerprint\\nseq\\nstream_id\\nmemo`).

    Raises:
        ValueError: the value is not in that form.
    """
    _fingerprint, seq, stream_id, *_memo = value.decode().split("\n", 3)
    parse_stream_id(stream_id)
    return IdempotencyRecord(partition, user_id, key, int(seq), stream_id)


@dataclass(slots=True)
class PartitionInput:
    """What one partition holds: its stream (oldest first), its archive and dead letters of this epoch."""

    partition: int
    stream: list[LogEntry]
    archive: list[LogEntry]
    dead_letters: dict[str, bytes]
    checkpoint: str = "0-0"
    checkpoint_epoch: str | None = None
    events_applied: int = 0
    entries_added: int | None = None  # Redis 7 XINFO STREAM; None on 6.2
    last_generated: str = "0-0"


@dataclass(frozen=True, slots=True)
class Window:
    """Stream-id milliseconds [since_ms, until_ms) the archive and seq checks look at (None: unbounded)."""

    since_ms: int | None = None
    until_ms: int | None = None

    def holds(self, stream_id: str) -> bool:
        ms = parse_stream_id(stream_id)[0]
        return (self.since_ms is None or ms >= self.since_ms) and (
            self.until_ms is None or ms < self.until_ms
        )

    @property
    def whole(self) -> bool:
        return self.since_ms is None and self.until_ms is None


@dataclass(slots=True)
class AuditInput:
    epoch: str
    layout: LogLayout
    partitions: list[PartitionInput]
    tables: Tables
    idempotency: list[IdempotencyRecord] = field(default_factory=list)
    redriven: int = 0
    sample: set[str] | None = None  # conversations the fold check covers; None: all
    window: Window = field(default_factory=Window)
    received: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class CheckResult:
    name: str
    checked: int = 0
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.violations += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)

    @property
    def ok(self) -> bool:
        return self.violations == 0


@dataclass(slots=True)
class Report:
    epoch: str
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        lines = [f"audit of log epoch {self.epoch}: {'OK' if self.ok else 'VIOLATIONS FOUND'}"]
        for c in self.checks:
            verdict = "ok" if c.ok else f"{c.violations} violation(s)"
            lines.append(f"- {c.name}: {verdict} ({c.checked} checked)")
            lines += [f"    ! {e}" for e in c.examples]
            if c.violations > len(c.examples):
                lines.append(f"    ! ... and {c.violations - len(c.examples)} more")
            lines += [f"    note: {n}" for n in c.notes]
        return "\n".join(lines)

    def json(self) -> bytes:
        checks = [_Wire(c.name, c.ok, c.checked, c.violations, c.examples, c.notes) for c in self.checks]
        return msgspec.json.encode({"epoch": self.epoch, "ok": self.ok, "checks": checks})


class _Wire(msgspec.Struct):
    name: str
    ok: bool
    checked: int
    violations: int
    examples: list[str]
    notes: list[str]


def _key(stream_id: str) -> StreamKey:
    return parse_stream_id(stream_id)


def _decoded(data: bytes) -> Envelope | None:
    try:
        return decode(data)
    except DecodeError:
        return None


def history(part: PartitionInput) -> list[LogEntry]:
    """Every entry the partition ever had, in log order: archive, dead letters, then the stream's tail."""
    merged: dict[str, LogEntry] = {e.stream_id: e for e in part.stream}
    for sid, data in part.dead_letters.items():
        merged.setdefault(sid, LogEntry(part.partition, sid, data))
    for e in part.archive:
        merged[e.stream_id] = e
    return sorted(merged.values(), key=lambda e: _key(e.stream_id))


def check_archive(audit: AuditInput) -> CheckResult:
    """Stream entries up to the checkpoint are archived byte for byte (or, undecodable, dead letters); no
    hole: archive, dead letters and stream together hold every entry the stream ever had (Redis 7)."""
    result = CheckResult("streams and archive agree, no hole")
    ahead = 0
    for part in audit.partitions:
        p, checkpoint = part.partition, _key(part.checkpoint)
        ahead += sum(1 for e in part.stream if _key(e.stream_id) > checkpoint)
        archived = {e.stream_id: e.data for e in part.archive}
        keys = [_key(e.stream_id) for e in part.archive]
        if keys != sorted(set(keys)):
            result.fail(f"partition {p}: archive rows are not in strictly increasing stream order")
        for entry in part.stream:
            if _key(entry.stream_id) > checkpoint or not audit.window.holds(entry.stream_id):
                continue
            result.checked += 1
            where = f"partition {p} entry {entry.stream_id}"
            if _decoded(entry.data) is None:
                if part.dead_letters.get(entry.stream_id) != entry.data:
                    result.fail(f"{where}: undecodable but not a dead letter with the same bytes")
            elif entry.stream_id not in archived:
                result.fail(f"{where}: projected but missing from the archive")
            elif archived[entry.stream_id] != entry.data:
                result.fail(f"{where}: archived bytes differ from the stream's")
        known = {*archived, *part.dead_letters}
        upto = sum(1 for sid in known if _key(sid) <= checkpoint)
        if upto != part.events_applied:
            result.fail(f"partition {p}: checkpoint counts {part.events_applied} entries applied, "
                        f"archive and dead letters hold {upto} up to it")  # fmt: skip
        if not audit.window.whole:
            continue
        if part.entries_added is None:
            continue
        last = _key(part.last_generated)
        held = len({sid for sid in (*known, *(e.stream_id for e in part.stream)) if _key(sid) <= last})
        if held != part.entries_added:
            result.fail(f"partition {p}: the stream had {part.entries_added} entries added, archive, dead "
                        f"letters and stream hold {held}: {part.entries_added - held} lost")  # fmt: skip
    if ahead:
        result.notes.append(f"{ahead} stream entries after the checkpoints, not projected yet: not compared")
    if any(part.entries_added is None for part in audit.partitions):
        result.notes.append(
            "Redis 6.2 has no entries-added count: holes are checked by the checkpoint's events_applied "
            "against the archive and dead letters, and by seq continuity per conversation"
        )
    if not audit.window.whole:
        result.notes.append("windowed: the entries-added hole count needs the whole log and was skipped")
    return result


def check_sequences(audit: AuditInput) -> CheckResult:
    """Per conversation, in log order, seq is 1, 2, ... without gap or repeat; event ids are unique."""
    result = CheckResult("seq per conversation is 1..n, event ids unique")
    last: dict[str, int] = {}
    seen: set[str] = set()
    for part in audit.partitions:
        for entry in history(part):
            if not audit.window.holds(entry.stream_id):
                continue
            event = _decoded(entry.data)
            if event is None:
                continue
            result.checked += 1
            cid, where = event.conversation_id, f"partition {part.partition} entry {entry.stream_id}"
            if event.event_id in seen:
                result.fail(f"{where}: event id {event.event_id} appears twice")
            seen.add(event.event_id)
            expected = last[cid] + 1 if cid in last else (1 if audit.window.since_ms is None else event.seq)
            if event.seq != expected:
                result.fail(f"{where}: conversation {cid} has seq {event.seq} where {expected} was due")
            if audit.layout.partition_for(cid) != part.partition:
                result.fail(f"{where}: conversation {cid} belongs to partition "
                            f"{audit.layout.partition_for(cid)}")  # fmt: skip
            last[cid] = max(event.seq, last.get(cid, 0))
    return result


def fold_input(audit: AuditInput) -> list[LogEntry]:
    """The entries the read models have applied (up to each checkpoint), restricted to the sample."""
    entries: list[LogEntry] = []
    for part in audit.partitions:
        checkpoint = _key(part.checkpoint)
        for entry in history(part):
            if _key(entry.stream_id) > checkpoint:
                break
            if audit.sample is not None:
                event = _decoded(entry.data)
                if event is None or event.conversation_id not in audit.sample:
                    continue
            entries.append(entry)
    return entries


def check_fold(audit: AuditInput) -> CheckResult:
    """Every read-model row equals the one the reference fold (`projector.model`) computes from the log."""
    scope = "all conversations" if audit.sample is None else f"a sample of {len(audit.sample)} conversations"
    result = CheckResult(f"read models equal the fold of the log ({scope})")
    for part in audit.partitions:
        if part.checkpoint_epoch not in (None, audit.epoch):
            result.fail(f"partition {part.partition}: read models follow epoch {part.checkpoint_epoch}")
    model = fold_entries(fold_input(audit))
    tables = audit.tables if audit.sample is None else filter_tables(audit.tables, audit.sample)
    for table, rows in model.tables.items():
        live = tables.get(table, {})
        for key in sorted({*rows, *live}, key=repr):
            result.checked += 1
            want, got = rows.get(key), live.get(key)
            if want != got:
                result.fail(f"{table} {key}: fold gives {want!r}, read model has {got!r}")
    if audit.redriven:
        result.notes.append(f"{audit.redriven} re-driven dead letters: the fold does not re-apply them")
    elif audit.sample is None:
        dead = {(p.partition, sid) for p in audit.partitions for sid in p.dead_letters
                if _key(sid) <= _key(p.checkpoint)}  # fmt: skip
        for key in sorted(dead ^ set(model.dead_letters)):
            result.fail(f"dead letter {key}: the fold says {model.dead_letters.get(key)!r}, the store "
                        f"{'has it' if key in dead else 'has none'}")  # fmt: skip
    return result


def check_idempotency(audit: AuditInput) -> CheckResult:
    """Each idempotency record names an event that exists, of its user, key and seq."""
    result = CheckResult("idempotency records point at events that exist")
    events = {(p.partition, e.stream_id): e.data for p in audit.partitions for e in history(p)}
    for rec in audit.idempotency:
        result.checked += 1
        where = f"record {rec.user_id}:{rec.key} (partition {rec.partition})"
        data = events.get((rec.partition, rec.stream_id))
        event = None if data is None else _decoded(data)
        if event is None:
            result.fail(f"{where}: no event at {rec.stream_id}")
        elif (event.actor, event.idempotency_key, event.seq) != (rec.user_id, rec.key, rec.seq):
            result.fail(f"{where}: event at {rec.stream_id} is {event.actor}'s {event.idempotency_key!r} "
                        f"seq {event.seq}, the record says seq {rec.seq}")  # fmt: skip
    return result


# --- what clients received ---------------------------------------------------------------------------


def may_see(user: str, event: Envelope, member_before: bool) -> tuple[bool, bool]:
    """(whether `user` may see `event`, whether they are a participant after it): README "Realtime
    fanout": from the event that added them up to and including the one that removed them; archiving
    only to its actor. Restated here on purpose: the oracle must not share the fanout's code."""
    payload = event.payload
    if isinstance(payload, ConversationCreated):
        member = user == event.actor or user in payload.participants
        return member, member
    if isinstance(payload, ParticipantAdded) and payload.user_id == user:
        return True, True
    if isinstance(payload, ParticipantRemoved) and payload.user_id == user:
        return member_before, False
    if isinstance(payload, ConversationArchived | ConversationUnarchived):
        return event.actor == user, member_before
    return member_before, member_before


@dataclass(frozen=True, slots=True)
class Positioned:
    partition: int
    key: StreamKey
    event: Envelope


def log_events(audit: AuditInput) -> list[Positioned]:
    return [
        Positioned(part.partition, _key(e.stream_id), event)
        for part in audit.partitions
        for e in history(part)
        if (event := _decoded(e.data)) is not None
    ]


def visible(user: str, events: Iterable[Positioned], conversations: set[str] | None) -> list[Positioned]:
    """The events `user` may see, in log order, under a subscription filtered to `conversations`."""
    member: dict[str, bool] = {}
    out: list[Positioned] = []
    for pe in events:
        cid = pe.event.conversation_id
        sees, member[cid] = may_see(user, pe.event, member.get(cid, False))
        private = isinstance(pe.event.payload, ConversationArchived | ConversationUnarchived)
        if sees and (conversations is None or cid in conversations or private):
            out.append(pe)
    return out


@dataclass(slots=True)
class _Segment:
    """A stretch of one subscriber's record between resyncs: from `start` to the last cursor it saw."""

    start: list[StreamKey] | None
    end: list[StreamKey] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _positions(cursor: str, epoch: str, partitions: int) -> list[StreamKey]:
    wire = decode_cursor(cursor)
    if wire.epoch != epoch or len(wire.positions) != partitions:
        raise ValueError(f"cursor of epoch {wire.epoch} with {len(wire.positions)} partitions")
    return [_key(p) for p in wire.positions]


def _segments(lines: list[dict[str, Any]], epoch: str, partitions: int) -> Iterator[_Segment]:
    segment: _Segment | None = None
    for line in lines:
        kind = line.get("kind")
        if kind == "subscribe" and segment is None:
            cursor = line.get("cursor")
            segment = _Segment(None if cursor is None else _positions(cursor, epoch, partitions))
        elif segment is None:
            raise ValueError(f"a {kind!r} line before the subscriber's first subscribe")
        elif kind == "resync":
            yield segment
            segment = _Segment(_positions(line["position"], epoch, partitions))
        elif kind in ("event", "live"):
            if kind == "event":
                segment.events.append(line["event"])
            if line.get("cursor") is not None:
                end = _positions(line["cursor"], epoch, partitions)
                if segment.start is None:
                    segment.start = end
                segment.end = end
    if segment is not None:
        yield segment


def check_received(audit: AuditInput) -> CheckResult:
    """Each subscriber received, per partition, exactly the events it may see after its cursor up to the
    last cursor it was handed: none missing, none twice, in order (resyncs start a new stretch)."""
    result = CheckResult("subscribers got exactly what they may see, once, in order")
    assert audit.received is not None
    by_subscriber: dict[str, list[dict[str, Any]]] = {}
    for line in audit.received:
        by_subscriber.setdefault(str(line["subscriber"]), []).append(line)
    events = log_events(audit)
    n = audit.layout.partitions
    resyncs = 0
    for sid, lines in sorted(by_subscriber.items()):
        user = str(lines[0]["user"])
        filt = next((ln.get("conversations") for ln in lines if ln.get("kind") == "subscribe"), None)
        may = visible(user, events, None if filt is None else set(filt))
        try:
            segments = list(_segments(lines, audit.epoch, n))
        except (ValueError, KeyError, TypeError) as exc:
            result.fail(f"subscriber {sid}: unreadable record: {exc}")
            continue
        resyncs += len(segments) - 1
        for seg in segments:
            if seg.start is None or seg.end is None:
                if seg.events:
                    result.fail(f"subscriber {sid}: events received without any cursor")
                continue
            start, end = seg.start, seg.end
            for p in range(n):
                result.checked += 1
                want = [pe.event.event_id for pe in may if pe.partition == p and start[p] < pe.key <= end[p]]
                got = [str(e.get("event_id")) for e in seg.events
                       if audit.layout.partition_for(str(e.get("conversation_id"))) == p]  # fmt: skip
                if got != want:
                    result.fail(f"subscriber {sid} ({user}) partition {p}: {_difference(want, got)}")
    if resyncs:
        result.notes.append(f"{resyncs} resync(s): each starts a new stretch at the position it names")
    return result


def _difference(want: list[str], got: list[str]) -> str:
    missing = [e for e in want if e not in set(got)]
    extra = [e for e in got if e not in set(want)]
    twice = sorted({e for e in got if got.count(e) > 1})
    parts = [f"{len(missing)} missing (first {missing[:3]})" if missing else "",
             f"{len(extra)} not theirs to see or outside the cursors (first {extra[:3]})" if extra else "",
             f"{len(twice)} received twice (first {twice[:3]})" if twice else ""]  # fmt: skip
    text = "; ".join(p for p in parts if p)
    return text or f"out of order: expected {want[:5]}..., got {got[:5]}..."


def run_checks(audit: AuditInput) -> Report:
    """Every check over one gathered input."""
    checks = [check_archive(audit), check_sequences(audit), check_fold(audit), check_idempotency(audit)]
    if audit.received is not None:
        checks.append(check_received(audit))
    return Report(audit.epoch, checks)


def choose_sample(audit: AuditInput, n: int, seed: int) -> set[str]:
    """`n` conversations picked at random (reproducibly by `seed`) among those in the log."""
    conversations = sorted({pe.event.conversation_id for pe in log_events(audit)})
    return set(random.Random(seed).sample(conversations, min(n, len(conversations))))


def filter_tables(tables: Mapping[str, Mapping[tuple[Any, ...], Record]], conversations: set[str]) -> Tables:
    """Only the rows of `conversations` (every read-model row carries its conversation_id)."""
    return {
        table: {k: r for k, r in rows.items() if getattr(r, "conversation_id", None) in conversations}
        for table, rows in tables.items()
    }
