"""The Postgres adapter: load conversation states, and commit a batch with its checkpoint atomically.

One transaction per batch: lock the partition's checkpoint row (FOR UPDATE), refuse unless it is exactly
where the batch was folded from and in the same epoch, check the lease, COPY the archive, write the rows
(new ones straight into their tables, changed ones upserted from staging), record dead letters, move the
checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from events import schema
from events.schema import Envelope
from projector.batch import Batch, DeadLetter, archive_row
from projector.exceptions import CheckpointMoved, EpochMismatch, LeaseLost
from projector.migrate import LIVE_SCHEMA, STORE_SCHEMA
from projector.state import VERSIONS, Conversation, ConversationState, Inbox, Message, Span, Tables, Version

AsyncConn = psycopg.AsyncConnection[Any]

_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "conversations": (Conversation.columns(), ("conversation_id",)),
    "memberships": (Span.columns(), ("conversation_id", "user_id", "joined_seq")),
    VERSIONS: (Version.columns(), ("conversation_id", "seq", "until_seq")),
    "messages": ((*Message.columns(), "state"), ("conversation_id", "seq")),
    "inbox": (Inbox.columns(), ("user_id", "conversation_id")),
}
_ARCHIVE_COLUMNS = (
    "epoch", "partition", "stream_id", "stream_ms", "stream_seq", "event_id", "conversation_id",
    "seq", "type", "actor", "occurred_at", "data",
)  # fmt: skip


_MESSAGE_STATE = "conversation_id, seq, message_id, author, NULL, sent_at, reply_to, edited_at, deleted_at"
"""A message as the fold holds it: every column but the body (`Message` order)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    partition: int
    epoch: str | None
    stream_id: str
    events_applied: int
    version: int = 0


class Store:
    """Reads and writes one read-model schema (`parley` when live) plus the shared `parley_store`."""

    def __init__(self, schema: str = LIVE_SCHEMA, *, archive: bool = True) -> None:
        """`archive=False` (a rebuild): the durable store already holds this history, so no archive rows
        are written and dead letters already recorded are left as they are (re-driven ones stay so)."""
        self.schema = schema
        self.archive = archive
        self._s = sql.Identifier(schema)
        self._copy_types: dict[str, list[int]] = {}
        self._statements: dict[str, tuple[sql.Composed, sql.Composed, sql.Composed]] = {
            table: self._statements_of(table) for table in _COLUMNS
        }
        self._versions_insert, self._versions_purge = self._versions_statements()
        self._archive_copy = sql.SQL("COPY {}.event_archive ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(STORE_SCHEMA), sql.SQL(", ").join(map(sql.Identifier, _ARCHIVE_COLUMNS))
        )

    def _statements_of(self, table: str) -> tuple[sql.Composed, sql.Composed, sql.Composed]:
        """(COPY into the table, COPY into its staging table, upsert from staging) for `table`."""
        columns, key = _COLUMNS[table]
        stage = sql.Identifier(f"stage_{table}")
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        insert = sql.SQL("COPY {}.{} ({}) FROM STDIN (FORMAT BINARY)").format(
            self._s, sql.Identifier(table), cols
        )
        copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(stage, cols)
        updates = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in columns if c not in key
        )
        upsert = sql.SQL(
            "INSERT INTO {s}.{t} ({cols}) SELECT {cols} FROM {stage} "
            "ON CONFLICT ({key}) DO UPDATE SET {updates}"
        ).format(
            s=self._s, t=sql.Identifier(table), cols=cols, stage=stage, updates=updates,
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
        )  # fmt: skip
        return insert, copy, upsert

    def _versions_statements(self) -> tuple[sql.Composed, sql.Composed]:
        """(insert the staged versions, copying a body the fold did not have from the message row as it
        is before this batch's update; clear the bodies of the versions of the deleted messages given)."""
        insert = sql.SQL(
            "INSERT INTO {s}.message_versions (conversation_id, seq, until_seq, body, edited_at) "
            "SELECT v.conversation_id, v.seq, v.until_seq, coalesce(v.body, m.body), v.edited_at "
            "FROM stage_message_versions v LEFT JOIN {s}.messages m USING (conversation_id, seq)"
        ).format(s=self._s)
        purge = sql.SQL(
            "UPDATE {s}.message_versions v SET body = NULL FROM unnest(%s::text[], %s::bigint[]) d (c, q) "
            "WHERE v.conversation_id = d.c AND v.seq = d.q AND v.body IS NOT NULL"
        ).format(s=self._s)
        return insert, purge

    async def _column_types(
        self, conn: AsyncConn, table: str, qualified: str, columns: tuple[str, ...]
    ) -> list[int]:
        """The type oids of `columns` of `qualified` (binary COPY needs them), read once per Store."""
        known = self._copy_types.get(table)
        if known is None:
            cur = await conn.execute(
                "SELECT attname, atttypid::int FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0",
                (qualified,),
            )
            oids = {name: oid for name, oid in await cur.fetchall()}
            known = self._copy_types[table] = [oids[c] for c in columns]
        return known

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._s)

    async def prepare_connection(self, conn: AsyncConn) -> None:
        """Create this session's staging tables (temporary, emptied at every commit)."""
        for table, (columns, _) in _COLUMNS.items():
            await conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                    "SELECT {cols} FROM {s}.{t} WITH NO DATA"
                ).format(
                    stage=sql.Identifier(f"stage_{table}"),
                    cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
                    s=self._s, t=sql.Identifier(table),
                )
            )  # fmt: skip
        await conn.commit()

    async def ensure_checkpoints(self, conn: AsyncConn, partitions: Iterable[int]) -> None:
        async with conn.transaction():
            for p in partitions:
                await conn.execute(
                    self._q("INSERT INTO {s}.checkpoints (partition) VALUES (%s) ON CONFLICT DO NOTHING"),
                    (p,),
                )

    async def checkpoint(self, conn: AsyncConn, partition: int) -> Checkpoint:
        cur = await conn.execute(
            self._q(
                "SELECT epoch, stream_id, events_applied, version FROM {s}.checkpoints WHERE partition = %s"
            ),
            (partition,),
        )
        row = await cur.fetchone()
        if row is None:
            return Checkpoint(partition, None, "0-0", 0)
        return Checkpoint(partition, row[0], row[1], row[2], row[3])

    async def checkpoints(self, conn: AsyncConn) -> dict[int, Checkpoint]:
        cur = await conn.execute(
            self._q("SELECT partition, epoch, stream_id, events_applied FROM {s}.checkpoints")
        )
        return {r[0]: Checkpoint(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()}

    async def load_states(
        self, conn: AsyncConn, ids: Iterable[str], window: int | None = None
    ) -> dict[str, ConversationState]:
        """The fold state of every existing conversation among `ids` (message bodies left out), holding its
        newest `window` messages (None: all; `ConversationState.held_after` says where they start)."""
        wanted = list(ids)
        if not wanted:
            return {}
        states: dict[str, ConversationState] = {}
        cur = await conn.execute(
            sql.SQL("SELECT {cols} FROM {s}.conversations WHERE conversation_id = ANY(%s)").format(
                cols=sql.SQL(", ").join(map(sql.Identifier, Conversation.columns())), s=self._s
            ),
            (wanted,),
        )
        for r in await cur.fetchall():
            states[r[0]] = ConversationState(Conversation.loaded(r))
        if not states:
            return states
        present = list(states)
        cur = await conn.execute(
            self._q(
                "SELECT conversation_id, user_id, joined_seq, joined_stream_id, left_seq, left_stream_id "
                "FROM {s}.memberships WHERE conversation_id = ANY(%s) "
                "ORDER BY conversation_id, user_id, joined_seq"
            ),
            (present,),
        )
        for r in await cur.fetchall():
            states[r[0]].spans.setdefault(r[1], []).append(Span.loaded(r))
        cur = await conn.execute(
            sql.SQL("SELECT {cols} FROM {s}.inbox WHERE conversation_id = ANY(%s)").format(
                cols=sql.SQL(", ").join(map(sql.Identifier, Inbox.columns())), s=self._s
            ),
            (present,),
        )
        for r in await cur.fetchall():
            states[r[1]].inbox[r[0]] = Inbox.loaded(r)
        # The newest window + 1 of each conversation (all: LIMIT NULL), newest first, from the primary key's
        # index: one more than held says where the held ones start.
        cur = await conn.execute(
            self._q(
                f"SELECT m.* FROM unnest(%s::text[]) c(id) CROSS JOIN LATERAL (SELECT {_MESSAGE_STATE} "
                "FROM {s}.messages WHERE conversation_id = c.id ORDER BY seq DESC LIMIT %s) m"
            ),
            (present, None if window is None else window + 1),
        )
        newest_first: dict[str, list[Any]] = {}
        for r in await cur.fetchall():
            newest_first.setdefault(r[0], []).append(r)
        for cid, rows in newest_first.items():
            state = states[cid]
            if window is not None and len(rows) > window:
                state.held_after = rows.pop()[1]
            for r in reversed(rows):
                state.messages[r[2]] = Message.loaded(r)
        return states

    async def load_needs(
        self, conn: AsyncConn, states: Mapping[str, ConversationState], events: Iterable[Envelope | Exception]
    ) -> None:
        """Load into each state's `older` the messages below its window that `events` need: those an edit
        or delete names, and all those after a read marker a `MessagesRead` sets below the window."""
        ids: dict[str, set[str]] = {}
        after: dict[str, int] = {}
        for event in events:
            if not isinstance(event, Envelope):
                continue
            state = states.get(event.conversation_id)
            if state is None or state.held_after == 0:
                continue
            payload = event.payload
            if isinstance(payload, schema.MessageEdited | schema.MessageDeleted):
                if payload.message_id not in state.messages:
                    ids.setdefault(event.conversation_id, set()).add(payload.message_id)
            elif isinstance(payload, schema.MessagesRead):
                row = state.inbox.get(event.actor)
                low = max(payload.up_to_seq, row.read_seq if row is not None else 0)
                if low < state.held_after:
                    after[event.conversation_id] = min(low, after.get(event.conversation_id, low))
        for cid, wanted in ids.items():
            await self._load_older(conn, states[cid], "message_id = ANY(%s)", list(wanted))
            states[cid].looked_up |= wanted
        for cid, low in after.items():
            await self._load_older(conn, states[cid], "seq > %s", low)
            states[cid].older_after = low

    async def _load_older(self, conn: AsyncConn, state: ConversationState, where: str, value: Any) -> None:
        """The messages of `state`'s conversation at or below `held_after` that `where` selects."""
        cur = await conn.execute(
            self._q(
                f"SELECT {_MESSAGE_STATE} FROM {{s}}.messages WHERE conversation_id = %s AND seq <= %s "
                f"AND {where}"
            ),
            (state.conversation.conversation_id, state.held_after, value),
        )
        for r in await cur.fetchall():
            state.older.setdefault(r[2], Message.loaded(r))

    async def commit(self, conn: AsyncConn, batch: Batch, lease_owner: str | None = None) -> None:
        """Write `batch` and move the checkpoint to `batch.last`, all in one transaction.

        Raises:
            EpochMismatch: the checkpoint was taken in another epoch of the log.
            CheckpointMoved: the checkpoint is not `batch.after` (a repeat, an older batch, another
                writer).
            LeaseLost: `lease_owner` no longer holds the partition's lease.
        """
        async with conn.transaction():
            cur = await conn.execute(
                self._q(
                    "SELECT epoch, stream_id, version FROM {s}.checkpoints WHERE partition = %s FOR UPDATE"
                ),
                (batch.partition,),
            )
            row = await cur.fetchone()
            epoch, stream_id, version = (None, "0-0", 0) if row is None else (row[0], row[1], row[2])
            if epoch is not None and epoch != batch.epoch:
                raise EpochMismatch(batch.partition, epoch, batch.epoch)
            if stream_id != batch.after or version != batch.version:
                raise CheckpointMoved(
                    batch.partition, f"{batch.after}#{batch.version}", f"{stream_id}#{version}"
                )
            if lease_owner is not None:
                cur = await conn.execute(
                    "SELECT 1 FROM parley_store.leases "
                    "WHERE partition = %s AND owner = %s AND expires_at > now()",
                    (batch.partition, lease_owner),
                )
                if await cur.fetchone() is None:
                    raise LeaseLost(batch.partition, lease_owner)
            if self.archive and batch.archive:
                types = await self._column_types(
                    conn, "event_archive", f"{STORE_SCHEMA}.event_archive", _ARCHIVE_COLUMNS
                )
                async with conn.cursor().copy(self._archive_copy) as copy:
                    copy.set_types(types)
                    for a in batch.archive:
                        await copy.write_row(archive_row(batch.epoch, a.entry, a.event))
            await self.write_tables(conn, batch.tables)
            if batch.dead:
                await self._dead_letters(conn, batch.epoch, batch.dead)
            await conn.execute(
                self._q(
                    "INSERT INTO {s}.checkpoints (partition, epoch, stream_id, events_applied, updated_at) "
                    "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (partition) DO UPDATE "
                    "SET epoch = EXCLUDED.epoch, version = {s}.checkpoints.version + 1, "
                    "stream_id = EXCLUDED.stream_id, updated_at = now(), "
                    "events_applied = {s}.checkpoints.events_applied + EXCLUDED.events_applied"
                ),
                (batch.partition, batch.epoch, batch.last, batch.entries),
            )

    async def lock_checkpoint(self, conn: AsyncConn, partition: int) -> None:
        """Lock the partition's checkpoint row and bump its version (cached worker states become stale)."""
        await conn.execute(
            self._q("SELECT 1 FROM {s}.checkpoints WHERE partition = %s FOR UPDATE"), (partition,)
        )
        await conn.execute(
            self._q("UPDATE {s}.checkpoints SET version = version + 1 WHERE partition = %s"), (partition,)
        )

    async def write_tables(self, conn: AsyncConn, tables: Tables) -> None:
        """Write each table's (inserts, updates) inside the caller's transaction: inserts straight into
        the table (a row the fold saw as new cannot exist), updates through staging and an upsert."""
        for table, (inserts, updates) in tables.items():
            insert, copy, upsert = self._statements[table]
            if table == VERSIONS:  # written before `messages` (the order of `Tables`): see Version
                if inserts:
                    await self._copy(conn, table, copy, inserts)
                    await conn.execute(self._versions_insert)
                if updates:
                    keys = ([m.conversation_id for m in updates], [m.seq for m in updates])
                    await conn.execute(self._versions_purge, keys)
                continue
            if inserts:
                await self._copy(conn, table, insert, inserts)
            if updates:
                await self._copy(conn, table, copy, updates)
                await conn.execute(upsert)

    async def archive_once(self, conn: AsyncConn, row: tuple[Any, ...]) -> None:
        """Archive one event unless it already is (a re-driven letter that decoded the first time)."""
        cols = sql.SQL(", ").join(map(sql.Identifier, _ARCHIVE_COLUMNS))
        await conn.execute(
            sql.SQL("INSERT INTO parley_store.event_archive ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                cols, sql.SQL(", ").join(sql.Placeholder() * len(_ARCHIVE_COLUMNS))
            ),
            row,
        )

    async def _copy(self, conn: AsyncConn, table: str, statement: sql.Composed, records: list[Any]) -> None:
        types = await self._column_types(conn, table, f"{self.schema}.{table}", _COLUMNS[table][0])
        async with conn.cursor().copy(statement) as copy:
            copy.set_types(types)
            for record in records:
                await copy.write_row(record.row())

    async def _dead_letters(self, conn: AsyncConn, epoch: str, dead: list[DeadLetter]) -> None:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO parley_store.dead_letters (epoch, partition, stream_id, data, error) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (epoch, partition, stream_id) "
                + (
                    "DO UPDATE SET error = EXCLUDED.error, failed_at = now(), redriven_at = NULL, "
                    "attempts = parley_store.dead_letters.attempts + 1"
                    if self.archive
                    else "DO NOTHING"
                ),
                [(epoch, d.partition, d.stream_id, d.data, d.error.replace("\x00", "\\x00")) for d in dead],
            )
