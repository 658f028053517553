"""The minimal equivalent chat consumer: join a group per conversation, forward group messages."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """`?user=U&conversations=a,b`: receives every message group-sent to those conversations."""

    async def connect(self) -> None:
        query = parse_qs(self.scope["query_string"].decode())
        self.conversations = [c for c in query.get("conversations", [""])[0].split(",") if c]
        for conversation in self.conversations:
            await self.channel_layer.group_add(f"conv.{conversation}", self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for conversation in self.conversations:
            await self.channel_layer.group_discard(f"conv.{conversation}", self.channel_name)

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json(
            {"conversation": event["conversation"], "id": event["id"], "sent": event["sent"]}
        )
