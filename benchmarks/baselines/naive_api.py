"""The naive baseline: a FastAPI + pydantic endpoint that does one plain XADD per request.

No auth, no idempotency, no conditions, no sequence: the floor the real API is compared against.
Run: python -m benchmarks.baselines.naive_api PORT REDIS_URL
"""

from __future__ import annotations

import sys
import uuid

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class SendMessage(BaseModel):
    body: str


def create_app(redis_url: str) -> FastAPI:
    app = FastAPI()
    client = aioredis.Redis.from_url(redis_url, max_connections=64)

    @app.post("/v1/conversations/{conversation_id}/messages", status_code=202)
    async def send(conversation_id: str, message: SendMessage) -> dict[str, str]:
        stream_id = await client.xadd(
            "naive:log", {"c": conversation_id, "id": str(uuid.uuid4()), "b": message.body}
        )
        assert isinstance(stream_id, bytes)
        return {"stream_id": stream_id.decode()}

    return app


if __name__ == "__main__":
    port, redis_url = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        create_app(redis_url), host="127.0.0.1", port=port, log_level="warning", access_log=False,
        loop="uvloop", http="httptools",
    )  # fmt: skip
