"""The most recent items the hub read, per partition, in memory: a resume from a recent cursor (a reconnect
storm after a network blip or a load balancer's restart) is served from them: no Redis read, no decoding.

Items are kept in blocks of `BLOCK`, each shared by every session that replays it with its index
(`IndexedItems`): built once for a closed block, kept up to date as the open one grows (measured: copying
and indexing the open block per resume was a third of a storm's CPU). Each partition holds every event
after its floor (the hub's start position, then the last key of the block evicted last): a cursor at or
after the floor is served whole, up to the hub's position; an older one is the streams' and the archive's.
"""

from __future__ import annotations

from collections import deque

from events.membership import concerns
from realtime_fanout.cursor import StreamKey, stream_key
from realtime_fanout.item import IndexedItems, Item, PageIndex

BLOCK = 256


class RecentItems:
    """Per partition, the events the hub dispatched after `floor`, at most about `max_items` in all."""

    def __init__(self, partitions: int, max_items: int) -> None:
        self.max_blocks = max(0, max_items // max(1, partitions) // BLOCK)
        self._blocks: list[deque[IndexedItems]] = [deque() for _ in range(partitions)]
        self._open: list[IndexedItems] = [_open_block() for _ in range(partitions)]
        self._floor: list[StreamKey | None] = [None] * partitions

    @property
    def per_partition(self) -> int:
        """How many of a partition's latest items are held at most (its whole blocks)."""
        return self.max_blocks * BLOCK

    def start(self, positions: list[str], held: list[list[Item]] | None = None) -> None:
        """The hub reads live after `positions`: forget everything, then hold `held[p]` (the latest events of
        partition p up to its position, every one of them from the first on: a warm start after a restart)
        and what comes after."""
        for partition, position in enumerate(positions):
            self._blocks[partition].clear()
            self._open[partition] = _open_block()
            self._floor[partition] = stream_key(position) if self.max_blocks else None
            before = held[partition] if held is not None and self.max_blocks else []
            if before:
                self._floor[partition] = before[0].key  # every event after the first held one is held
            for item in before:
                self.add(item)

    def add(self, item: Item) -> None:
        """An event the hub dispatched (in log order per partition)."""
        if not self.max_blocks:
            return
        block = self._open[item.partition]
        n = len(block)
        block.append(item)
        index = block.lookup
        index.by_conversation.setdefault(item.envelope.conversation_id, []).append(n)
        for user in concerns(item.envelope):
            index.concerning.setdefault(user, []).append(n)
        if len(block) < BLOCK:
            return
        blocks = self._blocks[item.partition]
        blocks.append(block)
        self._open[item.partition] = _open_block()
        if len(blocks) > self.max_blocks:
            self._floor[item.partition] = blocks.popleft()[-1].key

    def covers(self, partition: int, after: StreamKey) -> bool:
        """True when every event of `partition` after `after` (up to the hub's position) is held."""
        floor = self._floor[partition]
        return floor is not None and after >= floor

    def after(self, partition: int, after: StreamKey) -> list[IndexedItems] | None:
        """Pages holding every event of `partition` after `after` (a page may start earlier: callers drop
        what they have), or None when `after` is older than what is held."""
        if not self.covers(partition, after):
            return None
        pages = [block for block in self._blocks[partition] if block[-1].key > after]
        open_block = self._open[partition]
        if open_block and open_block[-1].key > after:
            pages.append(open_block)  # it may grow later: those items come live too, and are dropped
        return pages


def _open_block() -> IndexedItems:
    """An empty block whose index `RecentItems.add` keeps current."""
    block = IndexedItems()
    block.__dict__["lookup"] = PageIndex({}, {})
    return block
