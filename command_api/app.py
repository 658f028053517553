"""The command API: authenticated HTTP commands, each decided and appended to the log as one event.

Command routes are served by `dispatch.CommandDispatcher` (plain ASGI, the hot path); FastAPI
serves health, metrics and the OpenAPI document. Every error is RFC 9457 problem+json.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from command_api.dispatch import CommandDispatcher
from command_api.openapi import add_command_paths
from command_api.services import Services
from command_api.settings import CommandApiSettings
from command_api.web import add_web_routes
from servicekit.health import add_health_routes
from servicekit.httpedge import NO_DOC_PAGES
from servicekit.lifespan import services_lifespan
from servicekit.memstats import register_memory_collector
from servicekit.openapi import extend_openapi
from servicekit.problems import AnswerUnexpected, add_http_problem_handlers


class CommandApp(FastAPI):
    """FastAPI, with the command routes answered first by `CommandDispatcher` (see dispatch.py)."""

    commands: CommandDispatcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.commands(scope, receive, send)


def create_app(settings: CommandApiSettings | None = None) -> CommandApp:
    """Build the command API; Redis is connected in the lifespan, so building has no side effect."""
    settings = settings or CommandApiSettings.from_env()
    register_memory_collector()

    app = CommandApp(
        title="Parley command API",
        version="1",
        summary="Commands that append events to the Parley log.",
        lifespan=services_lifespan(lambda: Services(settings)),
        **NO_DOC_PAGES,
    )

    def services() -> Services:
        running: Services = app.state.services
        return running

    async def redis_ready() -> None:
        await services().redis.ping()

    add_health_routes(app, lambda _request: {"redis": redis_ready})
    add_web_routes(app, settings)
    app.commands = CommandDispatcher(super(CommandApp, app).__call__, services)
    _install_error_handlers(app)
    extend_openapi(
        app, lambda doc: add_command_paths(doc, settings.max_body_chars, settings.max_request_bytes)
    )
    return app


def _install_error_handlers(app: FastAPI) -> None:
    add_http_problem_handlers(app)
    app.add_middleware(AnswerUnexpected, service="command")
