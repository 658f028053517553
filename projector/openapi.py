"""The query API's OpenAPI declarations: the parameters, security and problem answers its routes read
from the request themselves (FastAPI sees none of them), so clients and fuzzers can rely on them."""

from __future__ import annotations

from typing import Any

from events.ids import CONVERSATION_ID_PATTERN
from events.schema import CURRENT_VERSIONS
from projector.history.http import MAX_LIMIT as HISTORY_MAX_LIMIT
from projector.history.http import NDJSON
from servicekit.openapi import BEARER, add_components, problem_responses

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
}
# Every route of the query API may answer these (besides its own); the Retry-After ones declare it.
_COMMON = (
    (400, "Invalid parameter (`type` names which)"), (401, "Missing or invalid token"),
    (500, "`internal-error`: a bug (logged), no Retry-After"),
)  # fmt: skip
_READS = (
    (409, "`position-from-another-log`: the position is of another log epoch"),
    (429, "`too-many-reads`: the user's reads in flight are at their limit; retry after Retry-After"),
    (
        503,
        "`position-not-reached`, `unavailable`, `query-timeout` or `read-models-from-another-log`: "
        "retry after Retry-After",
    ),
)
_NOT_YOURS = ((404, "`conversation-not-found`: no such conversation among yours"),)
_TOO_EXPENSIVE = (
    (422, "`query-too-expensive`: the search ran past its time limit; use fewer or rarer words"),
)
_HISTORY = (
    (403, "`analyst-role-required`: the token's analyst claim lacks the analyst role"),
    (409, "`position-from-another-log`: a bound is of another log epoch"),
    (503, "`log-unavailable` (the log is not open yet: retry shortly) or `unavailable` (with Retry-After)"),
)
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


def _limit(default: int, maximum: int) -> dict[str, Any]:
    bounds = {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    return _query("limit", bounds, "Page size")


def _history_parameters() -> list[dict[str, Any]]:
    def many(name: str, items: dict[str, Any], text: str) -> dict[str, Any]:
        return {**_query(name, {"type": "array", "items": items}, text), "style": "form", "explode": True}

    bound = {"type": "string"}
    return [
        _query("from", bound, "Exclusive lower bound: a position token or a fanout cursor"),
        _query("to", bound, "Inclusive upper bound: a position token or a fanout cursor"),
        _query("since", {"type": "string"}, "Log time, ISO 8601 (no zone: UTC), inclusive"),
        _query("until", {"type": "string"}, "Log time, ISO 8601 (no zone: UTC), exclusive"),
        many("conversation", {"type": "string"}, "Only these conversations (repeatable)"),
        many("type", {"type": "string", "enum": sorted(CURRENT_VERSIONS)}, "Only these event types"),
        many("actor", {"type": "string"}, "Only events by these users (repeatable)"),
        _limit(100, HISTORY_MAX_LIMIT),
        _query(
            "format", {"type": "string", "enum": ["json", "ndjson"]}, "ndjson: stream the whole selection"
        ),
    ]


def add_query_parameters(
    schema: dict[str, Any], max_limit: int, search_max_chars: int, search_max_terms: int
) -> dict[str, Any]:
    """Declare each query route's parameters, bearer security and problem+json answers in `schema`."""
    seq = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    q = {"type": "string", "minLength": 1, "maxLength": search_max_chars, "x-max-terms": search_max_terms}
    q_text = f"The words to search for: at most {search_max_chars} characters and {search_max_terms} terms"
    declared: dict[str, tuple[list[dict[str, Any]], tuple[tuple[int, str], ...]]] = {
        "/v1/conversations": ([
            _limit(50, max_limit),
            _query("cursor", {"type": "string"}, "The `next_cursor` of the previous page"),
            _query("archived", {"type": "boolean"}, "Only archived (true) or only active (false) ones"),
            *_waits(),
        ], _READS),
        "/v1/conversations/{conversation_id}/messages": ([
            {"name": "conversation_id", "in": "path", "required": True, "schema": _ID},
            _limit(50, max_limit),
            _query("after_seq", seq, "Messages after this sequence, oldest first"),
            _query("before_seq", seq, "Messages before this sequence, newest first (the default)"),
            *_waits(),
        ], _READS + _NOT_YOURS),
        "/v1/unread": (_waits(), _READS),
        "/v1/search": ([_query("q", q, q_text, required=True), _limit(20, max_limit), *_waits()],
                       _READS + _TOO_EXPENSIVE),
        "/v1/history": (_history_parameters(), _HISTORY),
    }  # fmt: skip
    add_components(schema)
    for path, (parameters, errors) in declared.items():
        operation = schema["paths"][path]["get"]
        operation["parameters"] = parameters
        operation["security"] = BEARER
        responses = operation["responses"]
        responses.pop("422", None)  # FastAPI's validation answer: these routes parse their own parameters
        responses.update(problem_responses(_COMMON + errors))
        for status in ("429", "503"):
            if status in responses:
                responses[status]["headers"] = _RETRY_AFTER
        if path != "/v1/history":
            responses["200"]["headers"] = _CURSOR
    history = schema["paths"]["/v1/history"]["get"]["responses"]["200"]
    history["content"][NDJSON] = {"schema": {"type": "string"}}
    return schema
