"""The raw ceiling: a bare `websockets` server that broadcasts prebuilt frames to each message's members.

No log, no auth, no cursor, no JSON encoding per delivery: what the WebSocket layer alone sustains.
Clients connect to /?i=<subscriber>; a control connection to /start triggers sending the load.
Run: python -m benchmarks.baselines.ws_broadcast PORT SUBSCRIBERS CONVERSATIONS PER_SUBSCRIBER MESSAGES
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import ServerConnection, broadcast, serve

from benchmarks.fanout_load import FanoutLoad


async def main(port: int, load: FanoutLoad) -> None:
    members = load.members_of()
    by_index: dict[int, ServerConnection] = {}
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        target = urlsplit(ws.request.path)
        if target.path == "/start":
            encoder = msgspec.json.Encoder()
            for conversation, message_id in load.sends():
                frame = encoder.encode({"conversation": conversation, "id": message_id, "sent": time.time()})
                broadcast([by_index[i] for i in members[conversation] if i in by_index], frame.decode())
                await asyncio.sleep(0)
            await ws.send("sent")
            await ws.wait_closed()
            done.set()
            return
        index = int(parse_qs(target.query)["i"][0])
        by_index[index] = ws
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
        await done.wait()


if __name__ == "__main__":
    port, subscribers, conversations, per_subscriber, messages = map(int, sys.argv[1:6])
    asyncio.run(main(port, FanoutLoad(subscribers, conversations, per_subscriber, messages)))
