"""The log's key layout in Redis: P partitioned streams, each with its write-side state in one hash slot.

Every key of partition N carries the hash tag `{pN}`, so a partition's stream, its conversations'
write-side state and its idempotency records live in one Redis Cluster slot and one Lua script can
touch them all atomically.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LogLayout:
    """Names every Redis key of one log; `namespace` lets several logs share a server (tests do)."""

    namespace: str
    partitions: int

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("a log needs at least one partition")
        if not self.namespace or any(c in self.namespace for c in "{}: "):
            raise ValueError(f"bad log namespace {self.namespace!r}")

    def partition_for(self, conversation_id: str) -> int:
        """The partition that holds every event of `conversation_id` (stable across processes)."""
        return zlib.crc32(conversation_id.encode()) % self.partitions

    def meta_key(self) -> str:
        """The log-wide hash {epoch, partitions, created_at}, written once at creation."""
        return f"{self.namespace}:meta"

    def _tag(self, partition: int) -> str:
        return f"{self.namespace}:{{p{partition}}}"

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
        return f"{self.namespace}:rl:{user_id}"

    def stream_keys(self) -> list[str]:
        return [self.stream_key(p) for p in range(self.partitions)]
