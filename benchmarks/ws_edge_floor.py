"""The memory floor of a WebSocket edge: RSS growth per idle connection of bare servers, no Parley logic.

Each variant is a child process serving one text echo on `/`; a client process (websockets' sans-I/O
client on bare asyncio transports, one 127.0.x.y source each) opens `--connections`, sends one message
on each and waits for the answer, then the server's RSS growth is divided by the connections. Variants:
  uvicorn   uvicorn's websockets-sansio protocol, an ASGI app awaiting `receive()` (one task each)
  native    an asyncio.Protocol driving websockets' sans-I/O `ServerProtocol` (no task while idle)
  picows    picows (Cython), auto-ping on; needs picows importable (`--picows-path` adds a folder)
  websockets  websockets' own asyncio server (a handler task and a keepalive task each)
All on uvloop, pings every 20 s. Run: python -m benchmarks.ws_edge_floor --connections 3000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import subprocess
import sys
import time
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from benchmarks.fanout import rss_bytes
from benchmarks.machine import describe
from devstack.binaries import redis_server_binary
from devstack.ports import free_port, is_listening

VARIANTS = ("uvicorn", "native", "picows", "websockets")
PING_S = 20.0


# --- servers -------------------------------------------------------------------------------------------


class NativeServer(asyncio.Protocol):
    """One connection: the handshake and frames parsed by websockets' sans-I/O protocol, no task."""

    __slots__ = ("proto", "transport")
    live: set[NativeServer] = set()  # noqa: RUF012 (the keepalive wheel's registry stands in here)

    def __init__(self) -> None:
        self.proto = ServerProtocol(max_size=65536)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        NativeServer.live.add(self)

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Request):
                proto.send_response(proto.accept(event))
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                proto.send_text(event.data)
        assert self.transport is not None
        for chunk in proto.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        NativeServer.live.discard(self)


async def _asgi_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": message["text"]})


async def _serve(variant: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if variant == "native":
        server = await loop.create_server(NativeServer, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()
    elif variant == "uvicorn":
        import uvicorn

        config = uvicorn.Config(
            _asgi_echo, host="127.0.0.1", port=port, ws="websockets-sansio", loop="none", log_level="warning",
            ws_ping_interval=PING_S, ws_ping_timeout=PING_S, backlog=4096,
        )  # fmt: skip
        await uvicorn.Server(config).serve()
    elif variant == "picows":
        import picows  # type: ignore[import-not-found]

        class Listener(picows.WSListener):  # type: ignore[misc]
            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type == picows.WSMsgType.TEXT:
                    transport.send(picows.WSMsgType.TEXT, frame.get_payload_as_bytes())

        server = await picows.ws_create_server(
            lambda _request: Listener(), "127.0.0.1", port, enable_auto_ping=True,
            auto_ping_idle_timeout=PING_S, auto_ping_reply_timeout=PING_S, backlog=4096,
        )  # fmt: skip
        await server.serve_forever()
    else:
        from websockets.asyncio.server import ServerConnection, serve

        async def echo(ws: ServerConnection) -> None:
            async for message in ws:
                await ws.send(message)

        async with serve(
            echo, "127.0.0.1", port, ping_interval=PING_S, ping_timeout=PING_S, backlog=4096
        ) as s:
            await s.serve_forever()


# --- client --------------------------------------------------------------------------------------------


class Client(asyncio.Protocol):
    __slots__ = ("answered", "proto", "transport")

    def __init__(self, proto: ClientProtocol) -> None:
        self.proto = proto
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Response) and self.proto.state is State.OPEN:
                self.proto.send_text(b'{"type":"hello"}')
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT and not self.answered.done():
                self.answered.set_result(None)
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectionError(str(exc)))


async def _load(port: int, connections: int) -> None:
    """Open and hold `connections`; print one line when all answered, exit on stdin's EOF."""
    loop = asyncio.get_running_loop()
    uri = parse_uri(f"ws://127.0.0.1:{port}/")
    gate = asyncio.Semaphore(64)
    clients: list[Client] = []

    async def one(n: int) -> None:
        async with gate:
            source = (f"127.0.{1 + n // 250}.{1 + n % 250}", 0)
            _, client = await loop.create_connection(
                lambda: Client(ClientProtocol(uri)), "127.0.0.1", port, local_addr=source
            )
            clients.append(client)
            await asyncio.wait_for(client.answered, 60)

    results = await asyncio.gather(*(one(n) for n in range(connections)), return_exceptions=True)
    failed = sum(isinstance(r, BaseException) for r in results)
    print(f"{connections - failed} {failed}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


# --- driver --------------------------------------------------------------------------------------------


def _child(*args: str, picows_path: str | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if picows_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), picows_path) if p)
    return subprocess.Popen([sys.executable, "-m", "benchmarks.ws_edge_floor", *args], env=env, **kwargs)


def measure(variant: str, connections: int, picows_path: str | None) -> tuple[float, int]:
    """(KiB of RSS growth per connection, connections failed) of one variant."""
    port = free_port()
    server = _child("serve", variant, str(port), picows_path=picows_path)
    try:
        deadline = time.monotonic() + 30
        while not is_listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{variant} did not start ({server.poll()})")
            time.sleep(0.05)
        time.sleep(0.5)
        before = rss_bytes(server.pid)
        load = _child("load", str(port), str(connections), picows_path=None,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert load.stdout is not None and load.stdin is not None
        live, failed = (int(x) for x in load.stdout.readline().split())
        time.sleep(2.0)
        after = rss_bytes(server.pid)
        load.stdin.close()
        load.wait(30)
        return (after - before) / 1024 / max(live, 1), failed
    finally:
        server.terminate()
        server.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("variant", choices=VARIANTS)
    serve.add_argument("port", type=int)
    load = sub.add_parser("load")
    load.add_argument("port", type=int)
    load.add_argument("connections", type=int)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--picows-path", default=None, help="a folder holding picows (not a dependency)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.command in ("serve", "load"):
        import uvloop

        gc.freeze()
        coro = (
            _serve(args.variant, args.port) if args.command == "serve" else _load(args.port, args.connections)
        )
        uvloop.run(coro)
        return
    print(f"machine: {describe(str(redis_server_binary()))}")
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.connections:,} idle connections"
    )
    for round_ in range(args.rounds):
        for variant in args.variants.split(","):
            kib, failed = measure(variant, args.connections, args.picows_path)
            print(
                f"round {round_ + 1}  {variant:<11} {kib:6.2f} KiB per connection ({failed} failed)",
                flush=True,
            )


if __name__ == "__main__":
    main()
