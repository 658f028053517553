"""The command API: authenticated HTTP commands, each decided and appended to the log as one event.

Handlers are thin: authenticate, rate-limit, validate (`bodies`), build the command (`commands`),
append (`append`), answer 202 with the log position. Every error is RFC 9457 problem+json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from command_api import bodies, commands
from command_api.append import Appender, AppendSettings, Command
from command_api.bodies import Body, check_id, check_idempotency_key, decode_body
from command_api.commands import Context, decode_memo
from command_api.exceptions import CommandInvalid, CommandRefused, LogUnavailable, RateLimited
from command_api.metrics import APPEND_SECONDS, COMMANDS
from command_api.ratelimit import RateLimiter
from command_api.refusals import refusal_status
from command_api.responses import Accepted, encoder
from command_api.settings import CommandApiSettings
from servicekit.auth import TokenVerifier, parse_bearer
from servicekit.exceptions import AuthError
from servicekit.health import add_health_routes
from servicekit.problems import PROBLEM_MEDIA_TYPE, PROBLEM_SCHEMA, problem_response

log = logging.getLogger(__name__)

B = TypeVar("B", bound=Body)


class Services:
    """The live edges a running app holds; built in the lifespan, closed on shutdown."""

    def __init__(self, settings: CommandApiSettings) -> None:
        self.settings = settings
        layout = settings.log.layout()
        self.redis = aioredis.Redis.from_url(
            settings.log.redis_url, socket_timeout=5, socket_connect_timeout=2,
            max_connections=64, health_check_interval=30,
        )  # fmt: skip
        self.appender = Appender(
            self.redis,
            layout,
            AppendSettings(
                idempotency_ttl_s=settings.idempotency_ttl_s,
                max_stream_length=settings.max_stream_length,
                wait_replicas=settings.wait_replicas,
                wait_timeout_ms=settings.wait_timeout_ms,
            ),
        )
        self.limiter = RateLimiter(self.redis, layout, settings.rate_limit_per_s, settings.rate_limit_burst)
        self.verifier = TokenVerifier(settings.auth)

    async def open(self) -> None:
        try:
            epoch = await self.appender.open()
            log.info("log open: epoch %s, %d partitions", epoch, self.settings.log.partitions)
        except LogUnavailable as exc:
            log.error("log not reachable at start (%s); will retry on first command", exc)

    async def close(self) -> None:
        await self.appender.close()
        await self.limiter.close()
        await self.redis.aclose()


def _problem_for(exc: Exception) -> tuple[Response, str, str]:
    """The problem answer for a command-side error, with the metric's outcome and reason."""
    if isinstance(exc, CommandInvalid):
        return (
            problem_response(exc.status, exc.reason, "Invalid command", exc.detail),
            "invalid",
            exc.reason,
        )
    if isinstance(exc, CommandRefused):
        status, title = refusal_status(exc.reason)
        extra: dict[str, Any] = {}
        if exc.reason in ("sequence-mismatch", "read-marker-not-advanced", "read-beyond-end"):
            extra["current_seq"] = int(exc.detail)
        return problem_response(status, exc.reason, title, **extra), "refused", exc.reason
    if isinstance(exc, RateLimited):
        retry = max(1, int(exc.retry_after_s + 0.999))
        response = problem_response(
            429, "rate-limited", "Too many commands", f"retry after {exc.retry_after_s:.3f}s",
            headers={"Retry-After": str(retry)},
        )  # fmt: skip
        return response, "rate_limited", "rate-limited"
    if isinstance(exc, LogUnavailable):
        response = problem_response(
            503, "log-unavailable", "The log is unavailable",
            f"{exc.detail}. If a command was in flight its outcome is unknown: retry it with "
            "the same Idempotency-Key.",
            headers={"Retry-After": "1"},
        )  # fmt: skip
        return response, "unavailable", "log-unavailable"
    if isinstance(exc, AuthError):
        response = problem_response(
            401, exc.reason, "Authentication required", exc.detail,
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'},
        )  # fmt: skip
        return response, "unauthorized", exc.reason
    raise exc


def _body_spec(body_type: type[Body]) -> dict[str, Any]:
    (ref,), _ = msgspec.json.schema_components([body_type], ref_template="#/components/schemas/{name}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


_ACCEPTED_REF = {"$ref": "#/components/schemas/Accepted"}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "Appended to the log (or an idempotent replay of the original answer)",
        "content": {"application/json": {"schema": _ACCEPTED_REF}},
    },
    **{
        code: {"description": text, "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}}
        for code, text in (
            (400, "Malformed request"),
            (401, "Missing or invalid token"),
            (403, "Not allowed"),
            (404, "Not found"),
            (409, "Conflicts with the conversation's state"),
            (410, "Message deleted"),
            (413, "Request too large"),
            (415, "Not JSON"),
            (422, "Invalid command"),
            (429, "Rate limited"),
            (503, "Log unavailable"),
        )
    },
}


def create_app(settings: CommandApiSettings | None = None) -> FastAPI:
    """Build the command API; Redis is connected in the lifespan, so building has no side effect."""
    settings = settings or CommandApiSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        app.state.services = services
        await services.open()
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(
        title="Parley command API",
        version="1",
        summary="Commands that append events to the Parley log.",
        lifespan=lifespan,
    )

    def services_of(request: Request) -> Services:
        services: Services = request.app.state.services
        return services

    async def execute(
        request: Request, op: str, build: Callable[[Context], Command], message_reply: bool = False
    ) -> Response:
        started = time.perf_counter()
        services = services_of(request)
        try:
            principal = services.verifier.verify(parse_bearer(request.headers.get("authorization")))
            await services.limiter.check(principal.user_id)
            ctx = Context(
                actor=principal.user_id,
                idempotency_key=check_idempotency_key(request.headers.get("idempotency-key")),
                correlation_id=_optional_id(request, "x-correlation-id"),
                causation_id=_optional_id(request, "x-causation-id") or None,
                expected_seq=_expected_seq(request),
                max_body_chars=settings.max_body_chars,
            )
            command = build(ctx)
            appended = await services.appender.append(command)
        except (CommandInvalid, CommandRefused, RateLimited, LogUnavailable, AuthError) as exc:
            response, outcome, reason = _problem_for(exc)
            COMMANDS.labels(op, outcome, reason).inc()
            return response
        APPEND_SECONDS.observe(time.perf_counter() - started)
        memo = decode_memo(appended.memo if appended.replayed else command.memo)
        COMMANDS.labels(op, "replayed" if appended.replayed else "accepted", "").inc()
        answer = Accepted(
            conversation_id=command.conversation_id,
            event_ids=[memo.event_id],
            seq=appended.seq,
            position=appended.position,
            position_token=appended.position.token(),
            message_id=memo.message_id,
        )
        headers = {"Idempotent-Replayed": "true"} if appended.replayed else None
        return Response(encoder.encode(answer), 202, headers, "application/json")

    async def read_body(request: Request, body_type: type[B]) -> B:
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise CommandInvalid("unsupported-media-type", "send application/json", status=415)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise CommandInvalid("request-too-large", f"at most {settings.max_request_bytes} bytes", 413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > settings.max_request_bytes:
                raise CommandInvalid("request-too-large", f"at most {settings.max_request_bytes} bytes", 413)
        return decode_body(bytes(data), body_type)

    async def with_body(
        request: Request, op: str, body_type: type[B], build: Callable[[Context, B], Command]
    ) -> Response:
        try:
            body = await read_body(request, body_type)
        except CommandInvalid as exc:
            response, outcome, reason = _problem_for(exc)
            COMMANDS.labels(op, outcome, reason).inc()
            return response
        return await execute(request, op, lambda ctx: build(ctx, body))

    common: dict[str, Any] = {
        "status_code": 202,
        "responses": _COMMAND_RESPONSES,
        "tags": ["commands"],
    }

    @app.post("/v1/conversations", summary="Create a conversation", **common,
              openapi_extra=_body_spec(bodies.CreateConversation))  # fmt: skip
    async def create_conversation(request: Request) -> Response:
        return await with_body(
            request, "create_conversation", bodies.CreateConversation, commands.create_conversation
        )

    @app.post("/v1/conversations/{conversation_id}/participants", summary="Add a participant",
              **common, openapi_extra=_body_spec(bodies.AddParticipant))  # fmt: skip
    async def add_participant(request: Request, conversation_id: str) -> Response:
        return await with_body(
            request, "add_participant", bodies.AddParticipant,
            lambda ctx, body: commands.add_participant(ctx, conversation_id, body),
        )  # fmt: skip

    @app.delete("/v1/conversations/{conversation_id}/participants/{user_id}",
                summary="Remove a participant (yourself, or anyone if you created the conversation)",
                **common)  # fmt: skip
    async def remove_participant(request: Request, conversation_id: str, user_id: str) -> Response:
        return await execute(
            request, "remove_participant",
            lambda ctx: commands.remove_participant(ctx, conversation_id, user_id),
        )  # fmt: skip

    @app.post("/v1/conversations/{conversation_id}/messages", summary="Send a message",
              **common, openapi_extra=_body_spec(bodies.SendMessage))  # fmt: skip
    async def send_message(request: Request, conversation_id: str) -> Response:
        return await with_body(
            request, "send_message", bodies.SendMessage,
            lambda ctx, body: commands.send_message(ctx, conversation_id, body),
        )  # fmt: skip

    @app.patch("/v1/conversations/{conversation_id}/messages/{message_id}",
               summary="Edit your message", **common,
               openapi_extra=_body_spec(bodies.EditMessage))  # fmt: skip
    async def edit_message(request: Request, conversation_id: str, message_id: str) -> Response:
        return await with_body(
            request, "edit_message", bodies.EditMessage,
            lambda ctx, body: commands.edit_message(ctx, conversation_id, message_id, body),
        )  # fmt: skip

    @app.delete("/v1/conversations/{conversation_id}/messages/{message_id}",
                summary="Delete your message", **common)  # fmt: skip
    async def delete_message(request: Request, conversation_id: str, message_id: str) -> Response:
        return await execute(
            request, "delete_message",
            lambda ctx: commands.delete_message(ctx, conversation_id, message_id),
        )  # fmt: skip

    @app.post("/v1/conversations/{conversation_id}/read", summary="Mark read up to a sequence",
              **common, openapi_extra=_body_spec(bodies.MarkRead))  # fmt: skip
    async def mark_read(request: Request, conversation_id: str) -> Response:
        return await with_body(
            request, "mark_read", bodies.MarkRead,
            lambda ctx, body: commands.mark_read(ctx, conversation_id, body),
        )  # fmt: skip

    @app.put("/v1/conversations/{conversation_id}/archive",
             summary="Archive the conversation for yourself", **common)  # fmt: skip
    async def archive(request: Request, conversation_id: str) -> Response:
        return await execute(request, "archive", lambda ctx: commands.archive(ctx, conversation_id))

    @app.delete("/v1/conversations/{conversation_id}/archive",
                summary="Unarchive the conversation for yourself", **common)  # fmt: skip
    async def unarchive(request: Request, conversation_id: str) -> Response:
        return await execute(request, "unarchive", lambda ctx: commands.unarchive(ctx, conversation_id))

    async def redis_ready(request: Request) -> None:
        await services_of(request).redis.ping()

    add_health_routes(app, lambda request: {"redis": lambda: redis_ready(request)})
    _install_error_handlers(app)
    _install_openapi(app)
    return app


def _optional_id(request: Request, header: str) -> str:
    value = request.headers.get(header)
    if value is None:
        return ""
    return check_id(value, header)


def _expected_seq(request: Request) -> int | None:
    raw = request.query_params.get("expected_seq")
    if raw is None:
        return None
    if not raw.isdigit():
        raise CommandInvalid("invalid-expected-seq", "expected_seq must be a non-negative integer", 400)
    return int(raw)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem_response(exc.status_code, slug, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return problem_response(422, "invalid-request", "Invalid request", str(exc.errors()))

    @app.exception_handler(CommandInvalid)
    async def command_invalid(_request: Request, exc: CommandInvalid) -> Response:
        return _problem_for(exc)[0]

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal-error", "Internal server error")


def _install_openapi(app: FastAPI) -> None:
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        _, components = msgspec.json.schema_components(
            [bodies.CreateConversation, bodies.AddParticipant, bodies.SendMessage,
             bodies.EditMessage, bodies.MarkRead, Accepted],
            ref_template="#/components/schemas/{name}",
        )  # fmt: skip
        parts = schema.setdefault("components", {})
        parts.setdefault("schemas", {}).update(components)
        parts["schemas"]["Problem"] = PROBLEM_SCHEMA
        parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        for path, ops in schema["paths"].items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
                    op.setdefault("parameters", []).append(_EXPECTED_SEQ_PARAM)
                    op["parameters"].extend(_HEADER_PARAMS)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_EXPECTED_SEQ_PARAM = {
    "name": "expected_seq", "in": "query", "required": False,
    "description": "Refuse (409 sequence-mismatch) unless the conversation's last sequence is this.",
    "schema": {"type": "integer", "minimum": 0},
}  # fmt: skip
_HEADER_PARAMS = [
    {"name": "Idempotency-Key", "in": "header", "required": False,
     "description": "Retries with the same key and body return the original answer; 24 h by default.",
     "schema": {"type": "string", "maxLength": 255}},
    {"name": "X-Correlation-Id", "in": "header", "required": False, "schema": {"type": "string"}},
    {"name": "X-Causation-Id", "in": "header", "required": False, "schema": {"type": "string"}},
]  # fmt: skip
