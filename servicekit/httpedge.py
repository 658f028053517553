"""The HTTP edge every Parley service is served through: one uvicorn setup, its limits and its headers.

Guarantees, at every service: a request head (request line and headers) larger than
`max_header_bytes` is answered 431 before more of it is buffered; one not complete within
`header_timeout_s` of its first byte is answered 408 (a connection that sends nothing is closed);
every answer carries `SECURITY_HEADERS` (an answer that sets its own Content-Security-Policy keeps
it instead of the default) and no `server` banner; browser origins are allowed only
when listed (CORS on HTTP, 403 on a WebSocket handshake); no log line carries a query value or a token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, ClassVar

import msgspec
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from servicekit.http_settings import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, HttpEdgeSettings
from servicekit.metrics import HTTP_RESPONSES
from servicekit.problems import PROBLEM_MEDIA_TYPE, problem_body

DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"
SERVER_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-content-type-options", "nosniff"),
    ("cache-control", "no-store"),
    ("referrer-policy", "no-referrer"),
)
"""Added by uvicorn to every answer. The CSP is not among them: two CSP headers would both be enforced,
so `EdgeMiddleware` adds `DEFAULT_CSP` only to an answer without its own (a page with its scripts)."""
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (*SERVER_HEADERS, ("content-security-policy", DEFAULT_CSP))
_CSP = b"content-security-policy"
_DEFAULT_CSP_HEADER = (_CSP, DEFAULT_CSP.encode())
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Idempotency-Key, X-Parley-Position, X-Correlation-Id, X-Causation-Id"
)
CORS_EXPOSE_HEADERS = "Idempotent-Replayed, Retry-After, WWW-Authenticate, Allow, X-Parley-Cursor"
CORS_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
CORS_MAX_AGE_S = 600
LINGER_S = 2.0
NO_DOC_PAGES: dict[str, Any] = {"docs_url": None, "redoc_url": None}
"""FastAPI options of every service: Swagger UI and ReDoc pages load scripts from a CDN; `/openapi.json`
stays."""


def refusal(status: int, slug: str, title: str, default_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A whole `connection: close` problem+json HTTP/1.1 answer, for refusals made below the ASGI app."""
    body = msgspec.json.encode(problem_body(status, slug, title))
    head = [f"HTTP/1.1 {status} {title}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in (*default_headers, _DEFAULT_CSP_HEADER)]
    head.append(f"content-type: {PROBLEM_MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n".encode())
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request head bounded in bytes and in time.

    httptools buffers a header of any size, and uvicorn has no header timeout: here at most
    `max_head` bytes of a head are ever fed to the parser, and one watchdog per connection cuts a
    head that started more than `head_timeout` ago. A request whose head arrives in one read costs a
    length check and a clock read.
    """

    max_head: ClassVar[int] = DEFAULT_MAX_HEADER_BYTES
    head_timeout: ClassVar[float] = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_left = self.max_head
        self._head_since: float | None = self.loop.time()
        self._watchdog: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._watch)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watchdog()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        if len(data) <= self._head_left:
            self._head_left -= len(data)
            super().data_received(data)
            return
        cut = self._head_left
        self._head_left = 0
        super().data_received(data[:cut])
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self._in_head:
            self._refuse(431, "header-too-large", "Request Header Fields Too Large")
            return
        self.data_received(data[cut:])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_since is None:
            self._head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_since = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_left = self.max_head

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol, then drop the parser as uvicorn's
        `connection_lost` does (never called here once upgraded): the parser and this protocol are a
        cycle, which would hold the connection's objects until a full collection."""
        self._stop_watchdog()
        super().handle_websocket_upgrade()
        self.parser = None  # type: ignore[assignment]

    def _watch(self) -> None:
        self._watchdog = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        since = self._head_since
        if since is not None and now - since >= self.head_timeout:
            if self._head_left == self.max_head:
                self.transport.close()  # not one byte of a request: nothing to answer
            else:
                self._refuse(408, "header-timeout", "Request Timeout")
            return
        delay = self.head_timeout if since is None else since + self.head_timeout - now
        self._watchdog = self.loop.call_later(delay, self._watch)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _refuse(self, status: int, slug: str, title: str) -> None:
        """Answer, then read and drop what the peer still sends for a bounded time before closing:
        closing with unread bytes would reset the connection and lose the answer on the way."""
        self._in_head = False
        self._head_since = None
        self._stop_watchdog()
        self.connections.discard(self)
        self.logger.info("%s: refused %d %s", _peer(self.client), status, slug)
        self.transport.write(refusal(status, slug, title, self.server_state.default_headers))
        self.transport.set_protocol(_Lingering(self.transport, self.loop))


class _Lingering(asyncio.Protocol):
    """Drops whatever arrives after a refusal; closes at the peer's EOF or after `LINGER_S`."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = loop.call_later(LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.timer.cancel()
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "peer"


def http_protocol(settings: HttpEdgeSettings) -> type[asyncio.Protocol]:
    """A `BoundedHttpToolsProtocol` subclass with the limits of `settings`, for uvicorn's `http=`."""
    limits = {"max_head": settings.max_header_bytes, "head_timeout": settings.header_timeout_s}
    return type("ParleyHttpProtocol", (BoundedHttpToolsProtocol,), limits)


class EdgeMiddleware:
    """Browser origins by one allow-list: CORS on HTTP routes, a 403 on a WebSocket handshake; the
    default CSP on every HTTP answer that sets none.

    A request without `Origin` (a non-browser client) passes untouched. An allowed origin gets CORS
    answers (no credentials: tokens are bearer headers, never cookies); a foreign one gets none, and
    its preflight and WebSocket handshakes are refused.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(allowed_origins)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine: a WebSocket without `Origin` gets the app's own coroutine, so its whole life
        holds no frame of this middleware."""
        kind = scope["type"]
        if kind == "lifespan":
            return self.app(scope, receive, send)
        if kind == "http":
            send = _with_default_csp(send)
        for name, value in scope["headers"]:
            if name == b"origin":
                return self._with_origin(scope, receive, send, value)
        return self.app(scope, receive, send)

    async def _with_origin(self, scope: Scope, receive: Receive, send: Send, origin: bytes) -> None:
        allowed = origin.decode("latin-1").rstrip("/").lower() in self.allowed
        if scope["type"] == "websocket":
            if allowed:
                await self.app(scope, receive, send)
            else:
                await _refuse_handshake(send)
            return
        if scope["method"] == "OPTIONS" and any(n == _PREFLIGHT for n, _ in scope["headers"]):
            await _preflight(send, origin if allowed else None)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return
        cors = [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode()),
            (b"vary", b"Origin"),
        ]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _with_default_csp(send: Send) -> Send:
    """`send` adding `DEFAULT_CSP` to an answer's head unless the answer names its own policy, and
    counting the answer by status code (`parley_http_responses_total`)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            HTTP_RESPONSES.labels(str(message["status"])).inc()
            headers = message.get("headers", ())
            if not any(name == _CSP for name, _ in headers):
                message = {**message, "headers": [*headers, _DEFAULT_CSP_HEADER]}
        await send(message)

    return sending


_PREFLIGHT = b"access-control-request-method"
_ORIGIN_REFUSED = msgspec.json.encode(problem_body(403, "origin-not-allowed", "Origin not allowed"))
_ORIGIN_REFUSED_HEADERS = [
    (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
    (b"content-length", str(len(_ORIGIN_REFUSED)).encode()),
]


async def _preflight(send: Send, origin: bytes | None) -> None:
    if origin is None:
        await send({"type": "http.response.start", "status": 403, "headers": _ORIGIN_REFUSED_HEADERS})
        await send({"type": "http.response.body", "body": _ORIGIN_REFUSED})
        return
    headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", CORS_ALLOW_METHODS.encode()),
        (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
        (b"access-control-max-age", str(CORS_MAX_AGE_S).encode()),
        (b"vary", b"Origin"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _refuse_handshake(send: Send) -> None:
    """Closing before accepting is answered 403 by the server (a bare one: uvicorn logs a handshake
    answered with a body as an application error)."""
    await send({"type": "websocket.close", "code": 1008})


_QUERY_VALUE = re.compile(r"([?&][^=&\s\"'#]*=)[^&\s\"'#]*")
_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


def redact(text: str) -> str:
    """`text` without query values (names kept), JWT-shaped strings or bearer credentials."""
    if "=" in text:
        text = _QUERY_VALUE.sub(r"\1…", text)
    if "eyJ" in text:
        text = _JWT.sub("[jwt]", text)
    return _BEARER.sub(r"\1[redacted]", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record (message and traceback) through `redact` before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """The services' log format, every line redacted: the root handler filters what propagates to it,
    uvicorn's loggers filter their own records (also for handlers a host adds, such as pytest's)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction()


ACCESS_LOGGER = "parley.access"
"""The logger of per-connection lines a service writes itself (the fanout's WebSocket connections)."""


def install_redaction() -> None:
    redacting = RedactingFilter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    for name in ("uvicorn.error", "uvicorn.access", ACCESS_LOGGER):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(redacting)


def server_config(
    app: ASGIApp, settings: HttpEdgeSettings, host: str, port: int, **options: Any
) -> uvicorn.Config:
    """The uvicorn configuration of a Parley service: `app` behind `EdgeMiddleware`, bounded heads,
    security headers, no banner, logging left to `configure_logging`. `options` are uvicorn's
    (e.g. `ws=` for the fanout; HTTP-only services get no WebSocket upgrade)."""
    install_redaction()
    defaults: dict[str, Any] = {
        "loop": "uvloop", "ws": "none", "log_level": "info", "proxy_headers": False,
        "access_log": settings.access_log, "log_config": None, "server_header": False,
        "headers": list(SERVER_HEADERS), "http": http_protocol(settings), "interface": "asgi3",
    }  # fmt: skip
    defaults.update(options)
    return uvicorn.Config(EdgeMiddleware(app, settings.allowed_origins), host=host, port=port, **defaults)


def edge_sockets(settings: HttpEdgeSettings, host: str, port: int) -> list[socket.socket] | None:
    """With `reuse_port`, the service's socket bound (not yet listening: uvicorn listens once the app has
    started) with SO_REUSEPORT, so several processes of one service share host:port and the kernel spreads
    new connections over them (Linux lets only processes of the same user join a port); else None, and
    uvicorn binds as usual."""
    if not settings.reuse_port:
        return None
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(False)
    return [sock]
