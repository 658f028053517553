"""The query API: JWT-authenticated reads of the live read models, with read-your-writes on a log position.

Served by the projector process in the worker's event loop. Every error is RFC 9457 problem+json.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import datetime
from typing import Any

import msgspec
from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response

from events.position import LogPosition, parse_stream_id
from projector import queries
from projector.openapi import add_query_parameters
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.auth import TokenVerifier, parse_bearer
from servicekit.exceptions import AuthError
from servicekit.health import add_health_routes
from servicekit.httpedge import NO_DOC_PAGES
from servicekit.openapi import extend_openapi
from servicekit.problems import add_http_problem_handlers, bearer_challenge, problem_response

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
MAX_LIMIT = 200


class Problem(Exception):
    """An error answer: status, stable slug, title, detail, headers."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "", **headers: str) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail, self.headers = status, slug, title, detail, headers


def _json(value: Any) -> Response:
    return Response(_encoder.encode(value), media_type="application/json")


def _limit(request: Request, default: int = 50) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise Problem(400, "invalid-limit", "Invalid limit", f"limit must be 1..{MAX_LIMIT}")
    return int(raw)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise Problem(
            400, f"invalid-{name.replace('_', '-')}", f"Invalid {name}", f"{name} must be an integer"
        )
    return int(raw)


def encode_cursor(at: datetime, conversation_id: str) -> str:
    return base64.urlsafe_b64encode(_encoder.encode([at.isoformat(), conversation_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, cid = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(at), str(cid)
    except (ValueError, TypeError, msgspec.DecodeError):
        raise Problem(
            400, "invalid-cursor", "Invalid cursor", "pass back the `next_cursor` you were given"
        ) from None


def create_app(settings: ProjectorSettings, worker: Worker) -> FastAPI:
    """The HTTP app around a started `worker` (its pool serves the queries; its state feeds /readyz)."""
    if settings.auth is None:
        raise ValueError("the query API needs JWT settings")
    verifier = TokenVerifier(settings.auth)
    pool: AsyncConnectionPool[Any] = worker.pool
    app = FastAPI(
        title="Parley query API", version="1", summary="Read models of the Parley log.", **NO_DOC_PAGES
    )

    def user_of(request: Request) -> str:
        return verifier.verify(parse_bearer(request.headers.get("authorization"))).user_id

    async def wait_for_position(request: Request) -> None:
        token = request.query_params.get("position") or request.headers.get("x-parley-position")
        if not token:
            return
        try:
            position = LogPosition.from_token(token)
        except ValueError as exc:
            raise Problem(400, "invalid-position", "Invalid log position", str(exc)) from None
        if not 0 <= position.partition < settings.log.partitions:
            raise Problem(400, "invalid-position", "Invalid log position", "no such partition")
        wanted = parse_stream_id(position.stream_id)
        deadline = time.monotonic() + settings.read_wait_s
        while True:
            async with pool.connection() as conn:
                cp = await queries.checkpoint(conn, position.partition)
            if cp is not None and cp[0] is not None and cp[0] != position.epoch:
                raise Problem(409, "position-from-another-log", "Position from another log epoch",
                              f"the read models follow epoch {cp[0]}")  # fmt: skip
            if cp is not None and parse_stream_id(cp[1]) >= wanted:
                return
            if time.monotonic() >= deadline:
                raise Problem(
                    503, "position-not-reached", "The read models have not reached that position yet",
                    f"waited {settings.read_wait_s:g}s", **{"Retry-After": "1"},
                )  # fmt: skip
            await asyncio.sleep(0.02)

    @app.get("/v1/conversations", tags=["queries"], summary="My conversations, most recent activity first")
    async def list_conversations(request: Request) -> Response:
        user = user_of(request)
        limit = _limit(request)
        cursor = request.query_params.get("cursor")
        after = decode_cursor(cursor) if cursor else None
        archived_raw = request.query_params.get("archived")
        archived = None if archived_raw is None else archived_raw.lower() in ("1", "true", "yes")
        await wait_for_position(request)
        async with pool.connection() as conn:
            items = await queries.conversations(conn, user, limit + 1, after, archived)
        more = len(items) > limit
        items = items[:limit]
        next_cursor = encode_cursor(items[-1].last_activity_at, items[-1].conversation_id) if more else None
        return _json({"conversations": items, "next_cursor": next_cursor})

    @app.get("/v1/conversations/{conversation_id}/messages", tags=["queries"],
             summary="A conversation's messages by sequence (participants only)")  # fmt: skip
    async def list_messages(request: Request, conversation_id: str) -> Response:
        user = user_of(request)
        limit = _limit(request)
        after_seq, before_seq = _int_param(request, "after_seq"), _int_param(request, "before_seq")
        if after_seq is not None and before_seq is not None:
            raise Problem(400, "invalid-range", "Give after_seq or before_seq, not both")
        await wait_for_position(request)
        async with pool.connection() as conn:
            if not await queries.is_or_was_participant(conn, user, conversation_id):
                raise Problem(404, "conversation-not-found", "No such conversation among yours")
            items = await queries.messages(
                conn, user, conversation_id, limit + 1, after_seq=after_seq, before_seq=before_seq
            )
        more = len(items) > limit
        items = items[:limit]
        answer: dict[str, Any] = {"messages": items}
        if after_seq is not None:
            answer["next_after_seq"] = items[-1].seq if more else None
        else:
            answer["next_before_seq"] = items[-1].seq if more else None
        return _json(answer)

    @app.get("/v1/unread", tags=["queries"], summary="My total unread count")
    async def unread(request: Request) -> Response:
        user = user_of(request)
        await wait_for_position(request)
        async with pool.connection() as conn:
            return _json({"unread": await queries.total_unread(conn, user)})

    @app.get("/v1/search", tags=["queries"], summary="Search the messages I can see")
    async def search(request: Request) -> Response:
        user = user_of(request)
        text = request.query_params.get("q", "").strip()
        if not text:
            raise Problem(400, "missing-query", "Missing q", "give the words to search for in q")
        limit = _limit(request, 20)
        await wait_for_position(request)
        async with pool.connection() as conn:
            return _json({"messages": await queries.search(conn, user, text, limit)})

    async def postgres_ready() -> None:
        async with pool.connection(timeout=2) as conn:
            await conn.execute("SELECT 1")

    async def redis_ready() -> None:
        await worker.redis.ping()

    async def projection_ready() -> None:
        stopped = {p: pr.stopped for p, pr in worker.projectors.items() if pr.stopped}
        if stopped:
            raise RuntimeError("; ".join(f"partition {p}: {why}" for p, why in stopped.items()))
        retrying = {p: pr.retrying for p, pr in worker.projectors.items() if pr.retrying}
        if retrying:
            raise RuntimeError("; ".join(f"partition {p} retrying: {why}" for p, why in retrying.items()))
        if not worker.ready.is_set():
            raise RuntimeError("no lease round completed yet")
        await worker.measure_lag()
        lag = worker.lag_seconds()
        if lag > settings.max_lag_s:
            raise RuntimeError(f"lagging {lag:.1f}s behind the log (limit {settings.max_lag_s:g}s)")

    def details() -> dict[str, object]:
        """Per-partition position and lag (as measured by the readiness check), and stopped partitions."""
        lags = worker.lags
        return {
            "partitions": {
                str(p): {"position": pr.position, "lag_events": lags[p].events if p in lags else None,
                         "lag_seconds": lags[p].seconds if p in lags else None,
                         "stopped": pr.stopped, "retrying": pr.retrying}
                for p, pr in sorted(worker.projectors.items())
            }
        }  # fmt: skip

    add_health_routes(app, lambda _r: {"postgres": postgres_ready, "redis": redis_ready,
                                       "projection": projection_ready}, details=details)  # fmt: skip

    @app.exception_handler(Problem)
    async def problem(_request: Request, exc: Problem) -> Response:
        return problem_response(exc.status, exc.slug, exc.title, exc.detail, headers=exc.headers or None)

    @app.exception_handler(AuthError)
    async def auth_error(_request: Request, exc: AuthError) -> Response:
        return problem_response(
            401, exc.reason, "Authentication required", exc.detail,
            headers={"WWW-Authenticate": bearer_challenge(exc.reason)},
        )  # fmt: skip

    add_http_problem_handlers(app)
    extend_openapi(app, lambda doc: add_query_parameters(doc, MAX_LIMIT))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("query %s %s failed", request.method, request.url.path)
        return problem_response(503, "unavailable", "The read models are unavailable", type(exc).__name__,
                                headers={"Retry-After": "1"})  # fmt: skip

    return app
