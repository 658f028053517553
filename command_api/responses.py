"""The 202 answer every accepted command gets, and its OpenAPI schema."""

from __future__ import annotations

import msgspec

from events.position import LogPosition


class Accepted(msgspec.Struct, frozen=True, omit_defaults=True):
    """The command is in the log at `position`; echo `position_token` to read your writes or resume."""

    conversation_id: str
    event_ids: list[str]
    seq: int
    position: LogPosition
    position_token: str
    message_id: str | None = None


encoder = msgspec.json.Encoder()
