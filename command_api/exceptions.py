"""Errors raised by the command side; the HTTP layer turns each into one problem+json answer.

CommandError
├── CommandInvalid       the request is malformed or breaks a limit (4xx, nothing appended)
├── CommandRefused       the log's write-side state forbids it (403/404/409/410/422)
├── RateLimited          the user's token bucket is empty (429)
└── LogUnavailable       Redis did not answer or the log is being recreated (503; outcome
                         unknown for an append in flight: retry with the same Idempotency-Key)
"""

from __future__ import annotations


class CommandError(Exception):
    """Base of every error this package raises."""


class CommandInvalid(CommandError):
    """Raised when a request is malformed, has unknown fields, or breaks a validation limit."""

    def __init__(self, reason: str, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


class CommandRefused(CommandError):
    """Raised when the append script refuses a command; `reason` is the script's stable slug."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RateLimited(CommandError):
    """Raised when a user has used up their command budget; `retry_after_s` says when to retry."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limited, retry after {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s


class LogUnavailable(CommandError):
    """Raised when the log cannot be reached or is being recreated; the command may or may not be in it."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
