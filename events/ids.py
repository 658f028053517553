"""Identifiers: time-ordered event ids (UUIDv7) and the shapes accepted for user and object ids."""

from __future__ import annotations

import re

import uuid_utils

ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
"""User and message ids, and conversation ids as clients choose them: 1-64 URL-safe characters,
never a separator used in log keys."""

CONVERSATION_ID_PATTERN = r"^(?:[A-Za-z0-9_.@-]{1,64}:)?[A-Za-z0-9_.@-]{1,64}$"
"""A conversation id: an id the server chose, or `<creator>:<id>` for an id the creator chose (as the
last part of a log key, its ':' is no ambiguity)."""

_ID_RE = re.compile(ID_PATTERN)
_CONVERSATION_ID_RE = re.compile(CONVERSATION_ID_PATTERN)


def new_event_id() -> str:
    """A UUIDv7 string: unique, and sorting by it sorts by creation time (millisecond precision)."""
    return str(uuid_utils.uuid7())


def new_object_id() -> str:
    """A fresh id for a conversation or message (UUIDv7, so ids sort roughly by creation time)."""
    return str(uuid_utils.uuid7())


def is_valid_id(value: str) -> bool:
    """Whether `value` is acceptable as a user or message id, or as the id a creator chooses."""
    return _ID_RE.fullmatch(value) is not None


def is_valid_conversation_id(value: str) -> bool:
    """Whether `value` is acceptable as a conversation id (either form of `CONVERSATION_ID_PATTERN`)."""
    return _CONVERSATION_ID_RE.fullmatch(value) is not None


def chosen_conversation_id(creator: str, chosen: str) -> str:
    """The id of a conversation whose creator chose `chosen`: it lives in the creator's namespace, so
    choosing an id that is taken only ever collides with one's own conversations (':' is in no id).
    """
    return f"{creator}:{chosen}"
