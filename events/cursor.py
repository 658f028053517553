"""The wire form of a fanout cursor, shared by every reader that accepts one (fanout, query API, replay).

Wire form: base64url (no padding) of msgspec JSON `{"epoch": str, "positions": [stream id per partition]}`.
A position means "every event at or before this stream id of that partition has been handled".
"""

from __future__ import annotations

import base64
import binascii

import msgspec

from events.position import parse_stream_id

MAX_CURSOR_CHARS = 4096


class CursorWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    epoch: str
    positions: list[str]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CursorWire)


def encode_cursor(epoch: str, positions: list[str]) -> str:
    """The opaque text a client stores and sends back."""
    return base64.urlsafe_b64encode(_encoder.encode(CursorWire(epoch, positions))).rstrip(b"=").decode()


def decode_cursor(token: str) -> CursorWire:
    """Parse a cursor's text, checking every position is a stream id (not the epoch or partition count).

    Raises:
        ValueError: the text is not a cursor.
    """
    if not isinstance(token, str) or len(token) > MAX_CURSOR_CHARS:
        raise ValueError(f"cursor must be a string of at most {MAX_CURSOR_CHARS} characters")
    try:
        wire = _decoder.decode(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        for position in wire.positions:
            parse_stream_id(position)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise ValueError(f"not a cursor: {exc}") from None
    return wire
