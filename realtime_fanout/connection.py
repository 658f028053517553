"""One WebSocket connection's I/O: move bytes and time into its `ConnectionProtocol`, frames out of it,
and do the I/O it asks for (splice history into the session, publish typing, join the signal bus).

Every decision (what to send, when and why to close) is the protocol's (protocol.py) and the session's
(session.py); this layer only awaits the socket, the log, the archive and the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

import psycopg
import redis.exceptions
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from realtime_fanout import closecodes
from realtime_fanout.cursor import Cursor
from realtime_fanout.exceptions import CursorError, HubUnavailable
from realtime_fanout.flag import Flag
from realtime_fanout.frames import Subscribe, Typing
from realtime_fanout.history import History
from realtime_fanout.hub import Hub
from realtime_fanout.item import Item
from realtime_fanout.metrics import CLOSES, CONNECTIONS, RESYNCS, UNREAD_RESEEDS
from realtime_fanout.overload import admitted
from realtime_fanout.protocol import ConnectionProtocol, Limits
from realtime_fanout.session import Session
from realtime_fanout.settings import FanoutSettings
from realtime_fanout.signalbus import SignalBus
from realtime_fanout.unread import UnreadSeed, UnreadTracker
from realtime_fanout.unreadseed import UnreadSeeder
from servicekit.auth import TokenVerifier
from servicekit.slots import UserSlots

log = logging.getLogger(__name__)

SUBPROTOCOL_PREFIX = "bearer."


def offered_token(subprotocols: Iterable[str], query_token: str | None) -> tuple[str | None, str | None]:
    """(the subprotocol to accept, the token) offered with the upgrade: a `bearer.` subprotocol, else the
    `token` query parameter."""
    for proto in subprotocols:
        if proto.startswith(SUBPROTOCOL_PREFIX):
            return proto, proto[len(SUBPROTOCOL_PREFIX) :]
    return None, query_token


class Socket(Protocol):
    """What a connection needs of its WebSocket (Starlette's, or the native edge's): the peer leaving is
    `WebSocketDisconnect`, a binary message `KeyError` (as Starlette's `receive_text`)."""

    async def accept(self, subprotocol: str | None = None) -> None: ...
    async def receive_text(self) -> str: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


def limits_of(settings: FanoutSettings) -> Limits:
    return Limits(settings.auth_timeout_s, settings.max_buffer_bytes, settings.max_message_bytes,
                  settings.max_batch)  # fmt: skip


def _failure(tasks: Iterable[asyncio.Future[None]]) -> BaseException | None:
    """The error one of the finished `tasks` ended with, if any."""
    return next((exc for task in tasks if (exc := task.exception()) is not None), None)


class Connection:
    """The I/O shell around one ConnectionProtocol; a hub Subscriber and a signal-bus target."""

    __slots__ = (
        "_attached", "_done", "_joined", "_peer_left", "_reseeding", "_subscribed", "_timer", "_timer_at",
        "_wake", "bus", "history", "hub", "protocol", "seeder", "settings", "ws",
    )  # fmt: skip

    def __init__(
        self,
        ws: WebSocket | Socket,
        hub: Hub,
        history: History,
        verifier: TokenVerifier,
        settings: FanoutSettings,
        seeder: UnreadSeeder | None = None,
        bus: SignalBus | None = None,
        slots: UserSlots | None = None,
    ) -> None:
        self.ws = ws
        self.seeder = seeder
        self.bus = bus
        self.hub = hub
        self.history = history
        self.settings = settings
        self.protocol = ConnectionProtocol(verifier, limits_of(settings), time.time(), slots)
        self._wake = Flag()
        self._done: asyncio.Future[None] | None = None
        self._attached = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._subscribed = self._joined = self._peer_left = False
        self._reseeding: asyncio.Task[None] | None = None

    @property
    def user_id(self) -> str:
        return self.protocol.user_id

    @property
    def conversations(self) -> frozenset[str] | None:
        return self.protocol.conversations

    @property
    def session(self) -> Session | None:
        return self.protocol.session

    def offer(self, item: Item) -> None:
        """Called by the hub for each live item; never blocks (an overflow closes 4008)."""
        if self.protocol.offer(item):
            self._wake.set()
        else:
            self._changed()

    def signal(self, frame: bytes, *, presence: bool) -> None:
        """Queue an ephemeral frame (typing, presence); never blocks (an overflow closes 4008)."""
        self.protocol.signal(frame, presence=presence)
        self._changed()

    def presence_ready(self, snapshot: bytes | None) -> None:
        self.protocol.presence_ready(snapshot)
        self._changed()

    def abort(self) -> None:
        """Close with 1011 at once: handling this connection (or the hub) failed."""
        self.protocol.abort()
        self._changed()

    def _changed(self) -> None:
        """After any input: end the serving loop if the protocol closes, else wake the writer."""
        if self.protocol.closing:
            if self._done is not None and not self._done.done():
                self._done.set_result(None)
            self._detach()
        else:
            self._wake.set()

    def _detach(self) -> None:
        if self._attached:
            self._attached = False
            self.hub.detach(self)

    async def run(self) -> None:
        """Establish the connection, serve it until it closes, then end it."""
        protocol = self.protocol
        subprotocol, token = self._offered_token()
        await self.ws.accept(subprotocol=subprotocol)
        try:
            if token is not None:
                protocol.offer_token(token)
            await self._flush()
            request = await self._handshake()
            if request is not None:
                await self._subscribe(request)
            self._admitted()
            if not protocol.closing:
                self._subscribed = True
                CONNECTIONS.inc()
                if self.bus is not None:
                    self._joined = True
                    await self.bus.join(self)
                if self._serve_by_callbacks():
                    return  # the edge drives it from here, and ends it
                await self._serve()
            with contextlib.suppress(Exception):
                await self._flush()  # the error frame, if the close has one
        except (WebSocketDisconnect, WebSocketDisconnected):  # the peer left, maybe seen by a send first
            self._peer_left = True
        except Exception:
            log.exception("connection of %s failed", protocol.principal and protocol.principal.user_id)
            protocol.abort()
        await self._end()

    def _admitted(self) -> None:
        assert isinstance(self.ws, WebSocket)
        admitted(self.ws.scope)

    def _serve_by_callbacks(self) -> bool:
        """Whether the connection is served by its edge's callbacks from now on (no task while idle)."""
        return False

    async def _end(self) -> None:
        """Give back what the connection held (hub, slot, presence), then close unless the peer left."""
        protocol = self.protocol
        self._cancel_timer()
        self._detach()
        protocol.finish()
        if self._subscribed:
            self._subscribed = False
            CONNECTIONS.dec()
        if self._joined and self.bus is not None:
            self._joined = False
            await self.bus.leave(self)
        close = protocol.close
        if not self._peer_left:
            self._peer_left = True  # closed once
            code, reason = (close.code, close.reason) if close is not None else (closecodes.NORMAL, "")
            CLOSES.labels(str(code)).inc()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.close_timeout_s):
                    await self.ws.close(code, reason)

    def _offered_token(self) -> tuple[str | None, str | None]:
        assert isinstance(self.ws, WebSocket)
        return offered_token(self.ws.scope.get("subprotocols", []), self.ws.query_params.get("token"))

    async def _receive(self, *, timed: bool) -> None:
        """Feed the protocol one client message, or (`timed`) the time if its deadline passes first."""
        deadline = self.protocol.deadline() if timed else None
        wait_s = None if deadline is None else max(0.0, deadline - time.time())
        try:
            if wait_s is None:  # nothing held per idle connection
                text = await self.ws.receive_text()
            else:  # not wait_for: on 3.11 its task and the error of a peer gone are a reference cycle
                async with asyncio.timeout(wait_s):
                    text = await self.ws.receive_text()
        except TimeoutError:
            self.protocol.tick(time.time())
        except KeyError:  # a binary frame
            self.protocol.receive_binary()
        else:
            self.protocol.receive_text(text, time.time())

    async def _handshake(self) -> Subscribe | None:
        """Read until the client subscribes (returned) or the protocol closes (None)."""
        while not self.protocol.closing:
            request = self.protocol.next_request()
            if isinstance(request, Subscribe):
                return request
            await self._receive(timed=True)
            if not self.protocol.closing and not self._message_waiting():
                await self._flush()  # a client may wait for `authenticated` before it subscribes
        return None

    def _message_waiting(self) -> bool:
        """Whether the client's next message already arrived (a subscribe pipelined after the auth: the
        `authenticated` frame then leaves with the splice's first write)."""
        return False

    async def _subscribe(self, message: Subscribe) -> None:
        """Splice history and live; a log store that fails meanwhile (Redis, or the archive) closes 4503."""
        try:
            await self._splice(message)
        except (redis.exceptions.RedisError, psycopg.OperationalError) as exc:
            log.warning("subscribe of %s closed %d: the log is unavailable: %s",
                        self.user_id, closecodes.UNAVAILABLE, exc)  # fmt: skip
            self.protocol.fail(closecodes.UNAVAILABLE, "log-unavailable", "the log is not readable right now")
            self._changed()

    async def _splice(self, message: Subscribe) -> None:
        protocol = self.protocol
        epoch = self.hub.epoch
        if epoch is None:
            protocol.fail(closecodes.UNAVAILABLE, "log-unavailable", "the log is not readable yet")
            return
        partitions = self.hub.layout.partitions
        cursor: Cursor | None = None
        resync: str | None = None
        if message.cursor is not None:
            try:
                cursor = Cursor.decode(message.cursor, epoch=epoch, partitions=partitions)
                for partition, position in enumerate(cursor.positions):
                    await self.history.check_held(epoch, partition, position)
            except CursorError as exc:
                cursor, resync = None, exc.reason
        try:
            positions, seed = self.hub.attach(self)
        except HubUnavailable as exc:
            protocol.fail(closecodes.UNAVAILABLE, "log-unavailable", str(exc))
            return
        self._attached = True
        start = Cursor(epoch, positions)
        # from here live items are buffered in the session
        session = protocol.attached(cursor or start, seed, self.hub.replayable)
        unread = UnreadSeed.none(partitions)
        if self.seeder is not None:
            unread = await self.seeder.seed(self.user_id, start.epoch, positions)
        session.unread = UnreadTracker(self.user_id, unread, window=self.settings.unread_window)
        if resync is not None:
            RESYNCS.labels(resync).inc()
            protocol.resync(start.encode(), resync)
        for partition, after in session.replay_plan(positions).items():
            async for page in self.history.pages(start.epoch, partition, after, positions[partition]):
                protocol.feed_replay(page)
                if protocol.pending_bytes >= self.settings.max_buffer_bytes // 4:
                    await self._flush()  # within the send budget; else one write for the whole splice
                if protocol.closing:
                    return
        protocol.replay_done()
        await self._flush()

    async def _flush(self) -> None:
        self._reseed_if_asked()
        for frame in self.protocol.data_to_send():
            await self.ws.send_text(frame.decode())

    def _reseed_if_asked(self) -> None:
        """When the unread tracker doubts a conversation's count (its bounded state cannot tell), read a
        fresh seed, one read at a time per connection. Asked at each flush: a doubting event is always
        followed by one (its own frame), and a callback from the tracker would be a reference cycle."""
        session = self.protocol.session
        if session is None or self._reseeding is not None or self.seeder is None:
            return
        if session.unread is not None and session.unread.asks:
            reseed = self._reseed(session, session.unread, self.seeder)
            self._reseeding = asyncio.get_running_loop().create_task(reseed)

    async def _reseed(self, session: Session, tracker: UnreadTracker, seeder: UnreadSeeder) -> None:
        try:
            while (asks := tracker.take_asks()) and not self.protocol.closing:
                live_from = [f"{k[0]}-{k[1]}" if k is not None else "0-0" for k in tracker.positions]
                try:
                    seed = await seeder.seed(self.user_id, session.cursor.epoch, live_from)
                except Exception:  # a bug: those counts stop, the connection goes on
                    log.exception("unread reseed of %s for %s failed", self.user_id, asks)
                    tracker.give_up(asks)
                    return
                for cid in asks:
                    session.notify(tracker.reseeded(cid, seed, session.memberships))
                    UNREAD_RESEEDS.labels("dropped" if cid in tracker.forgotten else "exact").inc()
                self._changed()
        finally:
            self._reseeding = None

    async def _serve(self) -> None:
        """A writer task and a reader task, ended by either or by a close; the protocol's deadline (token
        expiry) is a timer.

        Two tasks and a future per connection rather than four tasks: an idle connection's memory is
        mostly its tasks and the framework's objects.
        """
        self._done = asyncio.get_running_loop().create_future()
        if self.protocol.closing:
            return
        writer = asyncio.create_task(self._writer())
        reader = asyncio.create_task(self._reader())
        writer.add_done_callback(self._ended)
        reader.add_done_callback(self._ended)
        self._arm_timer()
        try:
            await self._done  # not asyncio.wait: its waiter, set and callbacks are 1 KiB per idle connection
            done = [task for task in (writer, reader) if task.done()]
        finally:
            self._cancel_timer()
            writer.cancel()
            reader.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
        failed = _failure(done)
        del writer, reader, done  # a task's exception holds its traceback, which holds this frame
        if failed is not None:
            try:
                raise failed
            finally:
                del failed  # else the raised error's traceback holds this frame, which holds the error

    def _ended(self, _task: asyncio.Task[None]) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _reader(self) -> None:
        protocol = self.protocol
        while True:
            await self._receive(timed=False)  # the timer feeds the protocol the time while serving
            while (request := protocol.next_request()) is not None:
                if isinstance(request, Typing) and self.bus is not None:
                    await self.bus.typing(self, request)
            self._arm_timer()  # a refreshed token moves the deadline
            self._changed()

    def _arm_timer(self) -> None:
        """(Re)start the timer that feeds the protocol the time at its deadline (token expiry)."""
        deadline = self.protocol.deadline()
        if deadline == self._timer_at:
            return
        self._cancel_timer()
        if deadline is not None:
            delay = max(0.0, deadline - time.time())
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        self.protocol.tick(time.time())
        if not self.protocol.closing:
            self._arm_timer()  # woken early (a clock step): wait again
        self._changed()


class Edge(Socket, Protocol):
    """The native edge's side of a connection served by callbacks (realtime_fanout/edge.py)."""

    def offered(self) -> tuple[str | None, str | None]: ...
    def admitted(self) -> None: ...
    def go_live(self, connection: CallbackConnection) -> None: ...
    def want_flush(self, connection: CallbackConnection) -> None: ...
    def write_texts(self, frames: list[bytes]) -> None: ...
    def writable_now(self) -> bool: ...
    def message_waiting(self) -> bool: ...
    def timer_horizon_s(self) -> float: ...
    async def writable(self) -> None: ...
    def spawn(self, work: Coroutine[Any, Any, None]) -> None: ...
    def pause_reading_until(self, work: Coroutine[Any, Any, None]) -> None: ...


class CallbackConnection(Connection):
    """A connection that, once live, holds no task: the edge feeds it client messages and the peer's
    leaving, a process-wide flusher writes its frames, its token expiry is a timer."""

    __slots__ = ("_live", "edge", "flush_pending")

    def __init__(self, edge: Edge, *args: Any, **kwargs: Any) -> None:
        super().__init__(edge, *args, **kwargs)
        self.edge = edge
        self._live = False
        self.flush_pending = False

    def offer(self, item: Item) -> None:
        if not self.protocol.offer(item):
            self._changed()
        elif self._live:
            self.edge.want_flush(self)

    @property
    def live(self) -> bool:
        return self._live

    def _offered_token(self) -> tuple[str | None, str | None]:
        return self.edge.offered()

    def _admitted(self) -> None:
        self.edge.admitted()

    def _message_waiting(self) -> bool:
        return self.edge.message_waiting()

    def _serve_by_callbacks(self) -> bool:
        self._live = True
        self._arm_timer()
        self.edge.go_live(self)  # messages that arrived while subscribing are fed now
        self._changed()
        return True

    async def _flush(self) -> None:
        await self.edge.writable()
        self.flush_now()

    def _arm_timer(self) -> None:
        """A deadline beyond the edge's keepalive horizon holds no timer: the keepalive wheel, which visits
        every connection once per ping interval, arms it once it is near (`arm_timer_if_near`)."""
        deadline = self.protocol.deadline()
        if deadline is not None and deadline - time.time() > self.edge.timer_horizon_s():
            self._cancel_timer()
            return
        super()._arm_timer()

    def arm_timer_if_near(self) -> None:
        if self._live and self._timer is None:
            self._arm_timer()

    def flush_now(self) -> None:
        """Write every frame the protocol has (the edge calls it when the transport is writable)."""
        self._reseed_if_asked()
        frames = self.protocol.data_to_send()
        if frames:
            self.edge.write_texts(frames)

    def _changed(self) -> None:
        if not self._live:
            super()._changed()
        elif self.protocol.closing:
            self._detach()
            self._live = False
            self.edge.spawn(self._close_live())
        else:
            self.edge.want_flush(self)

    async def _close_live(self) -> None:
        with contextlib.suppress(Exception):
            self.flush_now()  # the error frame, if the close has one
        await self._end()

    def receive_live(self, text: str | None) -> None:
        """A client message (None: a binary one) while live."""
        if not self._live:
            return
        protocol = self.protocol
        if text is None:
            protocol.receive_binary()
        else:
            protocol.receive_text(text, time.time())
        while (request := protocol.next_request()) is not None:
            if isinstance(request, Typing) and self.bus is not None:
                # the client is not read meanwhile, as a reading task awaiting it would not read
                self.edge.pause_reading_until(self.bus.typing(self, request))
        self._arm_timer()  # a refreshed token moves the deadline
        self._changed()

    def peer_gone(self) -> None:
        """The peer closed, or the connection was lost or shut down: end without a close of our own."""
        self._peer_left = True
        if self._live:
            self._live = False
            self.edge.spawn(self._end())
