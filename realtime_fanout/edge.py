"""The fanout's native WebSocket edge: one `asyncio.Protocol` per connection driving websockets' sans-I/O
`ServerProtocol`, with no task while a connection is idle (`make bench-c100k`: see BENCHMARKS.md).

uvicorn still serves the port: its HTTP protocol parses each request (bounded heads, /metrics, /readyz,
CORS) and hands an upgrade to this class (uvicorn's `ws=`), so `make run`, compose and the client contract
are unchanged. From the upgrade on everything is here: admission (503 + Retry-After), the Origin
allow-list (403), the handshake (subprotocol, permessage-deflate), frames in and out, keepalive pings
(one process-wide wheel, edgeloops.py), closes that never wait on a peer's reading (a close frame queued
at once behind what is unsent; TCP RST after the close timeout) and uvicorn's graceful shutdown (1012).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import socket
import struct
from collections.abc import Coroutine, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qs

from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from realtime_fanout.connection import CallbackConnection, offered_token
from realtime_fanout.edgeloops import Flusher, Keepalive
from realtime_fanout.metrics import ADMISSION_REFUSED
from realtime_fanout.overload import Admission
from realtime_fanout.settings import FanoutSettings
from servicekit.httpedge import ACCESS_LOGGER, refusal

log = logging.getLogger("uvicorn.error")  # uvicorn's: its redaction filter and level apply
access_log = logging.getLogger(ACCESS_LOGGER)
"""A line per connection (accepted, and websockets' open and closed): on with PARLEY_HTTP_ACCESS_LOG, as
the HTTP access log; off, no record is even made (three per connection were ~6 % of a storm's CPU)."""

STREAM_PATH = "/v1/stream"
MAX_INBOX = 16
"""Client messages held while the connection is established (it is not read meanwhile); past it the
transport stops reading until they are fed."""


def reset(transport: Any) -> None:
    """Drop a connection with a TCP RST: a plain close would leave the kernel trying to deliver the
    unsent bytes to a peer that does not read (an orphaned socket holding its buffer)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _bearer(_protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """The subprotocol to accept: the one `offered_token` takes the token from."""
    chosen, _ = offered_token(offered, None)
    return None if chosen is None else Subprotocol(chosen)


class StreamEdge(asyncio.Protocol):
    """One WebSocket connection of the stream; the class attributes are one fanout's (see `edge_class`)."""

    __slots__ = (
        "_close_timer", "_fragments", "_inbox", "_offered", "_state", "_waiter", "bucket", "connection",
        "ping_sent_at", "server_state", "transport", "ws",
    )  # fmt: skip

    app: ClassVar[Any]
    settings: ClassVar[FanoutSettings]
    admission: ClassVar[Admission | None] = None
    extensions: ClassVar[list[ServerExtensionFactory]] = []
    allowed_origins: ClassVar[frozenset[str]] = frozenset()
    flusher: ClassVar[Flusher | None] = None
    keepalive: ClassVar[Keepalive | None] = None

    # _state bits
    ADMITTING = 1
    PAUSED_WRITING = 2
    PAUSED_READING = 4
    CLOSE_SENT = 8
    LOST = 16

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        self.server_state = server_state
        self.ws = ServerProtocol(
            extensions=self.extensions, select_subprotocol=_bearer, max_size=self.settings.max_message_bytes,
            logger=access_log,
        )  # fmt: skip
        self.transport: Any = None
        self.connection: CallbackConnection | None = None
        self._state = 0
        self._offered: tuple[str | None, str | None] | None = None
        self._inbox: collections.deque[str | None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.bucket = -1
        self.ping_sent_at = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        if ws.state is State.CONNECTING and ws.handshake_exc is not None and not self.transport.is_closing():
            self._refuse_unparsed(ws.handshake_exc)
            return
        self._write_pending()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._write_pending()
        return None

    def pause_writing(self) -> None:
        self._state |= self.PAUSED_WRITING

    def resume_writing(self) -> None:
        self._state &= ~self.PAUSED_WRITING
        self._wake()
        if self.connection is not None and self.flusher is not None:
            self.flusher.want(self.connection)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state |= self.LOST
        self.server_state.connections.discard(self)
        self.admitted()
        if self.keepalive is not None:
            self.keepalive.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._wake()
        connection, self.connection = self.connection, None  # the two refer to each other: a cycle
        if connection is not None:
            connection.peer_gone()
        # Three cycles would keep websockets' protocol (and its zlib contexts) until a full collection: its
        # parser, a generator over it that never finishes; the parser error's traceback; and the subprotocol
        # selector, which it binds to itself. Nothing parses or negotiates once the connection is lost.
        self.ws.parser.close()
        self.ws.parser_exc = None
        vars(self.ws).pop("select_subprotocol", None)

    # uvicorn's graceful shutdown

    def shutdown(self) -> None:
        """Going away: close 1012 (clients resume elsewhere, or here once restarted)."""
        if self.ws.state is State.OPEN and not self._state & self.CLOSE_SENT:
            self._send_close(1012, "")
        if self.connection is not None:
            self.connection.peer_gone()
        self.transport.close()

    # the handshake

    def _handshake(self, request: Request) -> None:
        path, _, query = request.path.partition("?")
        if path != STREAM_PATH:
            self._refuse(refusal(404, "not-found", "Not Found", self.server_state.default_headers))
            return
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/").lower() not in self.allowed_origins:
            log.info('%s - "WebSocket %s" 403', self._peer(), request.path)
            answer = refusal(
                403, "origin-not-allowed", "Origin not allowed", self.server_state.default_headers
            )
            self._refuse(answer)
            return
        if self.admission is not None:
            if not self.admission.try_enter():
                ADMISSION_REFUSED.inc()
                retry = (b"retry-after", str(self.settings.admission_retry_after_s).encode())
                self._refuse(refusal(503, "overloaded", "Service Unavailable",
                                     [*self.server_state.default_headers, retry]))  # fmt: skip
                return
            self._state |= self.ADMITTING
        response = self.ws.accept(request)
        if response.status_code != 101:
            self.admitted()
            self.ws.send_response(response)
            self._state |= self.CLOSE_SENT
            self._write_pending()
            self.transport.close()
            return
        del response.headers["Date"]
        for name, value in self.server_state.default_headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        self.ws.send_response(response)
        self._forget_request()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info('%s - "WebSocket %s" [accepted]', self._peer(), request.path)
        tokens = parse_qs(query).get("token") if "token=" in query else None
        offered = [p.strip() for h in request.headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",")]
        self._offered = offered_token(offered, tokens[0] if tokens else None)
        services = self.app.state.services
        self.connection = CallbackConnection(
            self, services.hub, services.history, services.verifier, self.settings, services.seeder,
            services.bus, services.slots,
        )  # fmt: skip
        if self.keepalive is not None:
            self.keepalive.add(self)
        self.spawn(self.connection.run())

    def _forget_request(self) -> None:
        """websockets' handshake parser keeps the request (its headers: about 1.3 KiB, measured) in its
        suspended frame for the connection's life. At a frame boundary (nothing buffered: uvicorn hands
        over the request head alone) the frame parser takes over without it."""
        ws = self.ws
        if ws.state is State.OPEN and not ws.reader.buffer:
            ws.parser = Protocol.parse(ws)
            next(ws.parser)

    def _refuse(self, answer: bytes) -> None:
        self._state |= self.CLOSE_SENT
        self.transport.write(answer)
        self.transport.close()

    def _refuse_unparsed(self, failure: Exception) -> None:
        """A handshake websockets could not parse (a line over 8 KiB, say) is answered at once: 414/431 for
        the limits, 400 for the rest."""
        self.ws.data_to_send()
        headers = self.server_state.default_headers
        if isinstance(failure, RequestLineTooLong):
            answer = refusal(414, "uri-too-long", "URI Too Long", headers)
        elif isinstance(failure, HeaderLineTooLong | TooManyHeaders):
            answer = refusal(431, "header-too-large", "Request Header Fields Too Large", headers)
        else:
            answer = refusal(400, "invalid-handshake", "Bad Request", headers)
        log.info("refused a WebSocket handshake: %s", type(failure.__cause__ or failure).__name__)
        self._refuse(answer)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "peer"

    # frames in

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PONG:
            self.ping_sent_at = 0.0
        elif opcode is Opcode.CLOSE:
            if self.connection is not None:
                self.connection.peer_gone()
        elif opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            if opcode is not Opcode.CONT:
                self._fragments = [b"T" if opcode is Opcode.TEXT else b"B"]
            if self._fragments is None:
                return
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                kind, *parts = self._fragments
                self._fragments = None
                text: str | None = None
                if kind == b"T":
                    try:
                        text = b"".join(parts).decode()
                    except UnicodeDecodeError:
                        text = None  # not text: refused as a binary message is
                self._message(text)

    def _message(self, text: str | None) -> None:
        if self._state & self.CLOSE_SENT or self.connection is None:
            return
        if self._inbox is None and self._waiter is None and self._live():
            self.connection.receive_live(text)
            return
        if self._inbox is None:
            self._inbox = collections.deque()
        self._inbox.append(text)
        if len(self._inbox) >= MAX_INBOX:
            self._pause_reading()
        self._wake()

    def _live(self) -> bool:
        return self.connection is not None and self.connection.live

    # the Socket the connection awaits while it is established

    def offered(self) -> tuple[str | None, str | None]:
        return self._offered or (None, None)

    async def accept(self, subprotocol: str | None = None) -> None:
        """The upgrade was answered in `_handshake`; the offered token is forgotten from here on."""
        self._offered = None

    def message_waiting(self) -> bool:
        return bool(self._inbox)

    async def receive_text(self) -> str:
        while not self._inbox:
            if self._state & (self.LOST | self.CLOSE_SENT):
                raise WebSocketDisconnect(1006)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        text = self._inbox.popleft()
        if not self._inbox:
            self._inbox = None
            self._resume_reading()
        if text is None:
            raise KeyError("bytes")  # a binary message, as Starlette's receive_text says it
        return text

    async def send_text(self, data: str) -> None:
        await self.writable()
        self.write_texts([data.encode()])

    async def writable(self) -> None:
        while self._state & self.PAUSED_WRITING and not self._state & self.LOST:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._state & self.LOST:
            raise WebSocketDisconnect(1006)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if not self._state & (self.CLOSE_SENT | self.LOST) and self.ws.state is State.OPEN:
            self._send_close(code, reason or "")

    def admitted(self) -> None:
        if self._state & self.ADMITTING and self.admission is not None:
            self._state &= ~self.ADMITTING
            self.admission.leave()

    def go_live(self, connection: CallbackConnection) -> None:
        """From now on client messages go straight to `connection`; those held are fed first."""
        while self._inbox and connection is self.connection:
            text = self._inbox.popleft()
            connection.receive_live(text)
        self._inbox = None
        self._resume_reading()

    # frames out

    def want_flush(self, connection: CallbackConnection) -> None:
        if self.flusher is not None:
            self.flusher.want(connection)

    def timer_horizon_s(self) -> float:
        """How far ahead a connection's deadline needs a timer of its own (see Keepalive)."""
        return self.keepalive.horizon_s if self.keepalive is not None else math.inf

    def writable_now(self) -> bool:
        return self.ws.state is State.OPEN and not self._state & (
            self.PAUSED_WRITING | self.LOST | self.CLOSE_SENT
        )

    def write_texts(self, frames: list[bytes]) -> None:
        if self._state & (self.LOST | self.CLOSE_SENT) or self.ws.state is not State.OPEN:
            return  # closing: what is left is dropped (the peer resumes by its cursor)
        for frame in frames:
            self.ws.send_text(frame)
        self._write_pending()

    def ping(self, payload: bytes) -> None:
        if self.ws.state is State.OPEN and not self._state & (self.CLOSE_SENT | self.LOST):
            self.ws.send_ping(payload)
            self._write_pending()

    def keepalive_timeout(self) -> None:
        """No pong in time: close 1011 at once and end the connection (the peer is gone, or not reading)."""
        if self._state & (self.CLOSE_SENT | self.LOST):
            return
        self._send_close(1011, "keepalive ping timeout")
        if self.connection is not None:
            self.connection.peer_gone()

    def _write_pending(self) -> None:
        transport = self.transport
        chunks = self.ws.data_to_send()
        if not chunks:
            return
        eof = not chunks[-1]
        data = b"".join(chunks)
        if data and not transport.is_closing():
            transport.write(data)
        if eof or self.ws.state is State.CLOSED:
            transport.close()

    def _send_close(self, code: int, reason: str) -> None:
        """Queue a close frame behind what is unsent and give the peer `close_timeout_s` to answer."""
        self._state |= self.CLOSE_SENT
        self.ws.send_close(code, reason)
        self._write_pending()
        self._resume_reading()  # read the peer's close
        if self._close_timer is None and not self._state & self.LOST:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(self.settings.close_timeout_s, self._reset)
        self._wake()

    def _reset(self) -> None:
        self._close_timer = None
        reset(self.transport)

    # helpers

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    def pause_reading_until(self, work: Coroutine[Any, Any, None]) -> None:
        self._pause_reading()

        async def then_resume() -> None:
            try:
                await work
            finally:
                self._resume_reading()

        self.spawn(then_resume())

    def _pause_reading(self) -> None:
        if not self._state & (self.PAUSED_READING | self.LOST):
            self._state |= self.PAUSED_READING
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._state & self.PAUSED_READING and not self._state & self.LOST:
            self._state &= ~self.PAUSED_READING
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def edge_class(settings: FanoutSettings, app: Any) -> type[StreamEdge]:
    """A `StreamEdge` subclass for the fanout `app` (its services are read at each upgrade) and `settings`;
    sets the access log's level from `settings.http.access_log`."""
    access_log.setLevel(logging.INFO if settings.http.access_log else logging.WARNING)
    extensions: list[ServerExtensionFactory] = []
    if settings.ws_deflate:  # uvicorn's choice: small windows, 46 KiB of zlib state per connection
        extensions.append(ServerPerMessageDeflateFactory(
            server_max_window_bits=12, client_max_window_bits=12, compress_settings={"memLevel": 5},
        ))  # fmt: skip
    attributes = {
        "__slots__": (), "app": app, "settings": settings, "extensions": extensions,
        "admission": Admission(settings.max_admitting) if settings.max_admitting else None,
        "allowed_origins": frozenset(settings.http.allowed_origins), "flusher": Flusher(),
        "keepalive": Keepalive(settings.ping_interval_s, settings.ping_timeout_s),
    }  # fmt: skip
    return type("FanoutStreamEdge", (StreamEdge,), attributes)


def ws_options(settings: FanoutSettings, app: Any) -> dict[str, Any]:
    """uvicorn's WebSocket options of the fanout `app`: the edge `PARLEY_FANOUT_WS_EDGE` names."""
    if settings.ws_edge == "uvicorn":
        from realtime_fanout import wsproto

        return wsproto.ws_options(settings)
    return {"ws": edge_class(settings, app)}
