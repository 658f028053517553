"""The hub: one reader per process for all partitions, dispatching in memory to local subscribers.

It reads every partition stream once (XREAD BLOCK, in `_read`), decodes each entry once and hands it to
the `Router` (membership index and routing tables, no I/O), then offers it to each recipient. A recipient
whose handling raises is closed with 1011 and nobody else is; a crash of the hub itself stops it loudly
(its supervisor's STOP policy: going on could skip an entry), closing every connection with 1011 so they
resume elsewhere, and /readyz fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from events.admission import MAX_MESSAGES
from events.codec import decode
from events.exceptions import DecodeError
from events.layout import LogLayout
from events.log import EventLog, LogEntry, TopologyChanged
from events.redisclient import REDIS_ERRORS, RedisClient
from events.schema import Envelope
from realtime_fanout.archive import Archive
from realtime_fanout.cursor import stream_key
from realtime_fanout.exceptions import HubUnavailable
from realtime_fanout.item import Item, decode_entry, item_of
from realtime_fanout.membership import PRIVATE_PAYLOADS, MembershipIndex, Span
from realtime_fanout.metrics import CONNECTION_FAILURES, DELIVERIES, ENTRIES_READ
from realtime_fanout.recent import RecentItems
from realtime_fanout.routing import Abortable, Router, Subscriber
from realtime_fanout.verdicts import Verdicts
from servicekit.supervisor import Policy, Supervisor, cancel_and_wait, honour_cancellation

log = logging.getLogger(__name__)

BOOTSTRAP_PAGE = 2_000
READ_BACKOFF_S = 0.1
READ_BACKOFF_MAX_S = 5.0


def abort_failed(sub: Abortable, what: str) -> None:
    """Log the exception being handled (a bug in `sub`'s handling of `what`), count it, close `sub` 1011."""
    CONNECTION_FAILURES.inc()
    log.exception("connection of %s failed handling %s; closing it 1011", sub.user_id, what)
    sub.abort()


class Hub:
    """Reads the log once per process; `attach` returns the positions and membership seed to splice at."""

    def __init__(
        self,
        redis: RedisClient,
        layout: LogLayout,
        *,
        block_ms: int = 5_000,
        count: int = 1_000,
        archive: Archive | None = None,
        track_acts: bool = False,
        supervisor: Supervisor | None = None,
        recent_items: int = 0,
        ledger_ids: int = MAX_MESSAGES,
        replica_reads: bool = False,
    ) -> None:
        self.log = EventLog(redis, layout, replica_reads=replica_reads)
        self.archive = archive
        self.layout = layout
        self.block_ms = block_ms
        self.count = count
        self.supervisor = supervisor or Supervisor("fanout")
        self.epoch: str | None = None
        self.positions: list[str] = ["0-0"] * layout.partitions
        self.router = Router(track_acts=track_acts)
        self.failure: str | None = None
        self.ledger_ids = ledger_ids
        self.verdicts = Verdicts(max_messages=ledger_ids)
        self.recent = RecentItems(layout.partitions, recent_items)
        self._task: asyncio.Task[None] | None = None

    @property
    def index(self) -> MembershipIndex:
        return self.router.index

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and self.epoch is not None

    async def start(self) -> None:
        """Open the log, learn memberships from the archive's trimmed part and the held history, then read
        live in the background."""
        epoch = await self.log.open(create=False)
        self.verdicts = Verdicts(max_messages=self.ledger_ids)  # a retried start judges everything again
        heads = [await self.log.head(p) for p in range(self.layout.partitions)]
        held: list[list[Item]] = []
        for partition, head in enumerate(heads):
            if self.archive is not None:
                await self._bootstrap_archive(epoch, partition)
            held.append(await self._bootstrap(partition, head))
        self.epoch = epoch
        self.positions = heads
        self.recent.start(heads, held)
        self._task = self.supervisor.spawn(
            "fanout-hub", self._run, Policy.STOP, context=self._where, on_stop=self._stopped
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _where(self) -> str:
        return f"at {self.positions}, {len(self.router.subscribers())} subscribers"

    def _stopped(self, exc: BaseException) -> None:
        self.failure = f"the hub stopped: {type(exc).__name__}: {exc}"
        for sub in self.router.subscribers():
            sub.abort()

    async def _bootstrap(self, partition: int, head: str) -> list[Item]:
        """Learn memberships (and acts) from the partition's held history; returns its latest events, as
        many as the recent items hold, so resumes after a restart are served from memory too."""
        after = "0-0"
        index = self.router.index
        latest: deque[tuple[LogEntry, Envelope]] = deque(maxlen=self.recent.per_partition)
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
                index.apply(envelope)
                if self.router.track_acts and not isinstance(envelope.payload, PRIVATE_PAYLOADS):
                    index.note_act(envelope.conversation_id, envelope.actor, envelope.seq)
                if latest.maxlen:
                    latest.append((entry, envelope))
            if len(entries) < BOOTSTRAP_PAGE:
                break
            after = entries[-1].stream_id
        return [item_of(entry, envelope) for entry, envelope in latest]

    async def _bootstrap_archive(self, epoch: str, partition: int) -> None:
        assert self.archive is not None
        index = self.router.index
        first = await self.log.first_id(partition)
        before = stream_key(first) if first is not None else (1 << 64, 0)
        for entry in await self.archive.membership_entries(epoch, partition, before):
            item = decode_entry(entry)
            if item is not None:
                index.apply(item.envelope)
                self.verdicts.ledger.learn(item.envelope)
        for cid, last_seq in await self.archive.last_seqs(epoch, partition, before):
            self.verdicts.ledger.learn_conversation(cid, last_seq)
        if self.router.track_acts:
            for act in await self.archive.acts(epoch, partition, before):
                index.note_act(*act)

    def replayable(self, item: Item) -> bool:
        """True when a session may replay `item`: the hub read it and found it an event (`verdicts`)."""
        return self.verdicts.replayable(item, stream_key(self.positions[item.partition]))

    def learn(self, spans: list[Span]) -> None:
        """Add spans known from the read model (for history the streams no longer hold)."""
        self.router.index.learn(spans)

    def attach(self, subscriber: Subscriber) -> tuple[list[str], list[Span]]:
        """Register `subscriber` for live items after the returned positions; also its membership seed.

        Raises:
            HubUnavailable: the hub has not opened the log, or it stopped.
        """
        if self.epoch is None:
            raise HubUnavailable("the hub is not reading the log yet")
        if self.failure is not None:
            raise HubUnavailable(self.failure)
        seed = self.router.attach(subscriber)
        return list(self.positions), seed

    def detach(self, subscriber: Subscriber) -> None:
        self.router.detach(subscriber)

    def subscribers(self) -> list[Subscriber]:
        return self.router.subscribers()

    def dispatch(self, item: Item) -> None:
        """Route `item`, then offer it to every local subscriber that may see it, each isolated."""
        targets = self.router.route(item)
        for sub in targets:
            try:
                sub.offer(item)
            except Exception:  # one connection's bug closes that connection, nobody else's
                abort_failed(sub, f"entry {item.stream_id} of partition {item.partition}")
        DELIVERIES.inc(len(targets))

    def feed(self, entries: list[LogEntry]) -> None:
        """Move past `entries` (read live, in order per partition), dispatching each one that is an event
        (decodable, and admitted by `verdicts`: the check the projector's fold makes)."""
        for entry in entries:
            ENTRIES_READ.inc()
            item = decode_entry(entry)
            self.positions[entry.partition] = entry.stream_id
            if item is not None:
                if self.verdicts.admit(entry.partition, entry.stream_id, item.envelope):
                    self.recent.add(item)
                    self.dispatch(item)
            else:
                log.error("skipping undecodable entry %s of partition %d", entry.stream_id, entry.partition)

    async def _read(self, partitions: list[int]) -> list[LogEntry]:
        """The next entries of `partitions` (one node's) after `positions`: one blocking XREAD."""
        after = {p: self.positions[p] for p in partitions}
        return await self.log.read_many(after, self.count, self.block_ms)

    async def _run(self) -> None:
        """One reading loop per Redis node (one for all partitions on a single Redis), regrouped when the
        cluster's topology changes: N masters cost N XREADs per poll, not one per partition."""
        while True:
            groups = self.log.node_groups(range(self.layout.partitions))
            readers = [
                asyncio.create_task(self._read_node(group), name="fanout-hub-node") for group in groups
            ]
            try:
                await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(readers, "fanout-hub-node")
            for reader in readers:
                if not reader.cancelled() and (exc := reader.exception()) is not None:
                    raise exc

    async def _read_node(self, partitions: list[int]) -> None:
        """Read and feed `partitions` (one node's) until the topology changes."""
        backoff = READ_BACKOFF_S
        while True:
            honour_cancellation()
            try:
                entries = await self._read(partitions)
                backoff = READ_BACKOFF_S
            except TopologyChanged as exc:
                log.warning("hub read of partitions %s: %s; regrouping", partitions, exc)
                await asyncio.sleep(backoff)
                return
            except REDIS_ERRORS as exc:
                log.warning("hub read failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, READ_BACKOFF_MAX_S)
                continue
            self.feed(entries)
