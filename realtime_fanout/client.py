"""The Python client of the fanout stream; `__all__` is its public surface (README: Client library).

    async with FanoutClient(url, get_token) as client:
        async for item in client:
            match item:
                case Event(): handle(item.event)   # then persist client.cursor when you like
                case Resync(): reload_state()      # history was lost: the stream continues from here
                case Live(): pass                  # caught up (after every (re)connect)

Connections that fail or close (1006, 1011, 1012, 4008, 4503, ...) are retried with exponential backoff and
full jitter (an admission refusal's Retry-After is honoured), resuming from the cursor after the last item
handed out; so nothing is lost or repeated.
Give it a `Recorder` and it notes what it subscribed from and received, for `python -m projector audit
--received` (README: Audit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from realtime_fanout import closecodes
from realtime_fanout.exceptions import ClientError, ClientGaveUp, ClientRejected

__all__ = [
    "ClientError",
    "ClientGaveUp",
    "ClientRejected",
    "Event",
    "FanoutClient",
    "Item",
    "Live",
    "Recorder",
    "Resync",
    "TokenProvider",
    "write_received",
]

log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str]]
"""An async function returning a current bearer token; called at each connect and before each expiry."""
FATAL_CODES = frozenset({closecodes.PROTOCOL_ERROR, closecodes.FORBIDDEN})


@dataclass(frozen=True, slots=True)
class Event:
    """One event the user may see, in log order per conversation, each exactly once per subscription.

    `event` is the envelope as the log holds it in the current schema (README: Events); `cursor` is the
    resume point just after it, set on the last event of each server frame (None on the others)."""

    event: dict[str, Any]
    cursor: str | None


@dataclass(frozen=True, slots=True)
class Resync:
    """The cursor could not be served (`reason`: `malformed-cursor`, `foreign-epoch`, `history-gone`):
    reload state (the query API), the stream continues after `position`, which is now `client.cursor`."""

    position: str
    reason: str


@dataclass(frozen=True, slots=True)
class Live:
    """History is done (sent after every subscribe); `cursor` is a valid resume point."""

    cursor: str


Item = Event | Resync | Live
"""What iterating a `FanoutClient` yields."""


def items_of(frame: dict[str, Any]) -> list[Item]:
    """The items one server frame carries, in order; control frames carry none."""
    kind = frame.get("type")
    if kind == "event":
        return [Event(frame["event"], frame["cursor"])]
    if kind == "events":
        last = len(frame["events"]) - 1
        return [Event(e, frame["cursor"] if i == last else None) for i, e in enumerate(frame["events"])]
    if kind == "live":
        return [Live(frame["cursor"])]
    if kind == "resync":
        return [Resync(frame["position"], frame["reason"])]
    return []


@dataclass(slots=True)
class Recorder:
    """What one subscriber received, for the audit: a line per (re)subscription with its cursor and per
    item received, in the order received. Lines accumulate in memory; `lines_jsonl` is the audit's
    `--received` format."""

    subscriber: str
    user: str
    lines: list[dict[str, Any]] = field(default_factory=list)

    def subscribed(self, cursor: str | None, conversations: list[str] | None) -> None:
        """Note a (re)subscription from `cursor` (the client calls this)."""
        self._add("subscribe", cursor=cursor, conversations=conversations)

    def received(self, item: Item) -> None:
        """Note one item handed out (the client calls this)."""
        if isinstance(item, Event):
            self._add("event", event=item.event, cursor=item.cursor)
        elif isinstance(item, Live):
            self._add("live", cursor=item.cursor)
        else:
            self._add("resync", position=item.position, reason=item.reason)

    def _add(self, kind: str, **fields: Any) -> None:
        self.lines.append({"subscriber": self.subscriber, "user": self.user, "kind": kind, **fields})

    def lines_jsonl(self) -> bytes:
        """The record as JSON lines, the audit's `--received` format."""
        return b"".join(msgspec.json.encode(line) + b"\n" for line in self.lines)


def write_received(path: Path, recorders: list[Recorder]) -> None:
    """Write several subscribers' records into one `--received` file."""
    path.write_bytes(b"".join(r.lines_jsonl() for r in recorders))


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max_s, initial_s * 2**attempt)] for the attempt-th retry (from 0)."""
    return rng.uniform(0.0, min(max_s, initial_s * 2.0 ** min(attempt, 60)))


def retry_delay(
    attempt: int, initial_s: float, max_s: float, rng: random.Random, retry_after_s: float | None = None
) -> float:
    """`backoff_delay`, but when the server answered with Retry-After, at least that (up to `max_s`),
    spread over up to half again so the refused do not all come back together."""
    delay = backoff_delay(attempt, initial_s, max_s, rng)
    if retry_after_s is None:
        return delay
    return max(delay, min(max_s, retry_after_s * rng.uniform(1.0, 1.5)))


def retry_after(status: int, value: str | None) -> float | None:
    """Seconds a 503 or 429 answer's Retry-After asks for (delay-seconds form; None otherwise)."""
    if status not in (429, 503) or value is None or not value.strip().isdigit():
        return None
    return float(value)


def refresh_delay(expires_at: float, now: float, margin_s: float) -> float:
    """Seconds until a fresh token is due: `margin_s` before expiry, but not before half the time left."""
    remaining = expires_at - now
    return max(0.0, remaining - margin_s, remaining / 2)


class FanoutClient:
    """One logical subscription over successive WebSocket connections; iterate it for `Item`s.

    Guaranteed: across reconnects every event the user may see after the starting cursor comes once, in
    order per conversation, unless a `Resync` says history was lost. `cursor` is where it resumes: just
    after the last item handed out that carried a cursor (every `Live` and `Resync`, the last `Event` of
    each server frame); persist it after such an item and a later `cursor=` repeats nothing.
    Connections that fail or close are retried with exponential backoff and full jitter (never sooner than
    a refusal's Retry-After, up to `backoff_max_s`), except a close that retrying cannot fix
    (`ClientRejected`). `token` is a fixed string or a `TokenProvider`, asked again at each connect and
    `refresh_margin_s` before expiry (at half the remaining lifetime for short tokens). `conversations`
    limits the subscription to those ids (None: all the user's). `max_failures` consecutive failed
    attempts without a frame end it with `ClientGaveUp` (None: retry for ever). `connects` and
    `refreshes` count connections made and tokens refreshed.
    """

    def __init__(
        self,
        url: str,
        token: str | TokenProvider,
        *,
        cursor: str | None = None,
        conversations: list[str] | None = None,
        refresh_margin_s: float = 60.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        max_failures: int | None = None,
        open_timeout_s: float = 10.0,
        rng: random.Random | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.url = url
        self.recorder = recorder
        self.cursor = cursor
        self.conversations = conversations
        self.refresh_margin_s = refresh_margin_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_failures = max_failures
        self.open_timeout_s = open_timeout_s
        self.connects = 0
        self.refreshes = 0
        self._token = token
        self._rng = rng or random.Random()
        self._ws: ClientConnection | None = None
        self._closed = False

    async def __aenter__(self) -> FanoutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self.items()

    async def close(self) -> None:
        """Stop for good, whatever the client is doing (also mid-reconnect): the iteration ends after the
        current connection is closed (1000)."""
        self._closed = True
        if self._ws is not None:
            await self._ws.close()

    def drop(self) -> None:
        """Abort the current connection as a network failure would; the client reconnects and resumes."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _fresh_token(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def items(self) -> AsyncIterator[Item]:
        """Every item of the subscription, across reconnects (what `async for item in client` iterates).

        Raises:
            ClientRejected: the server closed with 4400/4403 (or 4401 while the token is a fixed string).
            ClientGaveUp: `max_failures` consecutive attempts failed without a single frame.
        """
        failures = 0
        while not self._closed:
            asked: float | None = None
            try:
                async for item in self._connection():
                    failures = 0
                    if isinstance(item, Resync):
                        self.cursor = item.position
                    elif item.cursor is not None:
                        self.cursor = item.cursor
                    if self.recorder is not None:
                        self.recorder.received(item)
                    yield item
            except ConnectionClosed as closed:
                self._raise_if_fatal(closed)
                log.info("fanout connection closed (%s); resuming", closed)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                if isinstance(exc, InvalidStatus):
                    response = exc.response
                    asked = retry_after(response.status_code, response.headers.get("Retry-After"))
                log.info("fanout connection failed (%s); retrying", exc)
            if self._closed:
                return
            if self.max_failures is not None and failures >= self.max_failures:
                raise ClientGaveUp(f"{failures} consecutive connection attempts failed")
            await asyncio.sleep(
                retry_delay(failures, self.backoff_initial_s, self.backoff_max_s, self._rng, asked)
            )
            failures += 1

    def _raise_if_fatal(self, closed: ConnectionClosed) -> None:
        if self._closed or closed.rcvd is None:
            return
        code = closed.rcvd.code
        if code in FATAL_CODES or (code == closecodes.UNAUTHORIZED and isinstance(self._token, str)):
            raise ClientRejected(code, closed.rcvd.reason)

    async def _connection(self) -> AsyncIterator[Item]:
        token = await self._fresh_token()
        async with connect(self.url, open_timeout=self.open_timeout_s, close_timeout=2) as ws:
            if self._closed:  # `close` came while this connection was opening: it had no socket to close
                return
            self._ws = ws
            refresher: asyncio.Task[None] | None = None
            try:
                subscribe = {"type": "subscribe", "cursor": self.cursor, "conversations": self.conversations}
                await ws.send(msgspec.json.encode({"type": "auth", "token": token}).decode())
                await ws.send(msgspec.json.encode(subscribe).decode())
                if self.recorder is not None:
                    self.recorder.subscribed(self.cursor, self.conversations)
                self.connects += 1
                async for data in ws:
                    frame: dict[str, Any] = msgspec.json.decode(data)
                    if frame.get("type") == "authenticated":
                        if refresher is not None:
                            refresher.cancel()
                        refresher = asyncio.create_task(self._refresh(ws, float(frame["expires_at"])))
                    for item in items_of(frame):
                        yield item
            finally:
                self._ws = None
                if refresher is not None:
                    refresher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await refresher

    async def _refresh(self, ws: ClientConnection, expires_at: float) -> None:
        await asyncio.sleep(refresh_delay(expires_at, time.time(), self.refresh_margin_s))
        try:
            token = await self._fresh_token()
            await ws.send(msgspec.json.encode({"type": "auth", "token": token}).decode())
            self.refreshes += 1
        except (ConnectionClosed, OSError) as exc:
            log.info("token refresh not sent: %s", exc)
        except Exception:
            log.exception("the token provider failed; the server will close with 4401 at expiry")
