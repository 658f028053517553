"""The ephemeral-signal edge of one process: one pub/sub subscription, presence heartbeats and sweeps,
typing expiry; signals are routed in memory through the hub's membership index to local connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from events.redisclient import REDIS_ERRORS, RedisClient, refresh_topology
from realtime_fanout.frames import PresenceFrame, PresenceSnapshotFrame, Typing, TypingFrame, encode_frame
from realtime_fanout.hub import Hub, abort_failed
from realtime_fanout.metrics import SIGNAL_ERRORS, SIGNALS_DELIVERED, TYPING_DROPPED
from realtime_fanout.presence import PresenceEntry, PresenceStore
from realtime_fanout.routing import Abortable
from realtime_fanout.signals import (
    PresenceScope,
    PresenceSignal,
    RateLimiter,
    TypingSignal,
    TypingState,
    TypingTracker,
    decode_signal,
    encode_signal,
    presence_recipients,
    presence_visible,
    typing_recipients,
)
from servicekit.supervisor import Policy, honour_cancellation

log = logging.getLogger(__name__)

TOUCH_CHUNK = 200
SNAPSHOT_CHUNK = 1000  # users per presence read (two HMGETs)
SWEEP_LIMIT = 100
SWEEP_ROUNDS = 10
POLL_S = 1.0


@dataclass(slots=True)
class _Leaves:
    """Presence records to forget in one go, and the future their callers await."""

    pairs: list[tuple[str, str]]
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Joins:
    """Connections whose presence is recorded and whose snapshots are read in one go; their callers await
    `done`."""

    conns: list[SignalTarget]
    done: asyncio.Future[None]


@contextlib.contextmanager
def _settling(done: asyncio.Future[None]) -> Iterator[None]:
    """Ends a batch's `done`: every caller awaiting it returns, or re-raises the batch's bug or
    cancellation (retrieved: no warning when nobody is left)."""
    try:
        yield
    except BaseException as exc:
        done.set_exception(exc)
        done.exception()
        raise
    if not done.done():
        done.set_result(None)


class SignalTarget(Abortable, Protocol):
    """What the bus needs of a connection: identity, filter, a non-blocking `signal`, and `abort`."""

    @property
    def conversations(self) -> frozenset[str] | None: ...

    def signal(self, frame: bytes, *, presence: bool) -> None:
        """Queue one ephemeral frame; must not block (presence frames wait for the snapshot)."""

    def presence_ready(self, snapshot: bytes | None) -> None:
        """Queue the snapshot (if any), then release the presence frames held until now."""


class SignalBus:
    """Typing and presence for the local connections; `start` subscribes once, `stop` ends every task.

    Its tasks run under the hub's supervisor, restarted with backoff after a crash (signals are ephemeral:
    one lost is only late news); a connection whose delivery raises is closed 1011, nobody else.
    """

    def __init__(
        self,
        redis: RedisClient,
        hub: Hub,
        *,
        typing_ttl_s: float,
        typing_per_s: float,
        presence_ttl_s: float,
        presence_scope: PresenceScope,
        leave_grace_s: float = 0.0,
    ) -> None:
        self.redis = redis
        self.hub = hub
        self.store = PresenceStore(redis, hub.layout.namespace, presence_ttl_s)
        self.presence_ttl_s = presence_ttl_s
        self.presence_scope = presence_scope
        self.leave_grace_s = leave_grace_s
        self.limiter = RateLimiter(typing_per_s)
        self.tracker = TypingTracker(typing_ttl_s)
        self._conns: dict[str, dict[SignalTarget, str]] = {}
        self._typing_wake = asyncio.Event()
        self._touching = asyncio.Lock()  # a heartbeat must not re-add a record that `leave` removed
        self._leaves: _Leaves | None = None
        self._joins: _Joins | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._joining = asyncio.Lock()  # one join batch at a time: the joins meanwhile form the next
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        spawn = self.hub.supervisor.spawn
        self._tasks = [
            spawn("fanout-signals", self._listen, Policy.RESTART),
            spawn("fanout-presence", self._heartbeat, Policy.RESTART, context=self._where),
            spawn("fanout-typing-expiry", self._expire, Policy.RESTART),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _where(self) -> str:
        return f"{sum(map(len, self._conns.values()))} connections"

    async def join(self, conn: SignalTarget) -> None:
        """Register `conn`, record its presence, then queue its presence snapshot (Redis failures: none).
        The joins that arrive while a batch is in Redis form the next one: a reconnect storm's joins cost
        a few script calls and reads, not three each."""
        self._conns.setdefault(conn.user_id, {})[conn] = uuid.uuid4().hex
        batch = self._joins
        if batch is None:
            batch = self._joins = _Joins([], asyncio.get_running_loop().create_future())
            self._run_batch(self._join(batch), "fanout-presence-join")
        batch.conns.append(conn)
        await asyncio.shield(batch.done)

    def _run_batch(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._batches.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._batches.discard)

    async def _join(self, batch: _Joins) -> None:
        snapshots: dict[SignalTarget, bytes] = {}
        with _settling(batch.done):
            try:
                async with self._joining:
                    self._joins = None
                    snapshots = await self._record_joins(batch.conns)
            except REDIS_ERRORS as exc:
                SIGNAL_ERRORS.labels("join").inc()
                log.warning("presence join of %d connections failed: %s", len(batch.conns), exc)
            finally:
                if self._joins is batch:
                    self._joins = None
                for conn in batch.conns:
                    try:
                        conn.presence_ready(snapshots.get(conn))
                    except Exception:  # one connection's bug closes that connection, nobody else's
                        abort_failed(conn, "its presence snapshot")

    async def _record_joins(self, conns: list[SignalTarget]) -> dict[SignalTarget, bytes]:
        """Touch every joining connection, then read the presence each may see in one snapshot."""
        registered = ((self._conns.get(conn.user_id, {}).get(conn), conn.user_id) for conn in conns)
        pairs = [(conn_id, user) for conn_id, user in registered if conn_id is not None]
        for start in range(0, len(pairs), TOUCH_CHUNK):
            await self.store.touch(pairs[start : start + TOUCH_CHUNK])
        visible = {conn: sorted(presence_visible(self.hub.index, conn.user_id, self.presence_scope))
                   for conn in conns}  # fmt: skip
        users = sorted({user for seen in visible.values() for user in seen})
        entries: dict[str, PresenceEntry] = {}
        for start in range(0, len(users), SNAPSHOT_CHUNK):
            for entry in await self.store.snapshot(users[start : start + SNAPSHOT_CHUNK]):
                entries[entry.user_id] = entry
        return {
            conn: encode_frame(PresenceSnapshotFrame([entries[user] for user in seen]))
            for conn, seen in visible.items()
        }

    async def leave(self, conn: SignalTarget) -> None:
        """Unregister `conn` and forget its presence record (if Redis fails, the record expires)."""
        conns = self._conns.get(conn.user_id, {})
        conn_id = conns.pop(conn, None)
        if not conns:
            self._conns.pop(conn.user_id, None)
        if conn_id is None:
            return
        batch = self._leaves
        if batch is None:
            batch = self._leaves = _Leaves([], asyncio.get_running_loop().create_future())
            self._run_batch(self._leave(batch), "fanout-presence-leave")
        batch.pairs.append((conn_id, conn.user_id))
        await asyncio.shield(batch.done)

    async def _leave(self, batch: _Leaves) -> None:
        """Forget `batch`'s records, TOUCH_CHUNK per script call: the leaves that arrive while the lock is
        awaited join it (a storm's disconnects cost a few calls, not one each)."""
        with _settling(batch.done):
            try:
                async with self._touching:
                    self._leaves = None
                    for start in range(0, len(batch.pairs), TOUCH_CHUNK):
                        chunk = batch.pairs[start : start + TOUCH_CHUNK]
                        await self.store.leave_many(chunk, self.leave_grace_s)
            except REDIS_ERRORS as exc:
                SIGNAL_ERRORS.labels("leave").inc()
                log.warning(
                    "presence leave of %d connections failed (they will expire): %s", len(batch.pairs), exc
                )
            finally:
                if self._leaves is batch:
                    self._leaves = None

    async def typing(self, conn: SignalTarget, message: Typing) -> None:
        """Publish a participant's typing signal, rate-limited per user; others are dropped and counted."""
        user, cid = conn.user_id, message.conversation_id
        if user not in self.hub.index.members.get(cid, ()):
            TYPING_DROPPED.labels("not-participant").inc()
            return
        if not self.limiter.allow(user, time.monotonic()):
            TYPING_DROPPED.labels("rate").inc()
            return
        payload = encode_signal(TypingSignal(cid, user, message.state))
        try:
            await self.store.publish(payload)
        except REDIS_ERRORS as exc:
            SIGNAL_ERRORS.labels("publish").inc()
            log.warning("typing publish failed: %s", exc)

    def on_message(self, data: bytes) -> None:
        """Route one pub/sub payload to the local connections that may receive it."""
        signal = decode_signal(data)
        if isinstance(signal, TypingSignal):
            now = time.monotonic()
            cid, user = signal.conversation_id, signal.user_id
            if signal.state == "start":
                changed = self.tracker.start(cid, user, now)
                self._typing_wake.set()
            else:
                changed = self.tracker.stop(cid, user)
            if changed:
                self._deliver_typing(cid, user, signal.state)
        elif isinstance(signal, PresenceSignal):
            last_seen = None if signal.last_seen is None else signal.last_seen / 1000
            frame = encode_frame(PresenceFrame(signal.user_id, signal.online, last_seen))
            for target in presence_recipients(self.hub.index, signal.user_id, self.presence_scope):
                for conn in list(self._conns.get(target, {})):
                    self._signal(conn, frame, "presence")

    def _deliver_typing(self, cid: str, user: str, state: TypingState) -> None:
        frame = encode_frame(TypingFrame(cid, user, state))
        for target in typing_recipients(self.hub.index.members.get(cid, ()), user):
            for conn in list(self._conns.get(target, {})):
                if conn.conversations is None or cid in conn.conversations:
                    self._signal(conn, frame, "typing")

    @staticmethod
    def _signal(conn: SignalTarget, frame: bytes, kind: str) -> None:
        try:
            conn.signal(frame, presence=kind == "presence")
        except Exception:  # one connection's bug closes that connection, nobody else's
            abort_failed(conn, f"a {kind} signal")
            return
        SIGNALS_DELIVERED.labels(kind).inc()

    async def _sharded(self) -> bool:
        """Sharded pub/sub on a Redis 7 cluster: one master carries the channel, not every node. A 6.2
        cluster has no SPUBLISH: classic PUBLISH, which every node forwards to every other."""
        if not isinstance(self.redis, RedisCluster):
            return False
        info = await self.redis.info("server", target_nodes=RedisCluster.RANDOM)
        return int(str(info["redis_version"]).split(".")[0]) >= 7

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                self.store.sharded = await self._sharded()
                receive: Callable[..., Awaitable[dict[str, Any] | None]]
                if self.store.sharded and isinstance(pubsub, ClusterPubSub):
                    await pubsub.ssubscribe(self.store.channel)
                    receive = pubsub.get_sharded_message
                else:
                    await pubsub.subscribe(self.store.channel)
                    receive = pubsub.get_message
                self.subscribed.set()
                backoff = 0.1
                while True:
                    honour_cancellation()
                    message = await receive(ignore_subscribe_messages=True, timeout=POLL_S)
                    if message is not None and message.get("type") in ("message", "smessage"):
                        self.on_message(message["data"])
            except REDIS_ERRORS as exc:
                SIGNAL_ERRORS.labels("subscribe").inc()
                log.warning("signal subscription failed (%s); retrying in %.1fs", exc, backoff)
                if isinstance(self.redis, RedisCluster):
                    await refresh_topology(self.redis)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]

    async def _heartbeat(self) -> None:
        while True:
            honour_cancellation()
            await asyncio.sleep(self.presence_ttl_s / 3)
            try:
                async with self._touching:
                    pairs = [(cid, user) for user, conns in self._conns.items() for cid in conns.values()]
                    for start in range(0, len(pairs), TOUCH_CHUNK):
                        await self.store.touch(pairs[start : start + TOUCH_CHUNK])
                for _ in range(SWEEP_ROUNDS):
                    seen, _offline = await self.store.sweep(SWEEP_LIMIT)
                    if seen < SWEEP_LIMIT:
                        break
            except REDIS_ERRORS as exc:
                SIGNAL_ERRORS.labels("heartbeat").inc()
                log.warning("presence heartbeat failed: %s", exc)

    async def _expire(self) -> None:
        while True:
            honour_cancellation()
            deadline = self.tracker.next_deadline()
            wait_s = POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
            self._typing_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._typing_wake.wait(), min(wait_s, POLL_S))
            for cid, user in self.tracker.expire(time.monotonic()):
                self._deliver_typing(cid, user, "stop")
