"""The query API's OpenAPI declarations: the parameters, security and problem answers its routes read
from the request themselves (FastAPI sees none of them), so clients and fuzzers can rely on them."""

from __future__ import annotations

from typing import Any

from events.ids import CONVERSATION_ID_PATTERN
from servicekit.openapi import BEARER, add_components, problem_responses

_ERRORS = (
    (400, "Invalid parameter (`type` names which)"), (401, "Missing or invalid token"),
    (404, "No such conversation among yours"), (409, "Position from another log epoch"),
    (503, "Position not reached in time, or read models unavailable: retry after Retry-After"),
)  # fmt: skip


_ID = {"type": "string", "pattern": CONVERSATION_ID_PATTERN, "maxLength": 129}


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


_CURSOR = {
    "X-Parley-Cursor": {
        "description": "The fanout cursor the answer is exact at (also its `cursor` field)",
        "schema": {"type": "string"},
    }
}


def _waits() -> list[dict[str, Any]]:
    text = ("A command's `position_token`, or a fanout cursor (one position per partition): wait until the "
            "read models include it.")  # fmt: skip
    return [
        _query("position", {"type": "string"}, text),
        {"name": "X-Parley-Position", "in": "header", "required": False, "schema": {"type": "string"},
         "description": text},
    ]  # fmt: skip


def add_query_parameters(schema: dict[str, Any], max_limit: int) -> dict[str, Any]:
    """Declare each query route's parameters, bearer security and problem+json answers in `schema`."""

    def limit(default: int) -> dict[str, Any]:
        bounds = {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default}
        return _query("limit", bounds, "Page size")

    seq = {"type": "integer", "minimum": 0}
    declared: dict[str, list[dict[str, Any]]] = {
        "/v1/conversations": [
            limit(50),
            _query("cursor", {"type": "string"}, "The `next_cursor` of the previous page"),
            _query("archived", {"type": "boolean"}, "Only archived (true) or only active (false) ones"),
        ],
        "/v1/conversations/{conversation_id}/messages": [
            {"name": "conversation_id", "in": "path", "required": True, "schema": _ID},
            limit(50),
            _query("after_seq", seq, "Messages after this sequence, oldest first"),
            _query("before_seq", seq, "Messages before this sequence, newest first (the default)"),
        ],
        "/v1/unread": [],
        "/v1/search": [
            _query("q", {"type": "string", "minLength": 1}, "The words to search for", required=True),
            limit(20),
        ],
    }
    add_components(schema)
    for path, parameters in declared.items():
        operation = schema["paths"][path]["get"]
        operation["parameters"] = parameters + _waits()
        operation["security"] = BEARER
        operation["responses"].update(problem_responses(_ERRORS))
        operation["responses"]["200"]["headers"] = _CURSOR
    return schema
