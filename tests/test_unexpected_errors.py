"""A bug behind any HTTP route of any service answers 500 problem+json (`internal-error`, no Retry-After),
is logged with the route, and leaves the connection usable; an unknown route is a 404 problem."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI

from command_api.app import create_app as command_app
from command_api.settings import CommandApiSettings
from realtime_fanout.app import create_app as fanout_app
from realtime_fanout.settings import FanoutSettings
from servicekit import health
from servicekit.settings import Env

ENV = Env({"PARLEY_JWT_SECRET": "unexpected-test-secret-" + "x" * 20, "PARLEY_DEV_MODE": "1"})
APPS: dict[str, Callable[[], FastAPI]] = {
    "command": lambda: command_app(CommandApiSettings.from_env(ENV)),
    "fanout": lambda: fanout_app(FanoutSettings.from_env(ENV)),
}  # the query API's: tests/test_projector_query_limits.py (a bug in a query, on a real server)


@pytest.mark.parametrize("service", sorted(APPS))
async def test_a_bug_in_a_route_is_a_500_problem(
    service: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def bug() -> bytes:
        raise RuntimeError("a bug in a route")

    monkeypatch.setattr(health, "generate_latest", bug)
    transport = httpx.ASGITransport(app=APPS[service]())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        r = await client.get("/metrics")
        assert (r.status_code, r.headers["content-type"]) == (500, "application/problem+json")
        assert r.json() == {
            "type": "/problems/internal-error",
            "title": "Internal server error",
            "status": 500,
        }
        assert "retry-after" not in r.headers
        assert f"{service} GET '/metrics' failed" in caplog.text and "a bug in a route" in caplog.text
        r = await client.get("/no-such-route")
        assert (r.status_code, r.headers["content-type"]) == (404, "application/problem+json")
        assert r.json()["type"] == "/problems/not-found"
