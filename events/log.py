"""The Redis edge of the log: create or open it (epoch, partition count), and read its streams.

Appending is the command API's job (`command_api/append.py`); this module is what every reader shares.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
import uuid_utils

from events.exceptions import EpochChanged, LogNotInitialized, PartitionMismatch
from events.layout import LogLayout


class LogEntry(msgspec.Struct, frozen=True, gc=False):
    """One raw stream entry: still bytes, so a reader can quarantine what it cannot decode.

    Readers make one per entry and hold a batch of them in flight: scalars only, so untracked by the
    cyclic garbage collector, and quicker to make than a named tuple.
    """

    partition: int
    stream_id: str
    data: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class EventLog:
    """Opens the log and reads its partitions; every call talks to Redis, nothing is cached but the epoch."""

    def __init__(self, redis: aioredis.Redis, layout: LogLayout) -> None:
        self.redis = redis
        self.layout = layout
        self.epoch: str | None = None

    async def open(self, *, create: bool) -> str:
        """Return the log's epoch, creating the log first when `create` and it does not exist.

        Raises:
            LogNotInitialized: the log does not exist and `create` is false.
            PartitionMismatch: the log has another partition count than the layout.
        """
        meta_key = self.layout.meta_key()
        if create:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(meta_key, "epoch", uuid_utils.uuid7().hex)
            pipe.hsetnx(meta_key, "partitions", str(self.layout.partitions))
            pipe.hsetnx(meta_key, "created_at_ms", str(int(time.time() * 1000)))
            await pipe.execute()
        meta = {_text(k): _text(v) for k, v in (await self.redis.hgetall(meta_key)).items()}
        if "epoch" not in meta:
            raise LogNotInitialized(f"no log at {meta_key}")
        actual = int(meta.get("partitions", "0"))
        if actual != self.layout.partitions:
            raise PartitionMismatch(self.layout.partitions, actual)
        epoch = meta["epoch"]
        if create:
            pipe = self.redis.pipeline(transaction=False)
            for p in range(self.layout.partitions):
                pipe.hsetnx(self.layout.partition_meta_key(p), "epoch", epoch)
            await pipe.execute()
        for p in range(self.layout.partitions):
            part_epoch = await self.redis.hget(self.layout.partition_meta_key(p), "epoch")
            if part_epoch is None:
                raise LogNotInitialized(f"partition {p} of log {epoch} has no metadata")
            if _text(part_epoch) != epoch:
                raise EpochChanged(epoch, _text(part_epoch))
        self.epoch = epoch
        return epoch

    async def check_epoch(self, expected: str) -> None:
        """Raise `EpochChanged` unless the log still has epoch `expected`."""
        actual = await self.redis.hget(self.layout.meta_key(), "epoch")
        if actual is None or _text(actual) != expected:
            raise EpochChanged(expected, None if actual is None else _text(actual))

    async def read_after(
        self, partition: int, after_id: str, count: int, block_ms: int | None = None
    ) -> list[LogEntry]:
        """Entries of `partition` strictly after `after_id` ("0-0" for the start), oldest first."""
        return await self.read_many({partition: after_id}, count, block_ms)

    async def read_many(
        self, after: dict[int, str], count: int, block_ms: int | None = None
    ) -> list[LogEntry]:
        """Entries of several partitions, each strictly after its id, in one XREAD; per partition in order."""
        args: list[str | int] = ["COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        keys = {self.layout.stream_key(p): p for p in after}
        args += ["STREAMS", *keys, *after.values()]
        reply: Any = await self.redis.execute_command(_RAW_XREAD, *args)  # type: ignore[no-untyped-call]
        if not reply:
            return []
        entries: list[LogEntry] = []
        streams = reply.items() if isinstance(reply, dict) else reply  # RESP3 map or RESP2 list
        for stream, items in streams:
            partition = keys[_text(stream)]
            entries += [_raw_entry(partition, item) for item in items]
        return entries

    async def read_range(
        self, partition: int, start_id: str, end_id: str, count: int | None = None
    ) -> list[LogEntry]:
        """Entries of `partition` with `start_id <= id <= end_id` (`-`/`+` for the ends)."""
        args: list[str | int] = [self.layout.stream_key(partition), start_id, end_id]
        if count is not None:
            args += ["COUNT", count]
        items: Any = await self.redis.execute_command(_RAW_XRANGE, *args)  # type: ignore[no-untyped-call]
        return [_raw_entry(partition, item) for item in items]

    async def head(self, partition: int) -> str:
        """The id of the last entry of `partition`, or "0-0" when it is empty."""
        items: Any = await self.redis.xrevrange(self.layout.stream_key(partition), "+", "-", count=1)
        return _text(items[0][0]) if items else "0-0"

    async def first_id(self, partition: int) -> str | None:
        """The id of the oldest entry the stream still holds (None when empty): older ones were trimmed."""
        items: Any = await self.redis.xrange(self.layout.stream_key(partition), "-", "+", count=1)
        return _text(items[0][0]) if items else None


# Sent as bytes, these command names match none of redis-py's response callbacks (keyed by str), so
# the reply stays the raw nested list: building a dict per entry was 12% of the projector's CPU.
_RAW_XREAD = b"XREAD"
_RAW_XRANGE = b"XRANGE"


def _raw_entry(partition: int, item: list[Any]) -> LogEntry:
    stream_id, fields = item
    if len(fields) == 2 and fields[0] == b"e":  # what the appender writes
        data = fields[1]
    else:
        data = b""
        for i in range(0, len(fields) - 1, 2):
            if fields[i] in (b"e", "e"):
                data = fields[i + 1]
                break
    return LogEntry(
        partition,
        stream_id.decode() if type(stream_id) is bytes else stream_id,
        data if type(data) is bytes else data.encode(),
    )
