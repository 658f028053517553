"""An in-process command API with an HTTP client that mints dev tokens: for tests and benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from command_api.app import create_app
from command_api.services import Services
from command_api.settings import CommandApiSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token


class ApiClient:
    """Talks to a running command API app over ASGI; `as_user` sets the bearer token."""

    def __init__(self, app: FastAPI, settings: CommandApiSettings, http: httpx.AsyncClient) -> None:
        self.app = app
        self.settings = settings
        self.http = http

    @classmethod
    @asynccontextmanager
    async def running(cls, environ: Mapping[str, str]) -> AsyncIterator[ApiClient]:
        settings = CommandApiSettings.from_env(Env(dict(environ)))
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                yield cls(app, settings, http)

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def token(self, user: str, ttl_s: float = 3600) -> str:
        return mint_token(self.settings.auth, user, ttl_s=ttl_s)

    def headers(self, user: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}", **(extra or {})}

    async def post(
        self, user: str, path: str, body: Any, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.post(path, json=body, headers=self.headers(user, headers))

    async def patch(
        self, user: str, path: str, body: Any, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.patch(path, json=body, headers=self.headers(user, headers))

    async def put(self, user: str, path: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
        return await self.http.put(path, headers=self.headers(user, headers))

    async def delete(self, user: str, path: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
        return await self.http.delete(path, headers=self.headers(user, headers))

    async def create_conversation(self, user: str, *others: str, title: str = "t") -> str:
        answer = await self.post(user, "/v1/conversations", {"title": title, "participants": list(others)})
        assert answer.status_code == 202, answer.text
        conversation_id: str = answer.json()["conversation_id"]
        return conversation_id

    async def send(
        self, user: str, conversation_id: str, body: str = "hi", headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return await self.post(user, f"/v1/conversations/{conversation_id}/messages", {"body": body}, headers)
