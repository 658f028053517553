"""What every Parley OpenAPI document declares the same way: bearer JWT security and problem+json errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI

from servicekit.problems import PROBLEM_MEDIA_TYPE, PROBLEM_SCHEMA

REF = "#/components/schemas/{name}"
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def add_components(schema: dict[str, Any], schemas: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the Problem schema, the bearer JWT scheme and `schemas` to `schema`'s components."""
    parts = schema.setdefault("components", {})
    parts.setdefault("schemas", {}).update(schemas or {})
    parts["schemas"]["Problem"] = PROBLEM_SCHEMA
    parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    return schema


def problem_responses(errors: Iterable[tuple[int, str]]) -> dict[str, Any]:
    """OpenAPI responses for `(status, description)` pairs, each answered as problem+json."""
    problem = {"schema": {"$ref": REF.format(name="Problem")}}
    return {
        str(code): {"description": text, "content": {PROBLEM_MEDIA_TYPE: problem}} for code, text in errors
    }


def extend_openapi(app: FastAPI, extend: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Serve FastAPI's generated document passed through `extend`, built once on first request."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = extend(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
