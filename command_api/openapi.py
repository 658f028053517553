"""The OpenAPI document of the command routes, generated from the same table that dispatches them."""

from __future__ import annotations

from typing import Any

import msgspec

from command_api import bodies
from command_api.responses import Accepted
from command_api.routes import ROUTES, CommandRoute
from events.ids import CONVERSATION_ID_PATTERN, ID_PATTERN
from servicekit.openapi import BEARER, REF, add_components, problem_responses

_ID = {"$ref": REF.format(name="Id")}
_ID_SCHEMA = {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 64,
              "description": "A user or message id, or a chosen conversation id"}  # fmt: skip
_CONVERSATION_ID = {"type": "string", "pattern": CONVERSATION_ID_PATTERN, "minLength": 1, "maxLength": 129,
                    "description": "`<creator>:<chosen id>`, or a generated id"}  # fmt: skip
_ERRORS = (
    (400, "Malformed request"), (401, "Missing or invalid token"), (403, "Not allowed"),
    (404, "Not found"), (405, "Method not allowed"), (409, "Conflicts with the conversation's state"),
    (410, "Message deleted"), (413, "Request too large"), (415, "Not JSON"), (422, "Invalid command"),
    (429, "Rate limited"), (503, "Log unavailable: outcome unknown, retry with the same Idempotency-Key"),
)  # fmt: skip
_PARAMETERS: list[dict[str, Any]] = [
    {"name": "expected_seq", "in": "query", "required": False,
     "description": "Refuse (409 sequence-mismatch) unless the conversation's last sequence is this.",
     "schema": {"type": "integer", "minimum": 0, "maximum": bodies.MAX_EXPECTED_SEQ}},
    {"name": "Idempotency-Key", "in": "header", "required": False,
     "description": "A retry with the same key and body returns the original answer (24 h by default).",
     "schema": {"type": "string", "pattern": bodies.IDEMPOTENCY_KEY_PATTERN, "maxLength": 255}},
    {"name": "X-Correlation-Id", "in": "header", "required": False, "schema": _ID},
    {"name": "X-Causation-Id", "in": "header", "required": False, "schema": _ID},
]  # fmt: skip


def _field_limits(max_body_chars: int) -> tuple[tuple[str, str, dict[str, Any]], ...]:
    """(schema, field, keywords): the limits msgspec cannot carry, checked in bodies.py and commands.py."""
    optional_id = {"anyOf": [_ID, {"type": "null"}]}
    text = {"minLength": 1, "maxLength": max_body_chars, "pattern": bodies.TEXT_PATTERN}
    return (
        (
            "CreateConversation",
            "title",
            {"minLength": 1, "maxLength": bodies.MAX_TITLE_CHARS, "pattern": bodies.TEXT_PATTERN},
        ),
        ("CreateConversation", "participants", {"items": _ID, "maxItems": bodies.MAX_PARTICIPANTS}),
        ("CreateConversation", "conversation_id", optional_id),
        ("AddParticipant", "user_id", _ID),
        ("SendMessage", "body", text),
        ("SendMessage", "reply_to", optional_id),
        ("SendMessage", "message_id", optional_id),
        ("EditMessage", "body", text),
        ("MarkRead", "up_to_seq", {"minimum": 0}),
    )


_YIELDS = {"create_conversation": ("conversation_id",), "send_message": ("conversation_id", "message_id")}
"""The ids a command's 202 answer names, which other routes take as path parameters."""


def _links(route: CommandRoute) -> dict[str, Any]:
    """OpenAPI links from `route`'s 202 to every other route whose path ids its answer names."""
    yields = _YIELDS.get(route.op, ())
    return {
        target.op: {
            "operationId": target.op,
            "parameters": {name: f"$response.body#/{name}" for name in target.pattern.groupindex},
        }
        for target in ROUTES
        if target is not route and target.pattern.groupindex and set(target.pattern.groupindex) <= set(yields)
    }


def add_command_paths(schema: dict[str, Any], max_body_chars: int, max_request_bytes: int) -> dict[str, Any]:
    """Add every command route, its body and answer schemas with their id patterns and limits, and
    bearer security to `schema`."""
    body_types = [bodies.CreateConversation, bodies.AddParticipant, bodies.SendMessage,
                  bodies.EditMessage, bodies.MarkRead, Accepted]  # fmt: skip
    _, components = msgspec.json.schema_components(body_types, ref_template=REF)
    for name, field, limits in _field_limits(max_body_chars):
        prop = components[name]["properties"][field]
        if "anyOf" in limits or "$ref" in limits:
            prop.pop("type", None)
        prop.update(limits)
    add_components(schema, {**components, "Id": _ID_SCHEMA})
    responses: dict[str, Any] = {
        "202": {
            "description": "Appended to the log (or an idempotent replay of the original answer)",
            "content": {"application/json": {"schema": {"$ref": REF.format(name="Accepted")}}},
        },
        **problem_responses(_ERRORS),
    }
    paths = schema.setdefault("paths", {})
    for route in ROUTES:
        path_params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": _CONVERSATION_ID if name == "conversation_id" else _ID,
            }
            for name in route.pattern.groupindex
        ]
        operation: dict[str, Any] = {
            "tags": ["commands"],
            "summary": route.summary,
            "operationId": route.op,
            "security": BEARER,
            "parameters": path_params + _PARAMETERS,
            "responses": responses,
        }
        if links := _links(route):
            operation["responses"] = {**responses, "202": {**responses["202"], "links": links}}
        if route.body is not None:
            ref = {"$ref": REF.format(name=route.body.__name__)}
            operation["requestBody"] = {
                "required": True,
                "description": f"JSON, at most {max_request_bytes} bytes (413 request-too-large)",
                "content": {"application/json": {"schema": ref}},
            }
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return schema
