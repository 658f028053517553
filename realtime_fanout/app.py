"""The fanout service: a WebSocket endpoint (/v1/stream) fed by one hub per process, plus health routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from events.exceptions import LogError
from events.log import EventLog
from events.redisclient import REDIS_ERRORS, redis_client
from realtime_fanout.archive import Archive
from realtime_fanout.connection import Connection
from realtime_fanout.exceptions import HubUnavailable
from realtime_fanout.history import History
from realtime_fanout.hub import Hub
from realtime_fanout.metrics import GC_PAUSE_SECONDS
from realtime_fanout.pageflights import PageFlights
from realtime_fanout.settings import FanoutSettings
from realtime_fanout.signalbus import SignalBus
from realtime_fanout.unreadseed import UnreadSeeder
from servicekit.auth import TokenVerifier
from servicekit.gcpacing import GcPacer
from servicekit.health import add_health_routes
from servicekit.httpedge import NO_DOC_PAGES
from servicekit.lifespan import services_lifespan
from servicekit.looplag import start_loop_lag_probe
from servicekit.memstats import register_memory_collector
from servicekit.problems import AnswerUnexpected, add_http_problem_handlers
from servicekit.slots import UserSlots
from servicekit.supervisor import Policy, Supervisor

log = logging.getLogger(__name__)


class Services:
    """The live edges a running fanout holds; built in the lifespan, closed on shutdown."""

    def __init__(self, settings: FanoutSettings) -> None:
        self.settings = settings
        layout = settings.log.layout()
        url = settings.log.redis_url
        cluster = settings.log.redis_cluster
        self.redis = redis_client(url, 10, cluster=cluster, pool_wait_s=settings.redis_pool_wait_s)
        self.reader_redis = redis_client(url, settings.read_block_ms / 1000 + 10, cluster=cluster)
        self.supervisor = Supervisor("fanout")
        self.pool: AsyncConnectionPool[Any] | None = None
        archive: Archive | None = None
        self.seeder: UnreadSeeder | None = None
        if settings.database_url:
            self.pool = AsyncConnectionPool(
                settings.database_url, open=False, min_size=1, max_size=4, timeout=5
            )
            archive = Archive(self.pool, settings.replay_page, self._flights())
            self.seeder = UnreadSeeder(self.pool, settings.unread_wait_s, window=settings.unread_window)
        self.hub = Hub(
            self.reader_redis,
            layout,
            block_ms=settings.read_block_ms,
            count=settings.read_count,
            archive=archive,
            track_acts=settings.presence_scope == "engaged",
            supervisor=self.supervisor,
            recent_items=settings.recent_items,
            ledger_ids=settings.ledger_ids,
            replica_reads=settings.log.read_replicas,
        )
        history_log = EventLog(self.redis, layout, replica_reads=settings.log.read_replicas)
        self.history = History(
            history_log, settings.replay_page, archive, settings.archive_wait_s, self._flights(),
            self.hub.recent,
        )  # fmt: skip
        self.verifier = TokenVerifier(settings.auth)
        self.bus = SignalBus(
            self.redis, self.hub, typing_ttl_s=settings.typing_ttl_s, typing_per_s=settings.typing_per_s,
            presence_ttl_s=settings.presence_ttl_s, presence_scope=settings.presence_scope,
            leave_grace_s=settings.presence_leave_grace_s,
        )  # fmt: skip
        self.slots = UserSlots(settings.max_connections_per_user)
        self._starter: asyncio.Task[None] | None = None
        self.gc_pacer = GcPacer(GC_PAUSE_SECONDS, settings.gc_young_every_s, settings.gc_full_every_s)

    def _flights(self) -> PageFlights[Any]:
        return PageFlights(self.settings.history_linger_s, self.settings.history_cache_pages)

    async def open(self) -> None:
        """Start the hub now if the log exists, else keep trying in the background."""
        if self.settings.gc_paced:
            self.gc_pacer.start(self.supervisor)
        start_loop_lag_probe(self.supervisor)
        if self.pool is not None:
            await self.pool.open(wait=False)
        await self.bus.start()
        try:
            await self.hub.start()
        except (LogError, *REDIS_ERRORS, psycopg.Error) as exc:
            log.error("log not readable at start (%s); retrying in the background", exc)
            self._starter = self.supervisor.spawn("fanout-start", self._keep_starting, Policy.RESTART)

    async def _keep_starting(self) -> None:
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            try:
                await self.hub.start()
                return
            except (LogError, *REDIS_ERRORS, psycopg.Error) as exc:
                log.warning("log still not readable: %s", exc)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
        await self.bus.stop()
        await self.hub.stop()
        if self.pool is not None:
            await self.pool.close()
        await self.supervisor.close()
        await self.reader_redis.aclose()
        await self.redis.aclose()
        await self.gc_pacer.stop()


STREAM_PATH = "/v1/stream"


class FanoutApp(FastAPI):
    """FastAPI for health, metrics and OpenAPI; the stream itself is served as plain ASGI ahead of it.

    FastAPI's route machinery (exit stacks, exception wrappers) stays alive for a WebSocket's whole
    life: measured at about 5 KiB per idle connection, which the fanout holds by the ten thousand.
    """

    settings: FanoutSettings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == STREAM_PATH:
            services: Services = self.state.services
            connection = Connection(
                WebSocket(scope, receive, send), services.hub, services.history, services.verifier,
                self.settings, services.seeder, services.bus, services.slots,
            )  # fmt: skip
            await connection.run()
            return
        await super().__call__(scope, receive, send)


def create_app(settings: FanoutSettings | None = None) -> FastAPI:
    """Build the fanout app; Redis is connected in the lifespan, so building has no side effect."""
    settings = settings or FanoutSettings.from_env()
    register_memory_collector()

    app = FanoutApp(
        title="Parley realtime fanout",
        version="1",
        lifespan=services_lifespan(lambda: Services(settings)),
        **NO_DOC_PAGES,
    )
    app.settings = settings
    add_http_problem_handlers(app)
    app.add_middleware(AnswerUnexpected, service="fanout")

    async def redis_ready(request: Request) -> None:
        services: Services = request.app.state.services
        await services.redis.ping()

    async def hub_ready(request: Request) -> None:
        services: Services = request.app.state.services
        if not services.hub.running:
            raise HubUnavailable(services.hub.failure or "the hub is not reading the log")

    async def tasks_ready(request: Request) -> None:
        services: Services = request.app.state.services
        services.supervisor.check()

    add_health_routes(
        app,
        lambda request: {
            "redis": lambda: redis_ready(request), "hub": lambda: hub_ready(request),
            "tasks": lambda: tasks_ready(request),
        },
    )  # fmt: skip
    return app
