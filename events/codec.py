"""JSON codec for envelopes: one typed decoder per process, upcasting on the slow path only.

Decoding never raises anything but `DecodeError` (or its subclass `UpcastError`), whatever the bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events.exceptions import DecodeError
from events.schema import CURRENT_VERSIONS, Envelope, UnsequencedEnvelope
from events.upcast import upcast

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)
_untyped = msgspec.json.Decoder()


def encode(envelope: Envelope | UnsequencedEnvelope) -> bytes:
    """Encode an envelope to its wire and log form (compact JSON)."""
    return _encoder.encode(envelope)


def encode_unsequenced_tail(envelope: UnsequencedEnvelope) -> bytes:
    """The unsequenced envelope's JSON without its opening brace; the log prepends `{"seq":N,`."""
    return _encoder.encode(envelope)[1:]


def decode(data: bytes | str) -> Envelope:
    """Decode one stored event into the current schema.

    Raises:
        DecodeError: the bytes are not a valid event of a known type and version.
    """
    if isinstance(data, str):
        try:
            data = data.encode()
        except UnicodeEncodeError as exc:
            raise DecodeError(f"not valid UTF-8 text: {exc}") from None
    try:
        envelope = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return _decode_slow(data)
    if envelope.schema_version != CURRENT_VERSIONS[envelope.type]:
        return _decode_slow(data)
    return envelope


def _decode_slow(data: bytes | str) -> Envelope:
    try:
        raw: Any = _untyped.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"expected a JSON object, got {type(raw).__name__}")
    lifted = upcast(raw)
    try:
        return _decoder.decode(_encoder.encode(lifted))
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"not a valid {lifted['payload'].get('type')} event: {exc}") from None
