"""One WebSocket connection: authenticate, subscribe, splice history and live, move frames; nothing else.

All decisions about what to send live in the sans-I/O `Session`; this layer only moves bytes, keeps
time (token expiry) and enforces the per-connection send budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable

import psycopg
import redis.exceptions
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from realtime_fanout import closecodes
from realtime_fanout.cursor import Cursor
from realtime_fanout.exceptions import CursorError, HubUnavailable, ProtocolViolation
from realtime_fanout.frames import (
    Auth,
    AuthenticatedFrame,
    ErrorFrame,
    ResyncFrame,
    Subscribe,
    Typing,
    decode_client_message,
    encode_frame,
)
from realtime_fanout.history import History
from realtime_fanout.hub import Hub
from realtime_fanout.item import Item
from realtime_fanout.metrics import CLOSES, CONNECTIONS, RESYNCS
from realtime_fanout.session import Session
from realtime_fanout.settings import FanoutSettings
from realtime_fanout.signalbus import SignalBus
from realtime_fanout.unread import UnreadSeed, UnreadTracker
from realtime_fanout.unreadseed import UnreadSeeder
from servicekit.auth import Principal, TokenVerifier
from servicekit.exceptions import AuthError

log = logging.getLogger(__name__)

SUBPROTOCOL_PREFIX = "bearer."


class Closing(Exception):
    """Internal: end the connection with `code` after sending an error frame."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail


class UserSlots:
    """How many authenticated connections each user holds in this process, at most `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def take(self, user_id: str) -> bool:
        """Take one of the user's slots; False (nothing taken) when all `limit` are held."""
        held = self._held.get(user_id, 0)
        if held >= self.limit:
            return False
        self._held[user_id] = held + 1
        return True

    def give_back(self, user_id: str) -> None:
        held = self._held.pop(user_id, 0) - 1
        if held > 0:
            self._held[user_id] = held


def _failure(tasks: Iterable[asyncio.Future[None]]) -> BaseException | None:
    """The error one of the finished `tasks` ended with, if any."""
    return next((exc for task in tasks if (exc := task.exception()) is not None), None)


class Connection:
    """The I/O shell around one Session; a hub Subscriber."""

    def __init__(
        self,
        ws: WebSocket,
        hub: Hub,
        history: History,
        verifier: TokenVerifier,
        settings: FanoutSettings,
        seeder: UnreadSeeder | None = None,
        bus: SignalBus | None = None,
        slots: UserSlots | None = None,
    ) -> None:
        self.ws = ws
        self.slots = slots
        self._slot_taken = False
        self.seeder = seeder
        self.bus = bus
        self.hub = hub
        self.history = history
        self.verifier = verifier
        self.settings = settings
        self.principal: Principal | None = None
        self.conversations: frozenset[str] | None = None
        self.session: Session | None = None
        self._control: list[bytes] = []
        self._wake = asyncio.Event()
        self._closing = False  # a plain flag: `_done` wakes the serving task
        self._close_code = closecodes.NORMAL
        self._close_reason = ""
        self._attached = False
        self._joined = False
        self._control_bytes = 0
        self._held: list[bytes] | None = []  # presence frames wait for the snapshot
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[None] | None = None
        self._expired = False

    @property
    def user_id(self) -> str:
        assert self.principal is not None
        return self.principal.user_id

    def offer(self, item: Item) -> None:
        """Called by the hub for each live item; never blocks, closes with 4008 on overflow."""
        session = self.session
        if session is None or self._closing:
            return
        session.feed_live(item)
        if session.pending_bytes > self.settings.max_buffer_bytes:
            self._close(closecodes.SLOW_CONSUMER, "slow-consumer")
        else:
            self._wake.set()

    def signal(self, frame: bytes, *, presence: bool) -> None:
        """Queue an ephemeral frame (typing, presence); never blocks, closes with 4008 on overflow."""
        if self._closing:
            return
        if presence and self._held is not None:
            self._held.append(frame)
            return
        self._queue_control(frame)

    def presence_ready(self, snapshot: bytes | None) -> None:
        """Queue the presence snapshot, then the presence frames that arrived while it was read."""
        held, self._held = self._held or [], None
        for frame in ([snapshot] if snapshot is not None else []) + held:
            self._queue_control(frame)

    def _queue_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._control_bytes += len(frame)
        pending = self._control_bytes + (self.session.pending_bytes if self.session is not None else 0)
        if pending > self.settings.max_buffer_bytes:
            self._close(closecodes.SLOW_CONSUMER, "slow-consumer")
        else:
            self._wake.set()

    def _close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._close_code, self._close_reason = code, reason
            self._closing = True
            if self._done is not None and not self._done.done():
                self._done.set_result(None)
            self._detach()

    def _detach(self) -> None:
        if self._attached:
            self._attached = False
            self.hub.detach(self)

    async def run(self) -> None:
        subprotocol, token = self._offered_token()
        await self.ws.accept(subprotocol=subprotocol)
        subscribed = False
        try:
            subscribe = await self._handshake(token)
            await self._subscribe(subscribe)
            subscribed = True
            CONNECTIONS.inc()
            if self.bus is not None and not self._closing:
                self._joined = True
                await self.bus.join(self)
            await self._serve()
        except Closing as closing:
            self._close_code, self._close_reason = closing.code, closing.reason
            with contextlib.suppress(Exception):
                await self._send(encode_frame(ErrorFrame(closing.reason, closing.detail)))
        except (WebSocketDisconnect, WebSocketDisconnected):  # the peer left, maybe seen by a send first
            self._close_code = -1
        except Exception:
            log.exception("connection of %s failed", self.principal and self.principal.user_id)
            self._close_code, self._close_reason = closecodes.INTERNAL_ERROR, "internal-error"
        finally:
            self._detach()
            if self._slot_taken and self.slots is not None:
                self.slots.give_back(self.user_id)
            if subscribed:
                CONNECTIONS.dec()
            if self._joined and self.bus is not None:
                await self.bus.leave(self)
        if self._close_code >= 0:
            CLOSES.labels(str(self._close_code)).inc()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.close_timeout_s):
                    await self.ws.close(self._close_code, self._close_reason)

    def _offered_token(self) -> tuple[str | None, str | None]:
        for proto in self.ws.scope.get("subprotocols", []):
            if proto.startswith(SUBPROTOCOL_PREFIX):
                return proto, proto[len(SUBPROTOCOL_PREFIX) :]
        return None, self.ws.query_params.get("token")

    async def _receive(self, wait_s: float | None) -> Auth | Subscribe | Typing:
        try:
            # Not wait_for: on 3.11 its task and the error of a peer gone are a reference cycle.
            async with asyncio.timeout(wait_s):
                text = await self.ws.receive_text()
        except TimeoutError:
            raise Closing(closecodes.UNAUTHORIZED, "auth-timeout", "authenticate first") from None
        except KeyError:  # a binary frame
            raise Closing(closecodes.PROTOCOL_ERROR, "protocol-error", "send text frames") from None
        try:
            return decode_client_message(text, self.settings.max_message_bytes)
        except ProtocolViolation as exc:
            raise Closing(closecodes.PROTOCOL_ERROR, "protocol-error", str(exc)) from None

    def _authenticate(self, token: str) -> None:
        try:
            principal = self.verifier.verify(token)
        except AuthError as exc:
            raise Closing(closecodes.UNAUTHORIZED, exc.reason, exc.detail) from None
        if self.principal is not None and principal.user_id != self.principal.user_id:
            raise Closing(closecodes.FORBIDDEN, "user-mismatch", "a refresh token must name the same user")
        if self.slots is not None and not self._slot_taken:
            if not self.slots.take(principal.user_id):
                detail = f"at most {self.slots.limit} connections per user"
                raise Closing(closecodes.TOO_MANY_CONNECTIONS, "too-many-connections", detail)
            self._slot_taken = True
        # Only the subject and the expiry are used from here on; the claims would be kept per connection.
        self.principal = dataclasses.replace(principal, claims={})
        self._control.append(encode_frame(AuthenticatedFrame(principal.user_id, principal.expires_at)))
        if self._expiry_timer is not None:  # serving: a refreshed token moves the deadline
            self._arm_expiry()
        self._wake.set()

    async def _handshake(self, token: str | None) -> Subscribe:
        timeout = self.settings.auth_timeout_s
        if token is not None:
            self._authenticate(token)
            await self._flush()
        while True:
            message = await self._receive(timeout)
            if isinstance(message, Auth):
                self._authenticate(message.token)
                await self._flush()  # a client may wait for `authenticated` before it subscribes
            elif self.principal is None:
                raise Closing(closecodes.UNAUTHORIZED, "missing-token", "the first message must be auth")
            elif isinstance(message, Typing):
                raise Closing(closecodes.PROTOCOL_ERROR, "protocol-error", "subscribe before typing")
            else:
                return message

    async def _subscribe(self, message: Subscribe) -> None:
        """Splice history and live; a log store that fails meanwhile (Redis, or the archive) closes 4503."""
        try:
            await self._splice(message)
        except (redis.exceptions.RedisError, psycopg.OperationalError) as exc:
            log.warning("subscribe of %s closed %d: the log is unavailable: %s",
                        self.user_id, closecodes.UNAVAILABLE, exc)  # fmt: skip
            detail = "the log is not readable right now"
            raise Closing(closecodes.UNAVAILABLE, "log-unavailable", detail) from None

    async def _splice(self, message: Subscribe) -> None:
        if self.hub.epoch is None:
            raise Closing(closecodes.UNAVAILABLE, "log-unavailable", "the log is not readable yet")
        partitions = self.hub.layout.partitions
        cursor: Cursor | None = None
        resync: str | None = None
        if message.cursor is not None:
            try:
                cursor = Cursor.decode(message.cursor, epoch=self.hub.epoch, partitions=partitions)
                for partition, position in enumerate(cursor.positions):
                    await self.history.check_held(self.hub.epoch, partition, position)
            except CursorError as exc:
                cursor, resync = None, exc.reason
        self.conversations = None if message.conversations is None else frozenset(message.conversations)
        try:
            positions, seed = self.hub.attach(self)
        except HubUnavailable as exc:
            raise Closing(closecodes.UNAVAILABLE, "log-unavailable", str(exc)) from None
        self._attached = True
        start = Cursor(self.hub.epoch, positions)
        session = Session(
            self.user_id, cursor or start, conversations=self.conversations, seed=seed,
            max_batch=self.settings.max_batch,
        )  # fmt: skip
        self.session = session  # from here live items are buffered in it, until replay_done
        unread = UnreadSeed.none(partitions)
        if self.seeder is not None:
            unread = await self.seeder.seed(self.user_id, start.epoch, positions)
        session.unread = UnreadTracker(self.user_id, unread)
        if resync is not None:
            RESYNCS.labels(resync).inc()
            self._control.append(encode_frame(ResyncFrame(start.encode(), resync)))
        for partition, after in session.replay_plan(positions).items():
            async for page in self.history.pages(start.epoch, partition, after, positions[partition]):
                session.feed_replay(page)
                await self._flush()
                if self._closing:
                    return
        session.replay_done()
        await self._flush()

    async def _send(self, frame: bytes) -> None:
        await self.ws.send_text(frame.decode())

    async def _flush(self) -> None:
        control, self._control = self._control, []
        self._control_bytes = 0
        for frame in control:
            await self._send(frame)
        if self.session is not None:
            for frame in self.session.frames():
                await self._send(frame)

    async def _serve(self) -> None:
        """A writer task and a reader task, ended by either or by `_close`; token expiry is a timer.

        Two tasks and a future per connection rather than four tasks: an idle connection's memory is
        mostly its tasks and the framework's objects.
        """
        self._done = asyncio.get_running_loop().create_future()
        if self._closing:
            return
        writer = asyncio.create_task(self._writer())
        reader = asyncio.create_task(self._reader())
        self._arm_expiry()
        try:
            done, _ = await asyncio.wait((writer, reader, self._done), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
            writer.cancel()
            reader.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
        failed = _failure(done - {self._done})
        del writer, reader, done  # a task's exception holds its traceback, which holds this frame
        if failed is not None:
            try:
                raise failed
            finally:
                del failed  # else the raised error's traceback holds this frame, which holds the error
        if self._expired:
            raise Closing(closecodes.UNAUTHORIZED, "token-expired", "send a fresh auth before expiry")

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    def _arm_expiry(self) -> None:
        """(Re)start the timer that ends the session when the current token expires."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        assert self.principal is not None
        self._expired = False
        delay = max(0.0, self.principal.expires_at - time.time())
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _reader(self) -> None:
        while True:
            message = await self._receive(None)
            if isinstance(message, Auth):
                self._authenticate(message.token)
            elif isinstance(message, Typing):
                if self.bus is not None:
                    await self.bus.typing(self, message)
            else:
                detail = "subscribe once per connection"
                raise Closing(closecodes.PROTOCOL_ERROR, "already-subscribed", detail)
