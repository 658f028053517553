"""The OpenAPI document of the command routes, generated from the same table that dispatches them."""

from __future__ import annotations

from typing import Any

import msgspec

from command_api import bodies
from command_api.responses import Accepted
from command_api.routes import ROUTES
from servicekit.problems import PROBLEM_MEDIA_TYPE, PROBLEM_SCHEMA

_REF = "#/components/schemas/{name}"
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
     "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
    {"name": "X-Correlation-Id", "in": "header", "required": False, "schema": {"type": "string"}},
    {"name": "X-Causation-Id", "in": "header", "required": False, "schema": {"type": "string"}},
]  # fmt: skip


def add_command_paths(schema: dict[str, Any]) -> dict[str, Any]:
    """Add every command route, its body and answer schemas, and bearer security to `schema`."""
    body_types = [bodies.CreateConversation, bodies.AddParticipant, bodies.SendMessage,
                  bodies.EditMessage, bodies.MarkRead, Accepted]  # fmt: skip
    _, components = msgspec.json.schema_components(body_types, ref_template=_REF)
    parts = schema.setdefault("components", {})
    parts.setdefault("schemas", {}).update(components)
    parts["schemas"]["Problem"] = PROBLEM_SCHEMA
    parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    responses: dict[str, Any] = {
        "202": {
            "description": "Appended to the log (or an idempotent replay of the original answer)",
            "content": {"application/json": {"schema": {"$ref": _REF.format(name="Accepted")}}},
        }
    }
    for code, text in _ERRORS:
        problem = {"schema": {"$ref": _REF.format(name="Problem")}}
        responses[str(code)] = {"description": text, "content": {PROBLEM_MEDIA_TYPE: problem}}
    paths = schema.setdefault("paths", {})
    for route in ROUTES:
        path_params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.pattern.groupindex
        ]
        operation: dict[str, Any] = {
            "tags": ["commands"],
            "summary": route.summary,
            "operationId": route.op,
            "security": [{"bearer": []}],
            "parameters": path_params + _PARAMETERS,
            "responses": responses,
        }
        if route.body is not None:
            ref = {"$ref": _REF.format(name=route.body.__name__)}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return schema
