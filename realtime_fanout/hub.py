"""The hub: one reader per process for all partitions, dispatching in memory to local subscribers.

It reads every partition stream once (XREAD BLOCK), decodes each entry once, keeps the membership
index, and offers each item only to the subscribers of its conversation (plus users it names), so
the cost grows with recipients, not with connections. A conversation's deletions also reach the
connections of users who left it: they see no event, but their unread state (frozen while they are out,
as in the read model) must lose a deleted message before a re-add reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions

from events.codec import decode
from events.exceptions import DecodeError
from events.layout import LogLayout
from events.log import EventLog
from events.schema import MessageDeleted
from realtime_fanout.archive import Archive
from realtime_fanout.cursor import stream_key
from realtime_fanout.exceptions import HubUnavailable
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.membership import PRIVATE_PAYLOADS, MembershipIndex, Span
from realtime_fanout.metrics import DELIVERIES, ENTRIES_READ
from realtime_fanout.verdicts import Verdicts

log = logging.getLogger(__name__)

BOOTSTRAP_PAGE = 2_000


class Subscriber(Protocol):
    """What the hub needs of a connection: who it is, its filter, and a non-blocking `offer`."""

    @property
    def user_id(self) -> str: ...

    @property
    def conversations(self) -> frozenset[str] | None: ...

    def offer(self, item: Item) -> None:
        """Take one live item; must not block or await (overflow is the subscriber's business)."""


class Hub:
    """Reads the log once per process; `attach` returns the positions and membership seed to splice at."""

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: LogLayout,
        *,
        block_ms: int = 5_000,
        count: int = 1_000,
        archive: Archive | None = None,
        track_acts: bool = False,
    ) -> None:
        self.log = EventLog(redis, layout)
        self.track_acts = track_acts  # who acted where (`engages`), for the `engaged` presence scope
        self.archive = archive
        self.layout = layout
        self.block_ms = block_ms
        self.count = count
        self.epoch: str | None = None
        self.positions: list[str] = ["0-0"] * layout.partitions
        self.index = MembershipIndex()
        self.verdicts = Verdicts()
        self._by_user: dict[str, set[Subscriber]] = {}
        self._by_conversation: dict[str, set[Subscriber]] = {}
        self._left: dict[str, set[Subscriber]] = {}  # subscribers of users who left the conversation
        self._task: asyncio.Task[None] | None = None
        self._keys = layout.stream_keys()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and self.epoch is not None

    async def start(self) -> None:
        """Open the log, learn memberships from the archive's trimmed part and the held history, then read
        live in the background."""
        epoch = await self.log.open(create=False)
        self.verdicts = Verdicts()  # a retried start judges everything again
        heads = [await self.log.head(p) for p in range(self.layout.partitions)]
        for partition, head in enumerate(heads):
            if self.archive is not None:
                await self._bootstrap_archive(epoch, partition)
            await self._bootstrap(partition, head)
        self.epoch = epoch
        self.positions = heads
        self._task = asyncio.create_task(self._run(), name="fanout-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _bootstrap(self, partition: int, head: str) -> None:
        after = "0-0"
        while head != "0-0":
            start = f"({after}" if after != "0-0" else "-"
            entries = await self.log.read_range(partition, start, head, BOOTSTRAP_PAGE)
            for entry in entries:
                try:
                    envelope = decode(entry.data)
                except DecodeError:
                    continue
                if not self.verdicts.admit(partition, entry.stream_id, envelope):
                    continue
                self.index.apply(envelope)
                if self.track_acts and not isinstance(envelope.payload, PRIVATE_PAYLOADS):
                    self.index.note_act(envelope.conversation_id, envelope.actor, envelope.seq)
            if len(entries) < BOOTSTRAP_PAGE:
                return
            after = entries[-1].stream_id

    async def _bootstrap_archive(self, epoch: str, partition: int) -> None:
        assert self.archive is not None
        first = await self.log.first_id(partition)
        before = stream_key(first) if first is not None else (1 << 64, 0)
        for entry in await self.archive.membership_entries(epoch, partition, before):
            item = decode_entry(entry)
            if item is not None:
                self.index.apply(item.envelope)
                self.verdicts.ledger.learn(item.envelope)
        for cid, last_seq in await self.archive.last_seqs(epoch, partition, before):
            self.verdicts.ledger.learn_conversation(cid, last_seq)
        if self.track_acts:
            for act in await self.archive.acts(epoch, partition, before):
                self.index.note_act(*act)

    def replayable(self, item: Item) -> bool:
        """True when a session may replay `item`: the hub read it and found it an event (`verdicts`)."""
        return self.verdicts.replayable(item, stream_key(self.positions[item.partition]))

    def learn(self, spans: list[Span]) -> None:
        """Add spans known from the read model (for history the streams no longer hold)."""
        self.index.learn(spans)

    def attach(self, subscriber: Subscriber) -> tuple[list[str], list[Span]]:
        """Register `subscriber` for live items after the returned positions; also its membership seed.

        Raises:
            HubUnavailable: the hub has not opened the log.
        """
        if self.epoch is None:
            raise HubUnavailable("the hub is not reading the log yet")
        user = subscriber.user_id
        self._by_user.setdefault(user, set()).add(subscriber)
        for cid in self.index.conversations_of(user):
            self._route(subscriber, cid, member=True, left=False)
        for cid in self.index.left_conversations_of(user):
            self._route(subscriber, cid, member=False, left=True)
        return list(self.positions), self.index.seed_for(user)

    def detach(self, subscriber: Subscriber) -> None:
        user = subscriber.user_id
        subs = self._by_user.get(user)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self._by_user[user]
        for cid in (*self.index.conversations_of(user), *self.index.left_conversations_of(user)):
            self._route(subscriber, cid, member=False, left=False)

    def subscribers(self) -> list[Subscriber]:
        return [s for subs in self._by_user.values() for s in subs]

    def dispatch(self, item: Item) -> None:
        """Update the index with `item`, then offer it to every local subscriber that may see it."""
        cid = item.conversation_id
        env = item.envelope
        if self.track_acts and not isinstance(env.payload, PRIVATE_PAYLOADS):
            self.index.note_act(cid, env.actor, env.seq)
        named = item.named_users()
        targets: set[Subscriber] | tuple[Subscriber, ...]
        if named:
            self.index.apply(item.envelope)
            targets = set(self._by_conversation.get(cid, ()))
            for user in named:
                member, left = user in self.index.members.get(cid, ()), self.index.has_left(user, cid)
                for sub in self._by_user.get(user, ()):
                    targets.add(sub)
                    self._route(sub, cid, member=member, left=left)
        else:
            targets = tuple(self._by_conversation.get(cid, ()))
            out = self._left.get(cid)
            if out and type(item.envelope.payload) is MessageDeleted:
                targets += tuple(out)
        for sub in targets:
            sub.offer(item)
        DELIVERIES.inc(len(targets))

    def _route(self, sub: Subscriber, cid: str, *, member: bool, left: bool) -> None:
        """File `sub` under `cid` as a member's connection, a connection of one who left, or neither."""
        wanted = sub.conversations is None or cid in sub.conversations
        for table, present in ((self._by_conversation, member and wanted), (self._left, left and wanted)):
            if present:
                table.setdefault(cid, set()).add(sub)
            elif (subs := table.get(cid)) is not None:
                subs.discard(sub)
                if not subs:
                    del table[cid]

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                after = {p: self.positions[p] for p in range(len(self._keys))}
                entries = await self.log.read_many(after, self.count, self.block_ms)
                backoff = 0.1
            except redis.exceptions.RedisError as exc:
                log.warning("hub read failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for entry in entries:
                ENTRIES_READ.inc()
                item = decode_entry(entry)
                self.positions[entry.partition] = entry.stream_id
                if item is not None:
                    if self.verdicts.admit(entry.partition, entry.stream_id, item.envelope):
                        self.dispatch(item)
                else:
                    log.error(
                        "skipping undecodable entry %s of partition %d", entry.stream_id, entry.partition
                    )
