"""Cursors: an opaque, epoch-scoped position per partition that clients echo back to resume.

Wire form: base64url (no padding) of msgspec JSON `{"epoch": str, "positions": [stream id per partition]}`.
A position means "every event at or before this stream id of that partition has been handled".
"""

from __future__ import annotations

import base64
import binascii
import functools

import msgspec

from events.position import parse_stream_id
from realtime_fanout.exceptions import ForeignEpoch, MalformedCursor

StreamKey = tuple[int, int]

MAX_CURSOR_CHARS = 4096


@functools.lru_cache(maxsize=8192)
def stream_key(stream_id: str) -> StreamKey:
    """The sortable form of a Redis stream id; ValueError when it is not one.

    Cached: connections attached at the same hub position share one key instead of a copy each.
    """
    return parse_stream_id(stream_id)


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    epoch: str
    positions: list[str]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Wire)


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
        raw = _encoder.encode(_Wire(self.epoch, self.positions))
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, token: str, *, epoch: str, partitions: int) -> Cursor:
        """Parse a client's cursor for a log of `epoch` with `partitions` partitions.

        Raises:
            MalformedCursor: the token is not a cursor.
            ForeignEpoch: it is a cursor of another epoch or partition count.
        """
        if not isinstance(token, str) or len(token) > MAX_CURSOR_CHARS:
            raise MalformedCursor("cursor must be a string of at most 4096 characters")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            wire = _decoder.decode(raw)
            for position in wire.positions:
                stream_key(position)
        except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
            raise MalformedCursor(f"not a cursor: {exc}") from None
        if wire.epoch != epoch:
            raise ForeignEpoch(f"cursor is for log epoch {wire.epoch!r}, the log is at {epoch!r}")
        if len(wire.positions) != partitions:
            raise ForeignEpoch(f"cursor has {len(wire.positions)} partitions, the log has {partitions}")
        return cls(wire.epoch, wire.positions)
