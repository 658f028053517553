"""How the append script names a message in its conversation's write-side state: pure, no I/O.

The write side keeps one field per message for as long as the conversation lives (the decider needs every
message's author and whether it is deleted, whatever its age), so that field is small: a server-made id
(a lowercase UUID, 36 characters) as its 16 bytes, any other id as its text and 3 bytes of its CRC-32, each
behind a first byte no other field starts with. Its last 3 bytes are the hash that picks its bucket
(append.lua; README, Operating): random bits of a UUIDv7 or UUIDv4, the CRC of any other id.
"""

from __future__ import annotations

import re
import zlib

_PACKED = b"\xff"
_TEXT = b"\xfe"
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def message_field(message_id: str) -> bytes:
    """The hash field of `message_id`: distinct ids never share a field, and none is any other field's."""
    if len(message_id) == 36 and _CANONICAL_UUID.fullmatch(message_id):
        return _PACKED + bytes.fromhex(message_id.replace("-", ""))
    text = message_id.encode()
    return _TEXT + text + (zlib.crc32(text) & 0xFFFFFF).to_bytes(3, "big")


def field_hash(field: bytes) -> int:
    """The 24-bit hash of a message field: its last 3 bytes."""
    return int.from_bytes(field[-3:], "big")


def bucket_of(field: bytes, buckets: int) -> int:
    """The bucket holding `field` among `buckets` (linear hashing; append.lua computes the same)."""
    low = 1 << (buckets.bit_length() - 1)
    bucket = field_hash(field) % (low * 2)
    return bucket if bucket < buckets else field_hash(field) % low
