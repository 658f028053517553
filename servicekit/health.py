"""Liveness, readiness and Prometheus metrics endpoints, the same on every Parley service.

`/healthz` answers while the process runs; `/readyz` runs the service's dependency checks (each
an async callable that raises with a reason) and answers 503 problem+json naming what failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from servicekit.problems import problem_response

ReadinessCheck = Callable[[], Awaitable[object]]


async def run_checks(checks: Mapping[str, ReadinessCheck], timeout_s: float) -> dict[str, str]:
    """Run every check concurrently; return the failures as {name: reason}."""

    async def one(check: ReadinessCheck) -> str | None:
        try:
            await asyncio.wait_for(check(), timeout_s)
        except TimeoutError:
            return f"no answer within {timeout_s:g}s"
        except Exception as exc:  # a readiness probe reports any failure as a reason
            return f"{type(exc).__name__}: {exc}"
        return None

    names = list(checks)
    results = await asyncio.gather(*(one(checks[n]) for n in names))
    return {name: reason for name, reason in zip(names, results, strict=True) if reason}


def add_health_routes(
    app: FastAPI,
    checks: Callable[[Request], Mapping[str, ReadinessCheck]],
    timeout_s: float = 2.0,
    details: Callable[[], Mapping[str, object]] | None = None,
) -> None:
    """Mount /healthz, /readyz and /metrics on `app`; `checks(request)` gives the readiness checks.

    `details()`, if given, is called after the checks ran; its mapping goes into both /readyz bodies.
    """

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process is running")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: every dependency answers",
        responses={503: {"description": "A dependency is down; `failures` says which and why"}},
    )
    async def readyz(request: Request) -> Response:
        failures = await run_checks(checks(request), timeout_s)
        extra: dict[str, Any] = {"details": dict(details())} if details is not None else {}
        if failures:
            return problem_response(
                503, "not-ready", "A dependency is not ready",
                "; ".join(f"{k}: {v}" for k, v in failures.items()), failures=failures, **extra,
            )  # fmt: skip
        return JSONResponse({"status": "ready", **extra})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
