"""The log's key layout in Redis: P partitioned streams, each with its write-side state in one hash slot.

Every key of partition N carries one hash tag (`partition_tag`), so a partition's stream, its
conversations' write-side state and its idempotency records live in one Redis Cluster slot and one Lua
script can touch them all atomically. A user's keys (rate limit, idempotency claims) carry `{u:<user>}`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from redis.crc import key_slot

TagScheme = Literal["spread", "plain"]
TAG_SCHEMES: tuple[TagScheme, ...] = ("spread", "plain")
SLOTS = 16_384
_SEGMENT_RADICES = (3, 2, 2, 2, 2, 2)
"""Partition N aims at segment `_segment(N)` of the slot space split in 3, then in halves (96 segments of
~170 slots): consecutive partitions land in different thirds, then different sixths, ..., so an even split
of the slots over 3 (or 6, 12) masters gets them round-robin."""


def _segment(partition: int) -> tuple[int, int]:
    """The slots `[low, high]` partition N's tag aims at (mixed-radix van der Corput over the segments)."""
    low, high, n = 0, SLOTS - 1, partition
    for radix in _SEGMENT_RADICES:
        digit, n = n % radix, n // radix
        width = high - low + 1
        # Split as redis-cli --cluster create does: boundaries at the rounded multiples of width/radix.
        low, high = low + round(width * digit / radix), low + round(width * (digit + 1) / radix) - 1
    return low, high


@lru_cache(maxsize=4096)
def partition_tag(partition: int, scheme: TagScheme = "spread") -> str:
    """The hash tag's text for partition N: `pN` ("plain", as logs made before spreading), or the first of
    `pN`, `pN.1`, `pN.2`, ... whose CRC16 slot lies in the partition's segment ("spread")."""
    if scheme == "plain":
        return f"p{partition}"
    low, high = _segment(partition)
    suffix = 0
    while True:
        tag = f"p{partition}" if suffix == 0 else f"p{partition}.{suffix}"
        if low <= key_slot(tag.encode()) <= high:
            return tag
        suffix += 1


@dataclass(frozen=True, slots=True)
class LogLayout:
    """Names every Redis key of one log; `namespace` lets several logs share a server (tests do)."""

    namespace: str
    partitions: int
    tags: TagScheme = field(default="spread")

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("a log needs at least one partition")
        if not self.namespace or any(c in self.namespace for c in "{}: "):
            raise ValueError(f"bad log namespace {self.namespace!r}")
        if self.tags not in TAG_SCHEMES:
            raise ValueError(f"bad partition tag scheme {self.tags!r}")

    def partition_for(self, conversation_id: str) -> int:
        """The partition that holds every event of `conversation_id` (stable across processes)."""
        return zlib.crc32(conversation_id.encode()) % self.partitions

    def meta_key(self) -> str:
        """The log-wide hash {epoch, partitions, created_at, tags}, written once at creation; one key, so
        any slot (it names no partition)."""
        return f"{self.namespace}:meta"

    def _tag(self, partition: int) -> str:
        return f"{self.namespace}:{{{partition_tag(partition, self.tags)}}}"

    def stream_key(self, partition: int) -> str:
        return f"{self._tag(partition)}:log"

    def partition_meta_key(self, partition: int) -> str:
        """Per-partition copy of the epoch, readable inside the partition's append script."""
        return f"{self._tag(partition)}:meta"

    def conversation_key(self, partition: int, conversation_id: str) -> str:
        """Write-side state of a conversation: seq, creator, members, messages, read markers."""
        return f"{self._tag(partition)}:c:{conversation_id}"

    def message_bucket_key(self, partition: int, conversation_id: str, bucket: int) -> str:
        """One bucket of a conversation's messages (author, deleted) in the write side: append.lua names
        it so; '#' is in no conversation id."""
        return f"{self.conversation_key(partition, conversation_id)}#{bucket}"

    def idempotency_key(self, partition: int, user_id: str, key: str) -> str:
        return f"{self._tag(partition)}:idem:{user_id}:{key}"

    def idempotency_claim_key(self, user_id: str, key: str) -> str:
        """Which request a user's key is bound to, whatever the partition: tagged by user, not partition."""
        return f"{self.namespace}:{{u:{user_id}}}:idem:{key}"

    def rate_limit_key(self, user_id: str) -> str:
        """A user's token bucket, in the slot of the user's other keys (`{u:<user>}`)."""
        return f"{self.namespace}:{{u:{user_id}}}:rl"

    def stream_keys(self) -> list[str]:
        return [self.stream_key(p) for p in range(self.partitions)]
