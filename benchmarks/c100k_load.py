"""One load-generator process of `benchmarks.c100k`: holds many idle authenticated, subscribed connections.

Each connection is websockets' sans-I/O client protocol on a bare asyncio transport (no task, no
queue): a few KiB each, so one process holds tens of thousands. Pings are answered by the protocol.
Its source address is 127.<process>.x.y, so loopback ports do not run out. Driven over stdin/stdout:
`python -m benchmarks.c100k_load PORT FIRST COUNT PROCESS_INDEX CONCURRENCY DEFLATE BUDGET_S`
(DEFLATE 1: offer permessage-deflate, as browsers do; no new connection after BUDGET_S); it prints one JSON line
when every connection is live or failed, then answers `report` with a JSON line and `stop` by closing.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from dataclasses import asdict, dataclass

import msgspec
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from servicekit.auth_settings import AuthSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token

CONNECT_TIMEOUT_S = 120.0


class Kind(msgspec.Struct):
    type: str


_kind = msgspec.json.Decoder(Kind)


@dataclass
class Counts:
    live: int = 0
    failed: int = 0
    dropped: int = 0
    """Connections that were live and then closed before `stop`."""
    skipped: int = 0
    """Connections not attempted: the connect budget ran out first."""
    frames: int = 0


class Client(asyncio.Protocol):
    """One connection: handshake, auth, subscribe; `live` resolves on the server's `live` frame."""

    __slots__ = ("counts", "live", "messages", "proto", "transport", "was_live")

    def __init__(self, proto: ClientProtocol, messages: tuple[bytes, ...], counts: Counts) -> None:
        self.proto = proto
        self.messages = messages
        self.counts = counts
        self.live: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.was_live = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Response):
                if self.proto.state is State.OPEN:
                    for message in self.messages:
                        self.proto.send_text(message)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.counts.frames += 1
                if not self.was_live and _kind.decode(event.data).type == "live":
                    self.was_live = True
                    self.counts.live += 1
                    if not self.live.done():
                        self.live.set_result(None)
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif not self.transport.is_closing():
                self.transport.close()
        if self.proto.state is State.CLOSED and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.was_live:
            self.counts.dropped += 1
        if not self.live.done():
            self.live.set_exception(ConnectionError(f"closed before live: {exc}"))


async def run(
    port: int, first: int, count: int, process: int, concurrency: int, deflate: int, budget_s: int
) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    loop = asyncio.get_running_loop()
    auth = AuthSettings.from_env(Env(dict(os.environ)))
    uri = parse_uri(f"ws://127.0.0.1:{port}/v1/stream")
    counts = Counts()
    clients: list[Client] = []
    gate = asyncio.Semaphore(concurrency)
    subscribe = b'{"type":"subscribe"}'
    extensions = [ClientPerMessageDeflateFactory()] if deflate else None
    stop_at = loop.time() + budget_s

    async def open_one(n: int) -> None:
        user = f"u{first + n}"
        token = mint_token(auth, user, ttl_s=7200)
        messages = (msgspec.json.encode({"type": "auth", "token": token}), subscribe)
        source = f"127.{process % 254 + 1}.{(n // 250) % 256}.{n % 250 + 1}"
        async with gate:
            if loop.time() > stop_at:
                counts.skipped += 1
                return
            try:
                _, client = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Client(
                            ClientProtocol(uri, max_size=None, extensions=extensions), messages, counts
                        ),
                        "127.0.0.1", port, local_addr=(source, 0),
                    ),
                    CONNECT_TIMEOUT_S,
                )  # fmt: skip
                clients.append(client)
                await asyncio.wait_for(asyncio.shield(client.live), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ConnectionError):
                counts.failed += 1

    await asyncio.gather(*(open_one(n) for n in range(count)))
    print(json.dumps(asdict(counts)), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while command := (await reader.readline()).strip():
        if command == b"stop":
            break
        print(json.dumps(asdict(counts)), flush=True)
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


if __name__ == "__main__":
    asyncio.run(run(*(int(a) for a in sys.argv[1:8])))
