"""Every command-side error as one RFC 9457 answer: status, headers, body, and its metric labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from command_api.exceptions import CommandInvalid, CommandRefused, LogUnavailable, RateLimited
from command_api.refusals import refusal_status
from servicekit.exceptions import AuthError
from servicekit.problems import bearer_challenge, problem_body

_encoder = msgspec.json.Encoder()
_SEQ_DETAIL = ("sequence-mismatch", "read-marker-not-advanced", "read-beyond-end")


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    outcome: str
    reason: str


def _problem(
    status: int, slug: str, title: str, detail: str, outcome: str,
    headers: tuple[tuple[str, str], ...] = (), extra: dict[str, Any] | None = None,
) -> Problem:  # fmt: skip
    body = _encoder.encode(problem_body(status, slug, title, detail, **(extra or {})))
    return Problem(status, body, headers, outcome, slug)


def problem_for(exc: Exception) -> Problem:
    """The answer for a command-side error; anything else is re-raised (a bug, answered 500)."""
    if isinstance(exc, CommandInvalid):
        return _problem(exc.status, exc.reason, "Invalid command", exc.detail, "invalid")
    if isinstance(exc, CommandRefused):
        status, title = refusal_status(exc.reason)
        extra = {"current_seq": int(exc.detail)} if exc.reason in _SEQ_DETAIL else {}
        return _problem(status, exc.reason, title, "", "refused", extra=extra)
    if isinstance(exc, RateLimited):
        retry = max(1, int(exc.retry_after_s + 0.999))
        return _problem(
            429, "rate-limited", "Too many commands", f"retry after {exc.retry_after_s:.3f}s",
            "rate_limited", (("retry-after", str(retry)),),
        )  # fmt: skip
    if isinstance(exc, LogUnavailable):
        return _problem(
            503, "log-unavailable", "The log is unavailable",
            f"{exc.detail}. If a command was in flight its outcome is unknown: retry it with "
            "the same Idempotency-Key.",
            "unavailable", (("retry-after", "1"),),
        )  # fmt: skip
    if isinstance(exc, AuthError):
        challenge = bearer_challenge(exc.reason)
        return _problem(
            401, exc.reason, "Authentication required", exc.detail, "unauthorized",
            (("www-authenticate", challenge),),
        )  # fmt: skip
    raise exc
