"""Property tests of the envelope codec: round trips, total decoding (DecodeError or nothing), upcasting."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import schema
from events.codec import decode, encode, encode_unsequenced_tail
from events.exceptions import DecodeError, UpcastError
from events.ids import ID_PATTERN
from events.schema import Envelope, UnsequencedEnvelope
from events.upcast import UPCASTERS, upcaster

ids = st.from_regex(ID_PATTERN, fullmatch=True)
optional_ids = st.none() | ids
utc_datetimes = st.datetimes(timezones=st.just(UTC))
seqs = st.integers(min_value=1, max_value=2**63 - 1)
# What an event may hold: decoding refuses NUL (Postgres text cannot store it).
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))

PAYLOAD_STRATEGIES: dict[type[schema.Payload], st.SearchStrategy[Any]] = {
    schema.ConversationCreated: st.builds(
        schema.ConversationCreated, title=texts, participants=st.lists(ids, max_size=5).map(tuple)
    ),
    schema.ParticipantAdded: st.builds(schema.ParticipantAdded, user_id=ids),
    schema.ParticipantRemoved: st.builds(schema.ParticipantRemoved, user_id=ids),
    schema.MessageSent: st.builds(schema.MessageSent, message_id=ids, body=texts, reply_to=optional_ids),
    schema.MessageEdited: st.builds(schema.MessageEdited, message_id=ids, body=texts),
    schema.MessageDeleted: st.builds(schema.MessageDeleted, message_id=ids),
    schema.MessagesRead: st.builds(schema.MessagesRead, up_to_seq=seqs),
    schema.ConversationArchived: st.builds(schema.ConversationArchived),
    schema.ConversationUnarchived: st.builds(schema.ConversationUnarchived),
}
payloads = st.one_of(*PAYLOAD_STRATEGIES.values())


def _common_fields(payload: schema.Payload) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "event_id": st.uuids().map(str),
            "schema_version": st.just(type(payload).VERSION),
            "occurred_at": utc_datetimes,
            "actor": ids,
            "conversation_id": ids,
            "correlation_id": ids,
            "payload": st.just(payload),
            "causation_id": optional_ids,
            "idempotency_key": st.none() | texts.filter(bool),
        }
    )


unsequenced_envelopes = payloads.flatmap(_common_fields).map(lambda f: UnsequencedEnvelope(**f))
envelopes = st.builds(
    lambda u, seq: Envelope(seq=seq, **msgspec.structs.asdict(u)), unsequenced_envelopes, seqs
)


def _decode_or_none(data: bytes | str) -> Envelope | None:
    """The totality contract: an Envelope, or DecodeError (→ None); any other exception escapes."""
    try:
        result = decode(data)
    except DecodeError:
        return None
    assert isinstance(result, Envelope)
    return result


def _raw(envelope: Envelope) -> dict[str, Any]:
    raw: dict[str, Any] = msgspec.json.decode(encode(envelope))
    return raw


# --- (a) round trips ---------------------------------------------------------------------------------


def test_every_payload_type_has_a_strategy() -> None:
    assert set(PAYLOAD_STRATEGIES) == set(schema.PAYLOAD_TYPES)


@pytest.mark.parametrize("payload_type", schema.PAYLOAD_TYPES, ids=schema.tag_of)
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_of_each_payload_type(payload_type: type[schema.Payload], data: st.DataObject) -> None:
    payload = data.draw(PAYLOAD_STRATEGIES[payload_type])
    fields = data.draw(_common_fields(payload))
    envelope = Envelope(seq=data.draw(seqs), **fields)
    encoded = encode(envelope)
    assert decode(encoded) == envelope
    assert decode(encoded.decode()) == envelope
    assert decode(encoded).type == schema.tag_of(payload_type)


# --- (b) decoding is total ---------------------------------------------------------------------------


@given(st.binary())
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    _decode_or_none(data)


@given(st.text())
def test_arbitrary_text_decodes_or_raises_decode_error(text: str) -> None:
    _decode_or_none(text.encode())
    _decode_or_none(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(envelopes, st.data())
def test_dropping_a_key_decodes_or_raises_decode_error(envelope: Envelope, data: st.DataObject) -> None:
    raw = _raw(envelope)
    target = data.draw(st.sampled_from([raw, raw["payload"]]))
    del target[data.draw(st.sampled_from(sorted(target)))]
    _decode_or_none(msgspec.json.encode(raw))


@given(envelopes, st.data(), json_values)
def test_changing_a_value_decodes_or_raises_decode_error(
    envelope: Envelope, data: st.DataObject, value: Any
) -> None:
    raw = _raw(envelope)
    target = data.draw(st.sampled_from([raw, raw["payload"]]))
    target[data.draw(st.sampled_from(sorted(target)))] = value
    _decode_or_none(msgspec.json.encode(raw))


@given(envelopes, st.sampled_from([0, -1, 99, 2**70, "x", "1", True, 1.5, None]))
def test_wrong_schema_version_raises_upcast_error(envelope: Envelope, version: object) -> None:
    raw = _raw(envelope)
    raw["schema_version"] = version
    with pytest.raises(UpcastError):
        decode(msgspec.json.encode(raw))


@given(envelopes, st.text().filter(lambda t: t not in schema.CURRENT_VERSIONS) | json_values)
def test_unknown_type_tag_raises_upcast_error(envelope: Envelope, tag: Any) -> None:
    raw = _raw(envelope)
    raw["payload"]["type"] = tag
    with pytest.raises(UpcastError):
        decode(msgspec.json.encode(raw))


@given(envelopes, st.data())
def test_truncated_envelope_raises_decode_error(envelope: Envelope, data: st.DataObject) -> None:
    encoded = encode(envelope)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(DecodeError):
        decode(encoded[:cut])


@pytest.mark.parametrize(
    "data",
    [b"", b"null", b"[]", b"{}", b'"x"', b"1e400", b"[" * 5000, b'{"payload": 1}', b'{"payload": {}}'],
)
def test_degenerate_inputs_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_deeply_nested_unknown_field_raises_decode_error() -> None:
    depth = 5000
    with pytest.raises(DecodeError):
        decode(b'{"x":' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("seq", 0), ("seq", -1), ("seq", 2**63), ("seq", 2**70),
        ("payload.up_to_seq", 0), ("payload.up_to_seq", 2**63),
        ("actor", "a\x00"), ("conversation_id", "\x00"), ("event_id", "e\x00"), ("correlation_id", "\x00"),
        ("causation_id", "\x00"), ("idempotency_key", "k\x00"), ("payload.body", "hi \x00"),
    ],
)  # fmt: skip
def test_values_no_store_can_hold_are_refused_at_decode(path: str, value: Any) -> None:
    """What decodes can be written: sequence numbers in 1..2^63-1 (bigint), no NUL in text (issue 8)."""
    payload = schema.MessagesRead(up_to_seq=3) if "up_to_seq" in path else schema.MessageSent("m", "body")
    raw = _raw(Envelope(seq=1, event_id="e", schema_version=payload.VERSION, occurred_at=datetime.now(UTC),
                        actor="a", conversation_id="c", correlation_id="c", payload=payload))  # fmt: skip
    *parents, name = path.split(".")
    target = raw
    for parent in parents:
        target = target[parent]
    target[name] = value
    with pytest.raises(DecodeError, match=name):
        decode(msgspec.json.encode(raw))
    decode(encode(Envelope(seq=2**63 - 1, event_id="e", schema_version=schema.MessageSent.VERSION,
                           occurred_at=datetime.now(UTC), actor="a", conversation_id="c", correlation_id="c",
                           payload=schema.MessageSent("m", "a literal \\u0000 is text"))))  # fmt: skip


def test_nul_in_a_participant_or_title_is_refused() -> None:
    for payload in (schema.ConversationCreated("t", ("a", "b\x00")), schema.ConversationCreated("\x00", ())):
        envelope = Envelope(seq=1, event_id="e", schema_version=1, occurred_at=datetime.now(UTC), actor="a",
                            conversation_id="c", correlation_id="c", payload=payload)  # fmt: skip
        with pytest.raises(DecodeError, match="NUL"):
            decode(encode(envelope))


# --- (c) the log's prefix + the unsequenced tail -----------------------------------------------------


@given(unsequenced_envelopes, seqs)
def test_seq_prefix_plus_unsequenced_tail_decodes_with_that_seq(
    unsequenced: UnsequencedEnvelope, seq: int
) -> None:
    stored = b'{"seq":%d,' % seq + encode_unsequenced_tail(unsequenced)
    assert decode(stored) == Envelope(seq=seq, **msgspec.structs.asdict(unsequenced))


@given(unsequenced_envelopes)
def test_unsequenced_envelope_alone_is_not_an_event(unsequenced: UnsequencedEnvelope) -> None:
    with pytest.raises(DecodeError):
        decode(encode(unsequenced))


# --- (d) upcasting -----------------------------------------------------------------------------------


def _v1_message_sent(envelope: Envelope, message_id: str, text: str) -> bytes:
    raw = _raw(envelope)
    raw["schema_version"] = 1
    raw["payload"] = {"type": "message_sent", "message_id": message_id, "text": text}
    return msgspec.json.encode(raw)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, ids, texts)
def test_message_sent_v1_decodes_as_v2(envelope: Envelope, message_id: str, text: str) -> None:
    decoded = decode(_v1_message_sent(envelope, message_id, text))
    assert decoded.payload == schema.MessageSent(message_id=message_id, body=text, reply_to=None)
    assert decoded.schema_version == schema.MessageSent.VERSION == 2
    assert msgspec.structs.replace(
        decoded, payload=envelope.payload, schema_version=envelope.schema_version
    ) == (envelope)


def test_message_sent_v1_without_text_raises_upcast_error() -> None:
    envelope = Envelope(
        seq=1, event_id="e", schema_version=2, occurred_at=datetime(2024, 1, 1, tzinfo=UTC), actor="a",
        conversation_id="c", correlation_id="e", payload=schema.MessageSent(message_id="m", body="b"),
    )  # fmt: skip
    raw = msgspec.json.decode(_v1_message_sent(envelope, "m", "hi"))
    del raw["payload"]["text"]
    with pytest.raises(UpcastError, match="upcast failed"):
        decode(msgspec.json.encode(raw))


@given(envelopes, st.integers(min_value=1, max_value=1000))
def test_version_newer_than_current_raises_upcast_error(envelope: Envelope, ahead: int) -> None:
    raw = _raw(envelope)
    raw["schema_version"] = schema.CURRENT_VERSIONS[envelope.type] + ahead
    with pytest.raises(UpcastError, match="newer than this reader"):
        decode(msgspec.json.encode(raw))


def test_upcaster_registry_refuses_a_duplicate() -> None:
    before = dict(UPCASTERS)
    with pytest.raises(ValueError, match="duplicate upcaster"):
        upcaster("message_sent", 1)(lambda envelope: envelope["payload"])
    assert before == UPCASTERS
