"""RFC 9457 problem details: every error answer of every Parley HTTP service has this one shape.

`type` is the relative reference `/problems/<slug>`, stable per cause, so clients branch on it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

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
