"""Log positions: where an event sits (partition, Redis stream id) in which incarnation (epoch) of the log."""

from __future__ import annotations

import msgspec


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """Split a Redis stream id `ms-seq` into integers, for ordering.

    Raises:
        ValueError: the text is not a stream id.
    """
    ms, dash, seq = stream_id.partition("-")  # no regex: readers parse one per entry
    if not (dash and _digits(ms) and _digits(seq)):
        raise ValueError(f"not a stream id: {stream_id!r}")
    return int(ms), int(seq)


def _digits(text: str) -> bool:
    return 0 < len(text) <= 20 and text.isascii() and text.isdigit()


class LogPosition(msgspec.Struct, frozen=True):
    """The position of one appended event; totally ordered within a partition of one epoch."""

    partition: int
    stream_id: str
    epoch: str

    def token(self) -> str:
        """The opaque text form a client echoes back (`epoch.partition.stream_id`)."""
        return f"{self.epoch}.{self.partition}.{self.stream_id}"

    @classmethod
    def from_token(cls, token: str) -> LogPosition:
        """Parse `token()` output.

        Raises:
            ValueError: the token is malformed.
        """
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not (parts[1].isascii() and parts[1].isdigit()):
            raise ValueError(f"malformed log position {token!r}")
        parse_stream_id(parts[2])
        return cls(partition=int(parts[1]), stream_id=parts[2], epoch=parts[0])
