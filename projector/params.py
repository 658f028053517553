"""The query API's parameters, parsed without I/O: whatever a client sends is a value Postgres accepts
or a `Problem` (400/404), never a driver error."""

from __future__ import annotations

import base64
import re
from datetime import datetime

import msgspec

from events.cursor import MAX_CURSOR_CHARS as MAX_FANOUT_CURSOR_CHARS
from events.cursor import decode_cursor as decode_fanout_cursor
from events.ids import is_valid_conversation_id, is_valid_id
from events.position import LogPosition

MAX_LIMIT = 200
MAX_SEQ = 2**63 - 1  # int8, the type of every seq column
MAX_CURSOR_CHARS = 256
MAX_POSITION_CHARS = 128
_TERM = re.compile(r"\w+")  # a run the full-text parser makes one lexeme of

_encoder = msgspec.json.Encoder()


class Problem(Exception):
    """An error answer: status, stable slug, title, detail, headers."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "", **headers: str) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail, self.headers = status, slug, title, detail, headers


def _ascii_int(raw: str, most: int) -> int | None:
    """`raw` as a non-negative integer of ASCII digits up to `most`, else None (no Unicode digits, no
    signs, no int() of an unbounded string)."""
    if not (0 < len(raw) <= len(str(most)) and raw.isascii() and raw.isdigit()):
        return None
    value = int(raw)
    return value if value <= most else None


def parse_limit(raw: str | None, default: int) -> int:
    """The page size: 1..MAX_LIMIT.

    Raises:
        Problem: 400 `invalid-limit`.
    """
    if raw is None:
        return default
    value = _ascii_int(raw, MAX_LIMIT)
    if value is None or value < 1:
        raise Problem(400, "invalid-limit", "Invalid limit", f"limit must be 1..{MAX_LIMIT}")
    return value


def parse_seq(name: str, raw: str | None) -> int | None:
    """A sequence bound (`after_seq`, `before_seq`): 0..2^63-1.

    Raises:
        Problem: 400 `invalid-after-seq` / `invalid-before-seq`.
    """
    if raw is None:
        return None
    value = _ascii_int(raw, MAX_SEQ)
    if value is None:
        raise Problem(400, f"invalid-{name.replace('_', '-')}", f"Invalid {name}",
                      f"{name} must be an integer 0..{MAX_SEQ}")  # fmt: skip
    return value


def check_conversation_id(conversation_id: str) -> str:
    """A path id no conversation can have is answered like any conversation the caller is not in.

    Raises:
        Problem: 404 `conversation-not-found`.
    """
    if not is_valid_conversation_id(conversation_id):
        raise not_found()
    return conversation_id


def not_found() -> Problem:
    return Problem(404, "conversation-not-found", "No such conversation among yours")


def parse_search(raw: str | None, max_chars: int, max_terms: int) -> str:
    """The search text, stripped, bounded in characters and in terms (runs of letters and digits).

    Raises:
        Problem: 400 `missing-query`, `invalid-query` (a NUL), `query-too-long`, `query-too-many-terms`.
    """
    text = (raw or "").strip()
    if not text:
        raise Problem(400, "missing-query", "Missing q", "give the words to search for in q")
    if len(text) > max_chars:
        raise Problem(400, "query-too-long", "Search text too long", f"q is at most {max_chars} characters")
    if "\x00" in text:
        raise Problem(400, "invalid-query", "Invalid q", "q must not contain NUL characters")
    if len(_TERM.findall(text)) > max_terms:
        raise Problem(
            400, "query-too-many-terms", "Too many search terms", f"q has at most {max_terms} terms"
        )
    return text


def encode_cursor(at: datetime, conversation_id: str) -> str:
    return base64.urlsafe_b64encode(_encoder.encode([at.isoformat(), conversation_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Parse `encode_cursor` output.

    Raises:
        Problem: 400 `invalid-cursor` (also for an id no conversation can have).
    """
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        at, cid = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(at, str) and isinstance(cid, str) and is_valid_conversation_id(cid)):
            raise ValueError("not a cursor")
        return datetime.fromisoformat(at), cid
    except (ValueError, TypeError, msgspec.DecodeError):
        raise Problem(
            400, "invalid-cursor", "Invalid cursor", "pass back the `next_cursor` you were given"
        ) from None


def parse_position(token: str, partitions: int) -> LogPosition:
    """A command API `position_token` of this log's partitions.

    Raises:
        Problem: 400 `invalid-position`.
    """
    if len(token) > MAX_POSITION_CHARS:
        raise Problem(400, "invalid-position", "Invalid log position", "too long")
    try:
        position = LogPosition.from_token(token)
    except ValueError as exc:
        raise Problem(400, "invalid-position", "Invalid log position", str(exc)) from None
    if not is_valid_id(position.epoch):
        raise Problem(400, "invalid-position", "Invalid log position", "not an epoch")
    if not 0 <= position.partition < partitions:
        raise Problem(400, "invalid-position", "Invalid log position", "no such partition")
    return position


def parse_wait(token: str, partitions: int) -> list[LogPosition]:
    """What a read must wait for: a command's `position_token` (one position; it has dots) or a fanout
    cursor (base64url, no dots: one position per partition).

    Raises:
        Problem: 400 `invalid-position`.
    """
    if "." in token:
        return [parse_position(token, partitions)]
    if len(token) > MAX_FANOUT_CURSOR_CHARS:
        raise Problem(400, "invalid-position", "Invalid log position", "too long")
    try:
        wire = decode_fanout_cursor(token)
    except ValueError as exc:
        raise Problem(400, "invalid-position", "Invalid log position", str(exc)) from None
    if not is_valid_id(wire.epoch):
        raise Problem(400, "invalid-position", "Invalid log position", "not an epoch")
    if len(wire.positions) != partitions:
        detail = f"a cursor of {len(wire.positions)} partitions; the log has {partitions}"
        raise Problem(400, "invalid-position", "Invalid log position", detail)
    return [LogPosition(p, stream_id, wire.epoch) for p, stream_id in enumerate(wire.positions)]
