"""A paced HTTP sender in its own process, so the receivers' event loop never delays a send.

Run by benchmarks.fanout: python -m benchmarks.sender PLAN.json  (prints {"status": {code: count}} JSON).
PLAN: {"port": P, "rate_per_s": R, "connections": N, "sends": [[conversation_id, token, message_id], ...]}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import msgspec

from benchmarks.loadgen import post_request, read_response


async def _connection(
    port: int, queue: asyncio.Queue[tuple[str, str, str] | None], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (item := await queue.get()) is not None:
            conversation, token, message_id = item
            body = msgspec.json.encode({"body": f"{message_id}|{time.time()}", "message_id": message_id})
            path = f"/v1/conversations/{conversation}/messages"
            writer.write(post_request(path, body, {"Authorization": f"Bearer {token}"}))
            status = await read_response(reader)
            if status is None:
                raise ConnectionError("the command API closed the connection")
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def main(plan: dict[str, Any]) -> dict[int, int]:
    port, rate = int(plan["port"]), float(plan["rate_per_s"])
    sends: list[tuple[str, str, str]] = [(s[0], s[1], s[2]) for s in plan["sends"]]
    queue: asyncio.Queue[tuple[str, str, str] | None] = asyncio.Queue()
    statuses: dict[int, int] = {}
    workers = [
        asyncio.create_task(_connection(port, queue, statuses)) for _ in range(int(plan["connections"]))
    ]
    started = time.perf_counter()
    for n, item in enumerate(sends):
        delay = started + n / rate - time.perf_counter()
        if delay > 0.001:
            await asyncio.sleep(delay)
        queue.put_nowait(item)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return statuses


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(asyncio.run(main(json.load(f)))))
