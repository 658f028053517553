"""The read side's SQL: every query the HTTP API runs against the live schema `parley`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import psycopg

from events.membership import covers_sql
from projector.fold import PREVIEW_CHARS

AsyncConn = psycopg.AsyncConnection[Any]

_VISIBLE = (
    "EXISTS (SELECT 1 FROM parley.memberships s WHERE s.conversation_id = m.conversation_id "
    f"AND s.user_id = %(user)s AND {covers_sql('s', 'm.seq')})"
)
# The rule is projector/views.py `seen`. The seq of the last of the message's body-setting events the
# user saw (its send, or an edit made while they were in); the body they see is the one the next edit
# replaced (the version row with the least `until_seq` after it), or the current one if there is none.
_LAST_SEEN = (
    "coalesce((SELECT max(w.until_seq) FROM parley.message_versions w JOIN parley.memberships s "
    f"ON s.conversation_id = w.conversation_id AND s.user_id = %(user)s AND {covers_sql('s', 'w.until_seq')} "
    "WHERE w.conversation_id = m.conversation_id AND w.seq = m.seq), m.seq)"
)
_LATER = (
    "FROM parley.message_versions v WHERE v.conversation_id = m.conversation_id AND v.seq = m.seq "
    f"AND v.until_seq > {_LAST_SEEN}"
)
_MESSAGE_COLUMNS = (
    "m.conversation_id, m.seq, m.message_id, m.author, "
    "CASE WHEN o.until_seq IS NULL THEN m.body ELSE o.body END, "
    "CASE WHEN o.until_seq IS NULL OR m.deleted_at IS NOT NULL THEN m.state "
    "WHEN o.edited_at IS NULL THEN 'sent' ELSE 'edited' END, "
    "m.reply_to, m.sent_at, CASE WHEN o.until_seq IS NULL THEN m.edited_at ELSE o.edited_at END, m.deleted_at"
)
# Only an edited message has versions, so an unedited one costs no probe.
_SEEN_VERSION = (
    "LEFT JOIN LATERAL (SELECT v.until_seq, v.body, v.edited_at "
    f"{_LATER} AND m.edited_at IS NOT NULL ORDER BY v.until_seq LIMIT 1) o ON true"
)


class ConversationItem(msgspec.Struct):
    conversation_id: str
    title: str
    unread_count: int
    archived: bool
    last_activity_at: datetime
    message_count: int
    last_seq: int
    last_message_id: str | None
    last_message_seq: int | None
    last_message_author: str | None
    last_message_preview: str | None


class MessageItem(msgspec.Struct):
    conversation_id: str
    seq: int
    message_id: str
    author: str
    body: str | None
    state: str
    reply_to: str | None
    sent_at: datetime
    edited_at: datetime | None
    deleted_at: datetime | None


# The inbox as each user sees it (projector/views.py `listed`): their own activity, count and latest
# message from their inbox row. When that message was sent in their current span (the common case) they
# see it as it is now, which the conversation row holds; otherwise it is read as they saw it, by key
# (a NULL key: the index is not even searched in the common case).
_LISTED_LAST = (
    "LEFT JOIN LATERAL (SELECT m.message_id AS id, m.author, "
    "left(CASE WHEN o.until_seq IS NULL THEN m.body ELSE o.body END, %(preview)s) AS preview "
    f"FROM parley.messages m {_SEEN_VERSION} "
    "WHERE m.conversation_id = i.conversation_id "
    "AND m.seq = CASE WHEN i.last_message_seq <= i.joined_seq THEN i.last_message_seq END) p ON true"
)


def _listed(column: str) -> str:
    return f"CASE WHEN i.last_message_seq > i.joined_seq THEN c.last_message_{column} ELSE p.{column} END"


_CONVERSATIONS = (
    "SELECT i.conversation_id, c.title, i.unread_count, i.archived, i.last_activity_at, i.message_count, "
    f"c.last_seq, {_listed('id')}, i.last_message_seq, {_listed('author')}, {_listed('preview')} "
    "FROM (SELECT * FROM parley.inbox i WHERE i.user_id = %(user)s AND i.is_member "
    "AND (%(archived)s::boolean IS NULL OR i.archived = %(archived)s) "
    "AND (%(at)s::timestamptz IS NULL OR (i.last_activity_at, i.conversation_id) < (%(at)s, %(id)s)) "
    "ORDER BY i.last_activity_at DESC, i.conversation_id DESC LIMIT %(limit)s) i "
    f"JOIN parley.conversations c USING (conversation_id) {_LISTED_LAST} "
    "ORDER BY i.last_activity_at DESC, i.conversation_id DESC"
)


async def conversations(
    conn: AsyncConn, user: str, limit: int, after: tuple[datetime, str] | None, archived: bool | None
) -> list[ConversationItem]:
    """The user's current conversations as they see them (`views.listed`), most recent activity first,
    after the cursor (activity, id)."""
    cur = await conn.execute(
        _CONVERSATIONS,
        {"user": user, "archived": archived, "at": after[0] if after else None,
         "id": after[1] if after else None, "limit": limit, "preview": PREVIEW_CHARS},
    )  # fmt: skip
    return [ConversationItem(*r) for r in await cur.fetchall()]


async def messages(
    conn: AsyncConn,
    user: str,
    conversation_id: str,
    limit: int,
    *,
    after_seq: int | None,
    before_seq: int | None,
) -> list[MessageItem]:
    """Messages the user saw (sent while they were in), ascending after `after_seq` or descending before."""
    params = {"user": user, "conv": conversation_id, "limit": limit}
    if after_seq is not None:
        where, order, params["seq"] = "m.seq > %(seq)s", "ASC", after_seq
    else:
        where, order, params["seq"] = (
            "m.seq < %(seq)s",
            "DESC",
            before_seq if before_seq is not None else 2**62,
        )
    cur = await conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM parley.messages m {_SEEN_VERSION} "
        f"WHERE m.conversation_id = %(conv)s AND {where} AND {_VISIBLE} "
        f"ORDER BY m.seq {order} LIMIT %(limit)s",
        params,
    )
    return [MessageItem(*r) for r in await cur.fetchall()]


async def total_unread(conn: AsyncConn, user: str) -> int:
    cur = await conn.execute(
        "SELECT coalesce(sum(unread_count), 0) FROM parley.inbox WHERE user_id = %s AND is_member", (user,)
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def search(conn: AsyncConn, user: str, text: str, limit: int) -> list[MessageItem]:
    """Messages the user saw whose body as they see it matches `text` (web-search syntax): the current
    body, or the one an edit after they left replaced (see `messages`: only a user with a closed span in
    a conversation can see one, so only those conversations' versions are read); deleted never match."""
    cur = await conn.execute(
        "SELECT * FROM ("
        "SELECT m.conversation_id, m.seq, m.message_id, m.author, m.body, m.state, m.reply_to, m.sent_at, "
        "m.edited_at, m.deleted_at FROM parley.messages m "
        f"WHERE m.search @@ websearch_to_tsquery('simple', %(q)s) AND {_VISIBLE} "
        f"AND (m.edited_at IS NULL OR NOT EXISTS (SELECT 1 {_LATER})) "
        "UNION ALL "
        "SELECT m.conversation_id, m.seq, m.message_id, m.author, o.body, "
        "CASE WHEN o.edited_at IS NULL THEN 'sent' ELSE 'edited' END, m.reply_to, m.sent_at, o.edited_at, "
        "m.deleted_at FROM parley.message_versions o JOIN parley.messages m USING (conversation_id, seq) "
        "WHERE o.conversation_id IN (SELECT x.conversation_id FROM parley.memberships x "
        "WHERE x.user_id = %(user)s AND x.left_seq IS NOT NULL) "
        "AND to_tsvector('simple', coalesce(o.body, '')) @@ websearch_to_tsquery('simple', %(q)s) "
        f"AND {_VISIBLE} AND o.until_seq = (SELECT min(v.until_seq) {_LATER})"
        ") m ORDER BY m.sent_at DESC, m.conversation_id, m.seq LIMIT %(limit)s",
        {"user": user, "q": text, "limit": limit},
    )
    return [MessageItem(*r) for r in await cur.fetchall()]


async def checkpoints(conn: AsyncConn) -> dict[int, tuple[str | None, str]]:
    """Every partition's checkpoint: {partition: (epoch, stream_id)}."""
    cur = await conn.execute("SELECT partition, epoch, stream_id FROM parley.checkpoints")
    return {row[0]: (row[1], row[2]) for row in await cur.fetchall()}


async def snapshot_checkpoints(conn: AsyncConn) -> tuple[dict[int, tuple[str | None, str]], int | None]:
    """`checkpoints`, and the oid of the table they were read from (None when it is empty)."""
    cur = await conn.execute("SELECT partition, epoch, stream_id, tableoid FROM parley.checkpoints")
    rows = await cur.fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}, (int(rows[0][3]) if rows else None)


async def checkpoints_table(conn: AsyncConn) -> int:
    """The oid `parley.checkpoints` names now: another one than earlier in a transaction means a rebuild
    swapped the schema in between (a statement resolves names when it runs, whatever its snapshot)."""
    cur = await conn.execute("SELECT 'parley.checkpoints'::regclass::oid")
    ((oid,),) = await cur.fetchall()
    return int(oid)


async def seen_up_to(conn: AsyncConn, user: str, conversation_id: str) -> int | None:
    """The seq of the conversation's last event the user may see (its last seq while they are in, else
    their removal's), or None when they never were a participant."""
    cur = await conn.execute(
        "SELECT CASE WHEN bool_or(s.left_seq IS NULL) THEN max(c.last_seq) ELSE max(s.left_seq) END "
        "FROM parley.memberships s JOIN parley.conversations c USING (conversation_id) "
        "WHERE s.conversation_id = %s AND s.user_id = %s",
        (conversation_id, user),
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])
