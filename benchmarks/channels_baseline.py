"""The seed stack under the fanout load: Django Channels + channels_redis + daphne, measured the same way.

Messages are group-sent through the channel layer, as a Django view would after saving one.
Run alone: python -m benchmarks.channels_baseline (needs `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import msgspec
import websockets

from benchmarks.fanout_load import FanoutLoad, Tally, paced, wait_quiet
from benchmarks.processes import server
from devstack.ports import free_port
from devstack.servers import RedisServer


class ChannelsResult(msgspec.Struct):
    deliveries_per_s: float
    expected: int
    unique: int
    lost: int
    duplicates: int
    publish_s: float
    connected: int


async def _subscriber(
    port: int, index: int, conversations: list[str], tally: Tally, ready: asyncio.Event, stop: asyncio.Event
) -> bool:
    url = f"ws://127.0.0.1:{port}/ws/chat/?user=u{index}&conversations={','.join(conversations)}"
    try:
        async with websockets.connect(
            url, compression=None, max_queue=None, open_timeout=30, ping_interval=None
        ) as ws:
            ready.set()
            decoder = msgspec.json.Decoder()
            while not stop.is_set():
                try:
                    frame = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                message = decoder.decode(frame)
                tally.record(index, message["id"], message["sent"])
    except (OSError, websockets.WebSocketException):
        return False
    return True


async def run_channels(load: FanoutLoad, redis_url: str) -> ChannelsResult:
    """Start daphne on the baseline app, connect the subscribers, group-send every message, count."""
    from channels_redis.core import RedisChannelLayer

    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DJANGO_SETTINGS_MODULE": "benchmarks.baselines.django_channels.settings",
    }
    daphne = [
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "benchmarks.baselines.django_channels.asgi:application",
    ]
    tally, stop = Tally(), asyncio.Event()
    with server(daphne, port, env, ready_path=None):
        tasks, connected = [], 0
        for i, conversations in enumerate(load.memberships()):
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(_subscriber(port, i, conversations, tally, ready, stop)))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                connected += 1
            except TimeoutError:
                pass
        layer = RedisChannelLayer(hosts=[redis_url])
        started = time.perf_counter()
        async for conversation, message_id in paced(load.sends(), load.rate_per_s):
            await layer.group_send(
                f"conv.{conversation}",
                {"type": "chat.message", "conversation": conversation, "id": message_id, "sent": time.time()},
            )
        publish_s = time.perf_counter() - started
        expected = load.expected_deliveries()
        await wait_quiet(tally, expected, quiet_s=3.0, deadline=time.perf_counter() + load.max_seconds)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await layer.flush()
    return ChannelsResult(
        deliveries_per_s=tally.rate(), expected=expected, unique=tally.unique, lost=expected - tally.unique,
        duplicates=tally.duplicates, publish_s=publish_s, connected=connected,
    )  # fmt: skip


async def _main() -> None:
    load = FanoutLoad(subscribers=200, conversations=20, messages=2000, rate_per_s=200)
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", appendfsync="everysec") as redis,
    ):
        print(await run_channels(load, redis.url))


if __name__ == "__main__":
    asyncio.run(_main())
