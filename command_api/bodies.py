"""Request bodies (msgspec Structs) and the checks msgspec cannot express: ids, text, limits.

Pure: bytes and limits in, a valid normalized body out, or `CommandInvalid` naming the cause.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TypeVar

import msgspec

from command_api.exceptions import CommandInvalid
from events.ids import is_valid_conversation_id, is_valid_id

# C0 controls but tab and newline, DEL, C1 controls.
_CONTROLS = r"\x00-\x08\x0b-\x1f\x7f-\x9f"
_FORBIDDEN_CONTROLS = re.compile(f"[{_CONTROLS}]")
TEXT_PATTERN = rf"^[^{_CONTROLS}]*[^{_CONTROLS}\s][^{_CONTROLS}]*$"
"""The texts clean_text accepts but for their length (no control character, not blank), for OpenAPI."""
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
MAX_TITLE_CHARS = 200
MAX_PARTICIPANTS = 1_000
MAX_EXPECTED_SEQ = 10**15 - 1
"""15 digits at most: every such integer is exact in the append script's Lua numbers (doubles)."""
_EXPECTED_SEQ = re.compile(r"[0-9]{1,15}")


class Body(msgspec.Struct, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are refused."""


class CreateConversation(Body):
    title: str
    participants: list[str] = []
    conversation_id: str | None = None


class AddParticipant(Body):
    user_id: str


class SendMessage(Body):
    body: str
    reply_to: str | None = None
    message_id: str | None = None


class EditMessage(Body):
    body: str


class MarkRead(Body):
    up_to_seq: int


B = TypeVar("B", bound=Body)

_decoders: dict[type[Body], msgspec.json.Decoder[object]] = {}


def decode_body(data: bytes, body_type: type[B]) -> B:
    """Decode a JSON request body strictly.

    Raises:
        CommandInvalid: malformed JSON (400), or wrong shape / unknown field (422).
    """
    decoder = _decoders.get(body_type)
    if decoder is None:
        decoder = _decoders[body_type] = msgspec.json.Decoder(body_type)
    try:
        result = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise CommandInvalid("invalid-body", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise CommandInvalid("malformed-json", str(exc), status=400) from None
    assert isinstance(result, body_type)
    return result


def check_id(value: str, field: str) -> str:
    """Return `value` if it is a valid id, else raise `CommandInvalid` naming `field`."""
    if not is_valid_id(value):
        raise CommandInvalid("invalid-id", f"{field}: ids are 1-64 characters of A-Z a-z 0-9 _ . @ -")
    return value


def check_conversation_id(value: str) -> str:
    """Return `value` if it is a conversation id (`<creator>:<id>` or an id), else raise `CommandInvalid`."""
    if not is_valid_conversation_id(value):
        raise CommandInvalid(
            "invalid-id", "conversation_id: an id, or <creator>:<id> for one its creator chose"
        )
    return value


def clean_text(value: str, field: str, max_chars: int) -> str:
    """NFC-normalize `value` and check it: 1..max_chars characters, not blank, no control characters
    other than newline and tab.
    """
    text = unicodedata.normalize("NFC", value)
    if _FORBIDDEN_CONTROLS.search(text):
        raise CommandInvalid("control-characters", f"{field}: control characters are not allowed")
    if not text.strip():
        raise CommandInvalid("empty-text", f"{field}: must not be empty or blank")
    if len(text) > max_chars:
        raise CommandInvalid("text-too-long", f"{field}: {len(text)} characters, at most {max_chars} allowed")
    return text


def is_json_media_type(value: str) -> bool:
    """Whether a Content-Type names JSON: `application/json`, any case (RFC 9110 8.3.1), parameters
    allowed but a charset other than UTF-8 (RFC 8259 8.1). `+json` types are not: their documents mean
    something else (a JSON Patch is not a message body), so they are refused rather than misread.
    """
    if value == "application/json":
        return True
    media_type, _, parameters = value.partition(";")
    if media_type.strip().lower() != "application/json":
        return False
    for parameter in parameters.split(";"):
        name, _, setting = parameter.partition("=")
        if name.strip().lower() == "charset" and setting.strip().strip('"').lower() != "utf-8":
            return False
    return True


def check_expected_seq(value: str) -> int:
    """The `expected_seq` query parameter: ASCII digits only (`str.isdigit` and `int` take others)."""
    if _EXPECTED_SEQ.fullmatch(value) is None:
        raise CommandInvalid(
            "invalid-expected-seq",
            f"expected_seq must be an integer from 0 to {MAX_EXPECTED_SEQ}",
            status=400,
        )
    return int(value)


def check_idempotency_key(value: str | None) -> str:
    """The Idempotency-Key header, or "" when absent; 1-255 visible ASCII characters (`!` to `~`, no space:
    HTTP strips whitespace at either end of a header value, so no key may depend on it)."""
    if value is None:
        return ""
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise CommandInvalid(
            "invalid-idempotency-key",
            "Idempotency-Key must be 1-255 visible ASCII characters (! to ~, no space)",
            status=400,
        )
    return value
