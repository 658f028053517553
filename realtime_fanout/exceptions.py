"""Errors raised by the realtime fanout.

FanoutError
├── CursorError          a client's cursor cannot be served: the client must resync
│   ├── MalformedCursor  not a cursor this service minted (bad base64/JSON/shape)
│   ├── ForeignEpoch     minted for another incarnation (epoch) or layout of the log
│   └── HistoryGone      older than anything the streams and the archive still hold
├── ProtocolViolation    a client message is not valid JSON of a known type
├── HubUnavailable       the hub is not reading the log (not started, or the log is missing)
└── ClientError          raised by `realtime_fanout.client`
    ├── ClientRejected   the server refused the client for good (4400, 4403; 4401 with a fixed token)
    └── ClientGaveUp     too many consecutive failed connection attempts
"""

from __future__ import annotations


class FanoutError(Exception):
    """Base of every error this package raises."""


class CursorError(FanoutError):
    """Raised when a cursor cannot be served; `reason` is a stable slug sent in the resync frame."""

    reason = "cursor-unusable"


class MalformedCursor(CursorError):
    """Raised when a cursor does not decode into an epoch and one position per partition."""

    reason = "malformed-cursor"


class ForeignEpoch(CursorError):
    """Raised when a cursor names another epoch (the log was recreated) or partition count."""

    reason = "foreign-epoch"


class HistoryGone(CursorError):
    """Raised when events after the cursor were trimmed and no archive can serve them."""

    reason = "history-gone"


class ProtocolViolation(FanoutError):
    """Raised when a client message is malformed or of an unknown type."""


class HubUnavailable(FanoutError):
    """Raised when a session is attached before the hub has opened the log."""


class ClientError(FanoutError):
    """Base of the errors the client library raises to its caller."""


class ClientRejected(ClientError):
    """Raised when the server closes with a code that retrying cannot fix; `code` is that close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed by the server with {code} {reason!r}")
        self.code = code
        self.reason = reason


class ClientGaveUp(ClientError):
    """Raised when `max_failures` consecutive connection attempts failed."""
