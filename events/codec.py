"""JSON codec for envelopes: one typed decoder per process, upcasting on the slow path only.

Decoding never raises anything but `DecodeError` (or its subclass `UpcastError`), whatever the bytes, and
what it returns can be stored as is: sequence numbers within bigint (`schema.Seq`) and no text holding NUL
(U+0000), which Postgres text refuses. Every reader (projector, fanout, redrive) decodes here, so they all
refuse the same entries.
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


class _PayloadProbe(msgspec.Struct, frozen=True):
    type: str


class _VersionProbe(msgspec.Struct, frozen=True):
    schema_version: int
    payload: _PayloadProbe


_probe = msgspec.json.Decoder(_VersionProbe)


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
        envelope = _decode_slow(data)
    else:
        if envelope.schema_version != CURRENT_VERSIONS[envelope.type]:
            envelope = _decode_slow(data)
    if _ESCAPED_NUL in data:  # JSON text can only hold NUL escaped; a raw 0x00 byte is malformed JSON
        _refuse_nul(msgspec.to_builtins(envelope), "$")
    return envelope


_ESCAPED_NUL = b"\\u0000"


def _refuse_nul(value: Any, path: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise DecodeError(f"text holds NUL (U+0000), which cannot be stored - at `{path}`")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _refuse_nul(item, f"{path}[{i}]")


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


def current_bytes(data: bytes) -> bytes:
    """A stored event's JSON in the current schema: its own bytes when its version is current (the usual
    case, checked without a full decode), else the upcast event encoded in the log's shape (`seq` first).

    Raises:
        DecodeError: the bytes are not a valid event of a known type and version.
    """
    try:
        probe = _probe.decode(data)
        if CURRENT_VERSIONS.get(probe.payload.type) == probe.schema_version:
            return data
    except (msgspec.DecodeError, RecursionError):
        pass
    envelope = decode(data)
    fields = {f: getattr(envelope, f) for f in UnsequencedEnvelope.__struct_fields__}
    return b'{"seq":%d,' % envelope.seq + encode_unsequenced_tail(UnsequencedEnvelope(**fields))
