"""Cursors: an opaque, epoch-scoped position per partition that clients echo back to resume.

The wire form is `events.cursor`'s. A position means "every event at or before this stream id of that
partition has been handled".
"""

from __future__ import annotations

import functools

from events.cursor import decode_cursor, encode_cursor
from events.position import parse_stream_id
from realtime_fanout.exceptions import ForeignEpoch, MalformedCursor

StreamKey = tuple[int, int]


@functools.lru_cache(maxsize=8192)
def stream_key(stream_id: str) -> StreamKey:
    """The sortable form of a Redis stream id; ValueError when it is not one.

    Cached: connections attached at the same hub position share one key instead of a copy each.
    """
    return parse_stream_id(stream_id)


class Cursor:
    """A mutable per-partition position in one epoch; `advance` only ever moves forward."""

    __slots__ = ("_keys", "epoch", "positions")

    def __init__(self, epoch: str, positions: list[str]) -> None:
        self.epoch = epoch
        self.positions = list(positions)
        self._keys = [stream_key(p) for p in self.positions]

    def key(self, partition: int) -> StreamKey:
        return self._keys[partition]

    def covers(self, partition: int, key: StreamKey) -> bool:
        """True when the event at `key` is at or before this cursor's position in `partition`."""
        return key <= self._keys[partition]

    def advance(self, partition: int, stream_id: str, key: StreamKey) -> None:
        if key > self._keys[partition]:
            self._keys[partition] = key
            self.positions[partition] = stream_id

    def copy(self) -> Cursor:
        return Cursor(self.epoch, self.positions)

    def encode(self) -> str:
        return encode_cursor(self.epoch, self.positions)

    @classmethod
    def decode(cls, token: str, *, epoch: str, partitions: int) -> Cursor:
        """Parse a client's cursor for a log of `epoch` with `partitions` partitions.

        Raises:
            MalformedCursor: the token is not a cursor.
            ForeignEpoch: it is a cursor of another epoch or partition count.
        """
        try:
            wire = decode_cursor(token)
        except ValueError as exc:
            raise MalformedCursor(str(exc)) from None
        if wire.epoch != epoch:
            raise ForeignEpoch(f"cursor is for log epoch {wire.epoch!r}, the log is at {epoch!r}")
        if len(wire.positions) != partitions:
            raise ForeignEpoch(f"cursor has {len(wire.positions)} partitions, the log has {partitions}")
        return cls(wire.epoch, wire.positions)
