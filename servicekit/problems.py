"""RFC 9457 problem details: every error answer of every Parley HTTP service has this one shape.

`type` is the relative reference `/problems/<slug>`, stable per cause, so clients branch on it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_encoder = msgspec.json.Encoder()


def problem_type(slug: str) -> str:
    return f"/problems/{slug}"


def problem_body(status: int, slug: str, title: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": problem_type(slug), "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str = "",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """An `application/problem+json` response with a stable `type` for `slug`."""
    return Response(
        _encoder.encode(problem_body(status, slug, title, detail, **extra)),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string", "description": "`/problems/<slug>`, stable per cause"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "required": ["type", "title", "status"],
}


def bearer_challenge(reason: str) -> str:
    """The `WWW-Authenticate` value for a refused bearer token (RFC 6750), naming the stable reason."""
    return f'Bearer error="invalid_token", error_description="{reason}"'


def add_http_problem_handlers(app: FastAPI) -> None:
    """Answer the framework's own errors (unknown route, wrong method, bad parameters) as problems too."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem_response(exc.status_code, slug, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return problem_response(422, "invalid-request", "Invalid request", str(exc.errors()))


class AnswerUnexpected:
    """Every service's last resort: a bug answers 500 problem+json (`internal-error`, no Retry-After: a
    retry meets the same bug), logged with the route, and the connection stays usable (Starlette's own
    handler re-raises after answering, and the server then drops the keep-alive connection)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("%s %s %r failed", self.service, scope["method"], scope["path"])
            if started:  # too late for an answer: the server closes the connection
                raise
            await problem_response(500, "internal-error", "Internal server error")(scope, receive, send)
