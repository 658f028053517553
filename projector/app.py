"""The query API: JWT-authenticated reads of the live read models, with read-your-writes on a log position
or a fanout cursor; every answer carries the fanout cursor it is exact at (body `cursor`, X-Parley-Cursor).

Served by the projector process in the worker's event loop, on its own pool (projector.reads). Every error
is RFC 9457 problem+json: 4xx for whatever a client sends, 503 with Retry-After when Postgres is away or
busy, 500 for a bug.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from projector import queries
from projector.exceptions import (
    PositionFromAnotherEpoch,
    QueryTimeout,
    ReadModelsFromAnotherEpoch,
    ReadsUnavailable,
)
from projector.history.http import add_history_route
from projector.openapi import add_query_parameters
from projector.params import (
    MAX_LIMIT,
    Problem,
    check_conversation_id,
    decode_cursor,
    encode_cursor,
    not_found,
    parse_limit,
    parse_search,
    parse_seq,
    parse_wait,
)
from projector.reads import Reads, ReadTarget
from projector.settings import ProjectorSettings
from projector.worker import Worker
from servicekit.auth import TokenVerifier, parse_bearer
from servicekit.exceptions import AuthError
from servicekit.health import add_health_routes
from servicekit.httpedge import NO_DOC_PAGES
from servicekit.memstats import register_memory_collector
from servicekit.openapi import extend_openapi
from servicekit.problems import (
    AnswerUnexpected,
    add_http_problem_handlers,
    bearer_challenge,
    problem_response,
)

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


CURSOR_HEADER = "X-Parley-Cursor"


def _json(value: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(value), media_type="application/json", headers=headers)


def create_app(settings: ProjectorSettings, worker: Worker, reads: Reads) -> FastAPI:
    """The HTTP app around a started `worker` (its state feeds /readyz) and open `reads` (its pool,
    position watcher and per-user slots serve the queries)."""
    if settings.auth is None:
        raise ValueError("the query API needs JWT settings")
    verifier = TokenVerifier(settings.auth)
    register_memory_collector()
    app = FastAPI(
        title="Parley query API", version="1", summary="Read models of the Parley log.", **NO_DOC_PAGES
    )

    @contextlib.asynccontextmanager
    async def reading(request: Request) -> AsyncIterator[str]:
        """The authenticated user, holding one of their read slots until the answer is ready."""
        user = verifier.verify(parse_bearer(request.headers.get("authorization"))).user_id
        if not reads.slots.take(user):
            detail = f"at most {reads.slots.limit} at a time per user"
            raise Problem(429, "too-many-reads", "Too many reads in flight", detail, **{"Retry-After": "1"})
        try:
            yield user
        finally:
            reads.slots.give_back(user)

    async def wait_for_position(request: Request) -> tuple[str, ReadTarget]:
        """The log's epoch, and the server to read from once its read models have reached the request's
        `position` (a command's position token or a fanout cursor), if it gives one."""
        epoch = worker.epoch
        if epoch is None:  # the app is served after the worker started: never seen
            raise ReadsUnavailable("the log's epoch is not known yet")
        token = request.query_params.get("position") or request.headers.get("x-parley-position")
        if not token:
            return epoch, reads.target()
        positions = parse_wait(token, settings.log.partitions)
        try:
            if positions[0].epoch != epoch:
                raise PositionFromAnotherEpoch(epoch)
            target = await reads.wait(positions, settings.read_wait_s)
            if target is not None:
                return epoch, target
        except PositionFromAnotherEpoch as exc:
            raise Problem(
                409, "position-from-another-log", "Position from another log epoch", str(exc)
            ) from None
        raise Problem(
            503, "position-not-reached", "The read models have not reached that position yet",
            f"waited {settings.read_wait_s:g}s", **{"Retry-After": "1"},
        )  # fmt: skip

    async def exact(
        request: Request, read: Callable[[queries.AsyncConn], Awaitable[dict[str, Any]]]
    ) -> Response:
        """`read`'s answer from one snapshot, with the fanout cursor it is exact at (body and header); the
        position wait and the snapshot are on one server, so a replica answers with what it has replayed."""
        epoch, target = await wait_for_position(request)
        answer, cursor = await target.exact(epoch, read)
        answer["cursor"] = cursor
        return _json(answer, {CURSOR_HEADER: cursor})

    @app.get("/v1/conversations", tags=["queries"], summary="My conversations, most recent activity first")
    async def list_conversations(request: Request) -> Response:
        async with reading(request) as user:
            limit = parse_limit(request.query_params.get("limit"), 50)
            cursor = request.query_params.get("cursor")
            after = decode_cursor(cursor) if cursor else None
            archived_raw = request.query_params.get("archived")
            archived = None if archived_raw is None else archived_raw.lower() in ("1", "true", "yes")

            async def read(conn: queries.AsyncConn) -> dict[str, Any]:
                items = await queries.conversations(conn, user, limit + 1, after, archived)
                more, items = len(items) > limit, items[:limit]
                last = items[-1] if more else None
                following = encode_cursor(last.last_activity_at, last.conversation_id) if last else None
                return {"conversations": items, "next_cursor": following}

            return await exact(request, read)

    @app.get("/v1/conversations/{conversation_id}/messages", tags=["queries"],
             summary="A conversation's messages by sequence (participants only)")  # fmt: skip
    async def list_messages(request: Request, conversation_id: str) -> Response:
        async with reading(request) as user:
            check_conversation_id(conversation_id)
            limit = parse_limit(request.query_params.get("limit"), 50)
            after_seq = parse_seq("after_seq", request.query_params.get("after_seq"))
            before_seq = parse_seq("before_seq", request.query_params.get("before_seq"))
            if after_seq is not None and before_seq is not None:
                raise Problem(400, "invalid-range", "Give after_seq or before_seq, not both")

            async def read(conn: queries.AsyncConn) -> dict[str, Any]:
                last_seq = await queries.seen_up_to(conn, user, conversation_id)
                if last_seq is None:
                    raise not_found()
                items = await queries.messages(
                    conn, user, conversation_id, limit + 1, after_seq=after_seq, before_seq=before_seq
                )
                more, items = len(items) > limit, items[:limit]
                following = "next_after_seq" if after_seq is not None else "next_before_seq"
                return {"messages": items, following: items[-1].seq if more else None, "last_seq": last_seq}

            return await exact(request, read)

    add_history_route(
        app, authorize=lambda request: verifier.verify(parse_bearer(request.headers.get("authorization"))),
        claim=settings.analyst_claim, role=settings.analyst_role, connection=reads.connection,
        log=lambda: worker.log, epoch=lambda: worker.epoch, problem=Problem,
    )  # fmt: skip

    @app.get("/v1/unread", tags=["queries"], summary="My total unread count")
    async def unread(request: Request) -> Response:
        async with reading(request) as user:

            async def read(conn: queries.AsyncConn) -> dict[str, Any]:
                return {"unread": await queries.total_unread(conn, user)}

            return await exact(request, read)

    @app.get("/v1/search", tags=["queries"], summary="Search the messages I can see")
    async def search(request: Request) -> Response:
        async with reading(request) as user:
            text = parse_search(request.query_params.get("q"), settings.search_max_chars,
                                settings.search_max_terms)  # fmt: skip
            limit = parse_limit(request.query_params.get("limit"), 20)

            async def read(conn: queries.AsyncConn) -> dict[str, Any]:
                return {"messages": await queries.search(conn, user, text, limit)}

            try:
                return await exact(request, read)
            except QueryTimeout:  # the words are what make a search slow: retrying will not help
                detail = "the search ran past its time limit; use fewer or rarer words"
                raise Problem(422, "query-too-expensive", "Search too expensive", detail) from None

    async def postgres_ready() -> None:
        async with reads.pool.connection(timeout=2) as conn:
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
        """Per-partition position and lag (as measured by the readiness check), stopped partitions, and
        each replica's state (one that is not serving is skipped, the primary serving when none is)."""
        lags = worker.lags
        return {
            "partitions": {
                str(p): {"position": pr.position, "lag_events": lags[p].events if p in lags else None,
                         "lag_seconds": lags[p].seconds if p in lags else None,
                         "stopped": pr.stopped, "retrying": pr.retrying}
                for p, pr in sorted(worker.projectors.items())
            },
            "retention": worker.retention.status(),
            **({"replicas": reads.replicas.status()} if reads.replicas else {}),
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
    extend_openapi(app, lambda doc: add_query_parameters(doc, MAX_LIMIT, settings.search_max_chars,
                                                         settings.search_max_terms))  # fmt: skip

    @app.exception_handler(ReadsUnavailable)
    async def unavailable(request: Request, exc: ReadsUnavailable) -> Response:
        log.warning("query %s %r: %s", request.method, request.url.path, exc)  # not for the client's eyes
        return problem_response(503, "unavailable", "The read models are unavailable",
                                headers={"Retry-After": "1"})  # fmt: skip

    @app.exception_handler(ReadModelsFromAnotherEpoch)
    async def another_epoch(request: Request, exc: ReadModelsFromAnotherEpoch) -> Response:
        log.warning("query %s %r: %s", request.method, request.url.path, exc)
        return problem_response(503, "read-models-from-another-log",
                                "The read models follow another epoch of the log than the log's",
                                str(exc), headers={"Retry-After": "1"})  # fmt: skip

    @app.exception_handler(QueryTimeout)
    async def timed_out(_request: Request, exc: QueryTimeout) -> Response:
        return problem_response(503, "query-timeout", "The read models are too busy to answer in time",
                                str(exc), headers={"Retry-After": "1"})  # fmt: skip

    app.add_middleware(AnswerUnexpected, service="query")
    return app
