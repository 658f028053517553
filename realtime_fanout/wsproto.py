"""uvicorn's websockets-sansio protocol, made safe against peers that stop reading.

Stock uvicorn waits for the write buffer to drain before it even queues a close frame, and its close
timer only calls `transport.close()`, which also waits for the drain: a client that never reads would
hold its connection (and its buffer) forever. Here a close frame is queued at once, behind what is
unsent, and the transport is aborted (TCP RST; the peer sees 1006) when the closing handshake has not
completed within the close timeout. The close code is therefore best effort for a stuck peer.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.http11 import Request

from realtime_fanout.edge import reset
from realtime_fanout.flag import Flag
from realtime_fanout.metrics import ADMISSION_REFUSED
from realtime_fanout.overload import SCOPE_KEY, Admission
from realtime_fanout.settings import FanoutSettings
from servicekit.httpedge import refusal

DEFAULT_CLOSE_TIMEOUT_S = 5.0


class MessageQueue:
    """The part of asyncio.Queue uvicorn's protocol uses (put_nowait, get, empty), for one consumer.

    An asyncio.Queue costs about 3 KiB (three deques, a condition event); idle connections are held by
    the ten thousand, so this keeps one deque only while items wait, and at most one waiter.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an empty deque is 0.7 KiB; most connections are idle
        return item

    def empty(self) -> bool:
        return not self._items


class AbortingWebSocketProtocol(WebSocketsSansIOProtocol):
    """Closes never wait on the peer's reading; a handshake not done in `close_after_s` aborts the socket."""

    close_after_s = DEFAULT_CLOSE_TIMEOUT_S
    admission: Admission | None = None
    retry_after_s = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitting = False
        self.close_timeout = self.close_after_s
        self.queue = MessageQueue()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        """uvicorn ignores a handshake websockets could not parse (a line over 8 KiB, say) and the
        client waits forever: answer it at once, 414/431 for the limits, 400 for the rest."""
        super().data_received(data)
        failure = self.conn.handshake_exc
        if failure is None or self.handshake_initiated or self.transport.is_closing():
            return
        self.conn.data_to_send()
        if isinstance(failure, RequestLineTooLong):
            answer = refusal(414, "uri-too-long", "URI Too Long", self.default_headers)
        elif isinstance(failure, HeaderLineTooLong | TooManyHeaders):
            answer = refusal(431, "header-too-large", "Request Header Fields Too Large", self.default_headers)
        else:
            answer = refusal(400, "invalid-handshake", "Bad Request", self.default_headers)
        self.logger.info("refused a WebSocket handshake: %s", type(failure.__cause__ or failure).__name__)
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(answer)
        self.transport.close()

    def handle_connect(self, event: Request) -> None:
        """Above the admission limit the upgrade is answered 503 with Retry-After, before any ASGI task."""
        if self.admission is not None:
            if not self.admission.try_enter():
                ADMISSION_REFUSED.inc()
                self._refuse_busy()
                return
            self._admitting = True
        super().handle_connect(event)
        if self._admitting:
            if self.response.status_code == 101:
                self.scope["extensions"][SCOPE_KEY] = self._admitted  # type: ignore[assignment]
            else:
                self._admitted()

    def _refuse_busy(self) -> None:
        retry = (b"retry-after", str(self.retry_after_s).encode())
        answer = refusal(503, "overloaded", "Service Unavailable", [*self.default_headers, retry])
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(answer)
        self.transport.close()

    def _admitted(self) -> None:
        if self._admitting and self.admission is not None:
            self._admitting = False
            self.admission.leave()

    def connection_lost(self, exc: Exception | None) -> None:
        self._admitted()
        super().connection_lost(exc)
        self._break_cycles()

    def _break_cycles(self) -> None:
        """Free this connection by reference counting alone (the fanout collects in full only every
        PARLEY_FANOUT_GC_FULL_EVERY_S): two cycles hold it, and its zlib contexts, past its end.

        The scope's admission callback is a method of this protocol (a client gone before `live` never
        calls it). websockets' parser is a generator over its protocol that never finishes (both `parse`
        and `discard` end suspended at a `yield`), and its error's traceback holds the parser's frame.
        Nothing reads either once the connection is lost.
        """
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"].pop(SCOPE_KEY, None)
        self.conn.parser.close()
        self.conn.parser_exc = None

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and self._open_for_close():
            self._close_now(int(message.get("code", 1000)), message.get("reason") or "")
            return
        await super().send(message)
        if message["type"] == "websocket.accept":
            self._forget_handshake()

    def _forget_handshake(self) -> None:
        """Once the handshake is answered nothing reads its request, response or headers again: about
        3 KiB per connection uvicorn would keep for the connection's whole life."""
        for name in ("request", "response"):
            if hasattr(self, name):
                delattr(self, name)
        self.scope["headers"] = []

    def _open_for_close(self) -> bool:
        return (
            self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and not self.disconnected
            and not self.transport.is_closing()
        )

    def _close_now(self, code: int, reason: str) -> None:
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self._arm_abort()

    def _arm_abort(self) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_timeout, self._reset)

    def _reset(self) -> None:
        """Drop the connection with a TCP RST: a plain close would leave the kernel trying to deliver
        the unsent bytes to a peer that does not read (an orphaned socket holding its buffer)."""
        self.close_timer = None
        reset(self.transport)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        if not self.disconnected:
            self._arm_abort()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected and self.close_timer is None:
            self._arm_abort()


def protocol_class(
    close_timeout_s: float, max_admitting: int = 0, retry_after_s: int = 1
) -> type[asyncio.Protocol]:
    """An `AbortingWebSocketProtocol` subclass with the given close timeout and at most `max_admitting`
    connections being established at once (0: no limit), for uvicorn's `ws=`."""
    admission = Admission(max_admitting) if max_admitting else None
    attributes = {"close_after_s": close_timeout_s, "admission": admission, "retry_after_s": retry_after_s}
    return type("FanoutWebSocketProtocol", (AbortingWebSocketProtocol,), attributes)


def ws_options(settings: FanoutSettings) -> dict[str, Any]:
    """uvicorn's WebSocket options of a fanout with these settings."""
    protocol = protocol_class(
        settings.close_timeout_s, settings.max_admitting, settings.admission_retry_after_s
    )
    return {
        "ws": protocol,
        "ws_per_message_deflate": settings.ws_deflate, "ws_ping_interval": settings.ping_interval_s,
        "ws_ping_timeout": settings.ping_timeout_s,
        "ws_max_size": settings.max_message_bytes,  # refused (1009) from the frame header, never buffered
    }  # fmt: skip
