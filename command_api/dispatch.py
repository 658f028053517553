"""The hot path: command requests handled as plain ASGI, ahead of the framework's middleware and routing.

Authenticate, rate-limit, validate, build, append, answer 202. Measured: FastAPI's per-request
routing and dependency machinery cost more than all of this together (BENCHMARKS.md), so command
routes skip it; everything else (health, metrics, OpenAPI, errors) is served by FastAPI.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from command_api import routes
from command_api.bodies import (
    check_expected_seq,
    check_id,
    check_idempotency_key,
    decode_body,
    is_json_media_type,
)
from command_api.commands import Context, decode_memo
from command_api.exceptions import CommandInvalid, CommandRefused, LogUnavailable, RateLimited
from command_api.metrics import APPEND_SECONDS, COMMANDS
from command_api.problems import problem_for
from command_api.responses import Accepted, encoder
from command_api.services import Services
from servicekit.auth import parse_bearer
from servicekit.exceptions import AuthError
from servicekit.problems import PROBLEM_MEDIA_TYPE, problem_response

log = logging.getLogger(__name__)

_HANDLED = (CommandInvalid, CommandRefused, RateLimited, LogUnavailable, AuthError)
_ASCII_DIGITS = re.compile(r"[0-9]+")
Headers = dict[bytes, bytes]


class CommandDispatcher:
    """Answers every route of `routes.ROUTES`; `fallback` gets everything else."""

    def __init__(self, fallback: ASGIApp, services: Callable[[], Services]) -> None:
        self.fallback = fallback
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.fallback(scope, receive, send)
            return
        route, params, allowed = routes.match(scope["method"], scope["path"])
        if route is None:
            if not allowed:
                await self.fallback(scope, receive, send)
                return
            exc = CommandInvalid("method-not-allowed", f"allowed: {', '.join(allowed)}", status=405)
            problem = problem_for(exc)
            await _send(send, 405, problem.body, PROBLEM_MEDIA_TYPE, (("allow", ", ".join(allowed)),))
            return
        try:
            await self._command(route, params, scope, receive, send)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            body = problem_response(500, "internal-error", "Internal server error").body
            await _send(send, 500, bytes(body), PROBLEM_MEDIA_TYPE)

    async def _command(
        self, route: routes.CommandRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        services = self.services()
        settings = services.settings
        headers: Headers = dict(scope["headers"])
        try:
            principal = services.verifier.verify(parse_bearer(_header(headers, b"authorization")))
            await services.limiter.check(principal.user_id)
            body: Any = None
            if route.body is not None:
                raw = await _read_body(headers, receive, settings.max_request_bytes)
                body = decode_body(raw, route.body)
            ctx = Context(
                actor=principal.user_id,
                idempotency_key=check_idempotency_key(_header(headers, b"idempotency-key")),
                correlation_id=_optional_id(headers, b"x-correlation-id"),
                causation_id=_optional_id(headers, b"x-causation-id") or None,
                expected_seq=_expected_seq(scope),
                max_body_chars=settings.max_body_chars,
            )
            command = routes.build(route, ctx, body, params)
            appended = await services.appender.append(command)
        except _HANDLED as exc:
            problem = problem_for(exc)
            COMMANDS.labels(route.op, problem.outcome, problem.reason).inc()
            await _send(send, problem.status, problem.body, PROBLEM_MEDIA_TYPE, problem.headers)
            return
        APPEND_SECONDS.observe(time.perf_counter() - started)
        memo = decode_memo(appended.memo if appended.replayed else command.memo)
        COMMANDS.labels(route.op, "replayed" if appended.replayed else "accepted", "").inc()
        answer = Accepted(
            conversation_id=command.conversation_id,
            event_ids=[memo.event_id],
            seq=appended.seq,
            position=appended.position,
            position_token=appended.position.token(),
            message_id=memo.message_id,
        )
        extra = (("idempotent-replayed", "true"),) if appended.replayed else ()
        await _send(send, 202, encoder.encode(answer), "application/json", extra)


def _header(headers: Headers, name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _optional_id(headers: Headers, name: bytes) -> str:
    value = _header(headers, name)
    return "" if value is None else check_id(value, name.decode())


def _expected_seq(scope: Scope) -> int | None:
    query = scope.get("query_string", b"")
    if not query:
        return None
    raw = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True)).get("expected_seq")
    return None if raw is None else check_expected_seq(raw)


async def _read_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    if not is_json_media_type(headers.get(b"content-type", b"").decode("latin-1")):
        raise CommandInvalid("unsupported-media-type", "send application/json (UTF-8)", status=415)
    declared = headers.get(b"content-length", b"").decode("latin-1")
    if _ASCII_DIGITS.fullmatch(declared) and (len(declared) > 18 or int(declared) > limit):
        raise CommandInvalid("request-too-large", f"at most {limit} bytes", 413)
    chunks = bytearray()
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise CommandInvalid("client-disconnected", "the client went away", 400)
        chunks += message.get("body", b"")
        if len(chunks) > limit:
            raise CommandInvalid("request-too-large", f"at most {limit} bytes", 413)
        if not message.get("more_body", False):
            return bytes(chunks)


async def _send(
    send: Send, status: int, body: bytes, media_type: str, extra: tuple[tuple[str, str], ...] = ()
) -> None:
    raw_headers = [
        (b"content-type", media_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in extra),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
