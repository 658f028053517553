"""The command routes: one table that both dispatches requests and documents them in OpenAPI."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from command_api import bodies, commands
from command_api.append import Command
from command_api.bodies import Body
from command_api.commands import Context

Build = Callable[..., Command]


@dataclass(frozen=True)
class CommandRoute:
    """`build(ctx, [body,] **path_params)` makes the command; `body` is None for bodiless routes."""

    method: str
    template: str
    op: str
    summary: str
    build: Build
    body: type[Body] | None = None
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))


ROUTES: tuple[CommandRoute, ...] = (
    CommandRoute("POST", "/v1/conversations", "create_conversation", "Create a conversation",
                 commands.create_conversation, bodies.CreateConversation),
    CommandRoute("POST", "/v1/conversations/{conversation_id}/participants", "add_participant",
                 "Add a participant", commands.add_participant, bodies.AddParticipant),
    CommandRoute("DELETE", "/v1/conversations/{conversation_id}/participants/{user_id}", "remove_participant",
                 "Remove a participant (yourself, or anyone if you created the conversation)",
                 commands.remove_participant),
    CommandRoute("POST", "/v1/conversations/{conversation_id}/messages", "send_message", "Send a message",
                 commands.send_message, bodies.SendMessage),
    CommandRoute("PATCH", "/v1/conversations/{conversation_id}/messages/{message_id}", "edit_message",
                 "Edit your message", commands.edit_message, bodies.EditMessage),
    CommandRoute("DELETE", "/v1/conversations/{conversation_id}/messages/{message_id}", "delete_message",
                 "Delete your message", commands.delete_message),
    CommandRoute("POST", "/v1/conversations/{conversation_id}/read", "mark_read",
                 "Mark the conversation read up to a sequence", commands.mark_read, bodies.MarkRead),
    CommandRoute("PUT", "/v1/conversations/{conversation_id}/archive", "archive",
                 "Archive the conversation for yourself", commands.archive),
    CommandRoute("DELETE", "/v1/conversations/{conversation_id}/archive", "unarchive",
                 "Unarchive the conversation for yourself", commands.unarchive),
)  # fmt: skip


def match(method: str, path: str) -> tuple[CommandRoute | None, dict[str, str], list[str]]:
    """The route for `method path` with its path parameters; else the methods the path allows."""
    allowed: list[str] = []
    for route in ROUTES:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict(), []
        allowed.append(route.method)
    return None, {}, allowed


def build(route: CommandRoute, ctx: Context, body: Any, params: dict[str, str]) -> Command:
    if route.body is None:
        return route.build(ctx, **params)
    return route.build(ctx, *params.values(), body)
