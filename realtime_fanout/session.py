"""The per-connection session, sans I/O: fed log items, drained of frames; no sockets, no clock.

Splice rule: the connection attaches to the hub first (live items are buffered here), then feeds
history after the cursor, then calls `replay_done()`; every item at or before the cursor is
dropped, so replay and live may overlap freely and the client sees no gap and no duplicate.
Authorization is decided per event by seq against the user's membership spans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum

import msgspec

from events.membership import is_private
from realtime_fanout.cursor import Cursor, stream_key
from realtime_fanout.frames import EventFrame, EventsFrame, LiveFrame, encode_frame
from realtime_fanout.item import IndexedItems, Item
from realtime_fanout.membership import Span, UserMemberships
from realtime_fanout.unread import UnreadTracker, receipt

FRAME_OVERHEAD_BYTES = 48


class Phase(Enum):
    REPLAY = "replay"
    LIVE = "live"


class Session:
    """One subscriber's view of the log: what it may see, what it has been sent, what is pending."""

    def __init__(
        self,
        user_id: str,
        cursor: Cursor,
        *,
        conversations: Iterable[str] | None = None,
        seed: Iterable[Span] = (),
        max_batch: int = 100,
        unread: UnreadTracker | None = None,
        replayable: Callable[[Item], bool] | None = None,
    ) -> None:
        self.user_id = user_id
        self.cursor = cursor.copy()
        self.conversations = None if conversations is None else frozenset(conversations)
        self.memberships = UserMemberships(user_id, seed)
        self.phase = Phase.REPLAY
        self.max_batch = max(1, max_batch)
        self.pending_bytes = 0
        self.delivered = 0
        self._sent = cursor.copy()
        self.unread = unread
        self.replayable = replayable  # the hub's verdicts (`Hub.replayable`); None: every item is an event
        self._buffer: list[Item] = []
        self._pending: list[Item | Cursor | bytes] = []

    def learn(self, spans: Iterable[Span]) -> None:
        """Add membership spans known from elsewhere (e.g. Postgres) before history is fed."""
        for span in spans:
            self.memberships.open(span.conversation_id, span.joined_seq)
            if span.left_seq is not None:
                self.memberships.close(span.conversation_id, span.left_seq)

    def replay_plan(self, seed_positions: list[str]) -> dict[int, str]:
        """Per partition, the stream id after which history must be read: the cursor, or the seed point
        (the hub position the membership seed was taken at) when that is older, so membership events
        between the two are learned. Partitions whose live feed starts at or before the cursor are omitted.
        """
        plan: dict[int, str] = {}
        for partition, seed_id in enumerate(seed_positions):
            seed_key = stream_key(seed_id)
            if not self.cursor.covers(partition, seed_key):
                plan[partition] = self.cursor.positions[partition]
            elif seed_key != self.cursor.key(partition):
                plan[partition] = seed_id
        return plan

    def feed_replay(self, items: Iterable[Item]) -> None:
        """History after the cursor, in log order per partition; only valid before `replay_done`. An item
        `replayable` refuses is skipped: the hub refused it, or it comes live."""
        if self.phase is not Phase.REPLAY:
            raise RuntimeError("feed_replay after replay_done")
        if isinstance(items, IndexedItems):
            self._feed_indexed(items)
            return
        for item in items:
            if self.replayable is None or self.replayable(item):
                self._consider(item)

    def _feed_indexed(self, items: IndexedItems) -> None:
        """As `feed_replay`, judging only the items of conversations this user has or gets a span in
        (for the others judging changes nothing but the cursor), then moving the cursor past the page."""
        index = items.lookup
        mine = index.concerning.get(self.user_id, [])
        wanted = set(self.memberships.spans).union(items[n].envelope.conversation_id for n in mine)
        picks = set(mine)
        for cid in wanted:
            picks.update(index.by_conversation.get(cid, ()))
        for n in sorted(picks):
            if self.replayable is None or self.replayable(items[n]):
                self._consider(items[n])
        for item in reversed(items):  # the last replayable item: the cursor covers the page up to it
            if self.replayable is None or self.replayable(item):
                if not self.cursor.covers(item.partition, item.key):
                    self.cursor.advance(item.partition, item.stream_id, item.key)
                return

    def feed_live(self, item: Item) -> None:
        """A live item from the hub; buffered until `replay_done`, then judged at once."""
        if self.phase is Phase.REPLAY:
            self._buffer.append(item)
            self.pending_bytes += len(item.json) + FRAME_OVERHEAD_BYTES
        else:
            self._consider(item)

    def replay_done(self) -> None:
        """End of history: queue a `live` frame at the cursor history reached, then judge the live items
        buffered meanwhile. So a subscription without a cursor learns where it starts before any event
        (the audit checks from there), and what follows `live` is exactly what arrived after it."""
        if self.phase is Phase.LIVE:
            return
        self.phase = Phase.LIVE
        self._pending.append(self.cursor.copy())
        self.pending_bytes += FRAME_OVERHEAD_BYTES
        buffered, self._buffer = self._buffer, []
        for item in buffered:
            self.pending_bytes -= len(item.json) + FRAME_OVERHEAD_BYTES
            self._consider(item)

    def notify(self, notes: list[bytes]) -> None:
        """Queue notification frames that no item caused (an unread count after a fresh seed)."""
        for note in notes:
            self._pending.append(note)
            self.pending_bytes += len(note)

    def visible(self, item: Item) -> bool:
        """True when the user may see `item`: membership at its seq and the conversation filter; a user's
        own archive/unarchive reaches all their connections, and nobody else's."""
        env = item.envelope
        if is_private(env):
            return env.actor == self.user_id and self.memberships.can_see(env.conversation_id, env.seq)
        if self.conversations is not None and env.conversation_id not in self.conversations:
            return False
        return self.memberships.can_see(env.conversation_id, env.seq)

    def _consider(self, item: Item) -> None:
        self.memberships.apply(item.envelope)  # idempotent; also for covered items (cursor ahead of seed)
        cid = item.envelope.conversation_id
        notes: list[bytes] = []
        if self.unread is not None and (self.conversations is None or cid in self.conversations):
            notes = self.unread.observe(item, self.memberships)  # once per item, even if covered
        if not self.cursor.covers(item.partition, item.key):
            self.cursor.advance(item.partition, item.stream_id, item.key)
            if self.visible(item):
                self._pending.append(item)
                self.pending_bytes += len(item.json) + FRAME_OVERHEAD_BYTES
                notes = receipt(item) + notes
        for note in notes:
            self._pending.append(note)
            self.pending_bytes += len(note)

    def frames(self) -> list[bytes]:
        """Drain everything pending as encoded frames; consecutive events become `events` batches; a
        notification (unread, read) follows the event that caused it."""
        out: list[bytes] = []
        run: list[Item] = []
        pending, self._pending = self._pending, []
        last_item = max((i for i, p in enumerate(pending) if isinstance(p, Item)), default=-1)
        for index, entry in enumerate(pending):
            if isinstance(entry, Item):
                run.append(entry)
                if len(run) == self.max_batch or index == last_item:
                    out.append(self._batch(run, final=index == last_item))
                    run = []
                continue
            if run:
                out.append(self._batch(run, final=False))
                run = []
            if isinstance(entry, bytes):
                out.append(entry)
                continue
            self._sent = entry.copy()
            out.append(encode_frame(LiveFrame(entry.encode())))
        self.pending_bytes = sum(len(i.json) + FRAME_OVERHEAD_BYTES for i in self._buffer)
        return out

    def _batch(self, run: list[Item], *, final: bool) -> bytes:
        if final:
            self._sent = self.cursor.copy()
        else:
            for item in run:
                self._sent.advance(item.partition, item.stream_id, item.key)
        token = self._sent.encode()
        self.delivered += len(run)
        if len(run) == 1:
            return encode_frame(EventFrame(token, msgspec.Raw(run[0].json)))
        return encode_frame(EventsFrame(token, [msgspec.Raw(i.json) for i in run]))
