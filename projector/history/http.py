"""`GET /v1/history` on the query API: the replay's selection over HTTP, for analysts only.

JSON pages (`limit` events and `next_from`, a fanout cursor that resumes exactly after the page), or
the whole selection streamed as NDJSON (`format=ndjson` or `Accept: application/x-ndjson`). Each item
is `{"position": token, "event": E}`, E as the replay writes it (current schema). Only tokens whose
`PARLEY_ANALYST_CLAIM` claim holds `PARLEY_ANALYST_ROLE` get anything: everyone else gets 403 whatever
the filters, so no selection can show a conversation to someone who is not in it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from events.cursor import encode_cursor
from events.log import EventLog
from projector.exceptions import SelectionError
from projector.history.reader import HistoryReader, Row
from projector.history.selection import MAX_SEQ, StreamKey, check_epoch, key_text, select
from projector.history.sinks import positioned
from servicekit.auth import Principal

NDJSON = "application/x-ndjson"
MAX_LIMIT = 1000
ConnectionSource = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class HistoryForbidden(Exception):
    """Raised when the caller's token does not carry the analyst role."""


def has_role(principal: Principal, claim: str, role: str) -> bool:
    """The claim holds `role`: a list of names, or one space-separated string (OAuth `scope` style)."""
    value = principal.claims.get(claim)
    if isinstance(value, str):
        return role in value.split()
    if isinstance(value, list | tuple):
        return role in value
    return False


def next_from(epoch: str, partitions: int, last: Row) -> str:
    """The cursor right after `last` in replay order (log time, then partition), for every partition."""
    ms, seq, partition = last[0], last[1], last[2]
    before = (ms, seq - 1) if seq > 0 else (ms - 1, MAX_SEQ)
    keys: list[StreamKey] = [(ms, seq) if p <= partition else before for p in range(partitions)]
    return encode_cursor(epoch, [key_text(k) for k in keys])


def add_history_route(
    app: FastAPI,
    *,
    authorize: Callable[[Request], Principal],
    claim: str,
    role: str,
    connection: ConnectionSource,
    log: Callable[[], EventLog],
    epoch: Callable[[], str | None],
    problem: Callable[[int, str, str, str], Exception],
) -> None:
    """Mount `GET /v1/history`; `problem(status, slug, title, detail)` makes the app's error answer."""

    def selection_of(request: Request, partitions: int, partition_of: Callable[[str], int]) -> Any:
        q = request.query_params
        try:
            return select(
                partitions, partition_of, start=q.get("from"), end=q.get("to"), since=q.get("since"),
                until=q.get("until"), conversations=q.getlist("conversation"), types=q.getlist("type"),
                actors=q.getlist("actor"),
            )  # fmt: skip
        except SelectionError as exc:
            status = 409 if exc.reason == "position-from-another-log" else 400
            raise problem(status, exc.reason, "Invalid history selection", str(exc)) from None

    def limit_of(request: Request) -> int:
        raw = request.query_params.get("limit", "100")
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT):
            raise problem(400, "invalid-limit", "Invalid limit", f"limit must be 1..{MAX_LIMIT}")
        return int(raw)

    @app.get(
        "/v1/history", tags=["analysts"],
        summary="Event history (analysts only): JSON pages or an NDJSON stream, filtered like the replay",
    )  # fmt: skip
    async def history(request: Request) -> Response:
        principal = authorize(request)
        if not has_role(principal, claim, role):
            raise problem(403, "analyst-role-required", "Analysts only",
                          f"the token's {claim!r} claim must include {role!r}")  # fmt: skip
        the_log = log()
        layout = the_log.layout
        selection = selection_of(request, layout.partitions, layout.partition_for)
        streaming = request.query_params.get("format") == "ndjson" or NDJSON in request.headers.get(
            "accept", ""
        )
        limit = None if streaming else limit_of(request)
        current = epoch()
        if current is None:
            raise problem(503, "log-unavailable", "The log has not been opened yet", "retry shortly")
        try:
            check_epoch(selection, current)
        except SelectionError as exc:
            raise problem(409, exc.reason, "Position from another log epoch", str(exc)) from None

        async def rows(page: int) -> AsyncGenerator[list[Row]]:
            async with connection() as conn:
                reader = HistoryReader(conn, the_log, current, selection, page)
                async for found in reader.pages():
                    yield found

        if streaming:

            async def body() -> AsyncIterator[bytes]:
                async for found in rows(5000):
                    yield b"".join(positioned(current, r) + b"\n" for r in found)

            return StreamingResponse(body(), media_type=NDJSON)

        assert limit is not None
        taken: list[Row] = []
        source = rows(limit)
        try:
            async for found in source:
                taken += found[: limit - len(taken)]
                if len(taken) >= limit:
                    break
        finally:
            await source.aclose()
        more = len(taken) >= limit
        cursor = next_from(current, layout.partitions, taken[-1]) if taken else None
        payload = b'{"events":[%s],"next_from":%s,"more":%s}' % (
            b",".join(positioned(current, r) for r in taken),
            b'"%s"' % cursor.encode() if cursor else b"null",
            b"true" if more else b"false",
        )
        return Response(payload, media_type="application/json")
