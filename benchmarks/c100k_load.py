"""One load-generator process of `benchmarks.c100k`: holds many authenticated, subscribed connections.

Each connection is websockets' sans-I/O client protocol on a bare asyncio transport (no task, no
queue): a few KiB each, so one process holds tens of thousands. Pings are answered by the protocol.
Its source address is 127.<process>.x.y, so loopback ports do not run out. Every user keeps its cursor
and, per conversation, the first and last seq received (a seq not following the last is counted as a gap
or a duplicate); a connection lost after it was live is resumed from the cursor, retried as the client
library retries (`realtime_fanout.client.retry_delay`: full jitter, a refusal's Retry-After honoured).
Driven over stdin/stdout:
`python -m benchmarks.c100k_load PORT FIRST COUNT PROCESS_INDEX CONCURRENCY DEFLATE BUDGET_S USERS PER_USER MEMBERS`
(DEFLATE 1: offer permessage-deflate, as browsers do; no new connection after BUDGET_S); it prints one JSON
line when every connection is live or failed, then answers each command with a JSON line: `report`
(counts), `mark` (forget the resume times so far), `drop` (abort every connection, as a network drop
does), `check PATH` (compare what each user received with PATH's {conversation: [first, last]}) and
`stop` (close everything, no answer).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import msgspec
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI, parse_uri

from realtime_fanout.client import retry_after, retry_delay
from servicekit.auth_settings import AuthSettings
from servicekit.settings import Env
from servicekit.tokens import mint_token

CONNECT_TIMEOUT_S = 120.0
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 10.0
SLOW_CONSUMER = 4008


def conversations_of(user: int, users: int, per_user: int, members: int) -> list[str]:
    """User `user`'s conversations: for each of `per_user` rounds the users are cut into groups of
    `members` (each round shifted), one conversation per group, so every user is in `per_user` of them."""
    groups = math.ceil(users / members)
    return [f"c{j}-{((user + j * 7) % users) // members}" for j in range(per_user)] if groups else []


class Envelope(msgspec.Struct):
    conversation_id: str
    seq: int


class ServerFrame(msgspec.Struct):
    type: str
    cursor: str | None = None
    event: Envelope | None = None
    events: list[Envelope] | None = None


_frame = msgspec.json.Decoder(ServerFrame)


@dataclass
class Counts:
    live: int = 0
    failed: int = 0
    dropped: int = 0
    """Connections that were live and then closed before `stop`."""
    skipped: int = 0
    """Connections not attempted: the connect budget ran out first."""
    frames: int = 0
    events: int = 0
    gaps: int = 0
    """Events whose seq was more than one after the last one received in their conversation."""
    duplicates: int = 0
    """Events whose seq was at or before the last one received in their conversation."""
    resyncs: int = 0
    slow_consumer: int = 0
    """Connections the server closed 4008 (slow consumer)."""
    attempts: int = 0
    """Connection attempts after the first connect (resumes and their retries)."""
    live_now: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    """Why connections ended before live or with a close frame: close code, or the handshake's error."""
    resumed_at: list[float] = field(default_factory=list)
    """time.monotonic() (system-wide, comparable across processes) of each resume's `live` since `mark`."""


class User:
    """One user's subscription across connections: cursor, per-conversation seqs, backoff."""

    __slots__ = ("attempt", "cursor", "index", "live", "resuming", "retry_after", "seen", "transport")

    def __init__(self, index: int) -> None:
        self.index = index
        self.cursor: str | None = None
        self.seen: dict[str, list[int]] = {}
        self.transport: asyncio.Transport | None = None
        self.live = False
        self.resuming = False
        self.attempt = 0
        self.retry_after: float | None = None

    def received(self, conversation_id: str, seq: int, counts: Counts) -> None:
        counts.events += 1
        span = self.seen.get(conversation_id)
        if span is None:
            self.seen[conversation_id] = [seq, seq]
        elif seq == span[1] + 1:
            span[1] = seq
        elif seq <= span[1]:
            counts.duplicates += 1
        else:
            counts.gaps += 1
            span[1] = seq


class Client(asyncio.Protocol):
    """One connection of `user`: handshake, auth, subscribe (from its cursor); `live` resolves on the
    server's `live` frame."""

    __slots__ = ("counts", "live", "messages", "on_lost", "proto", "transport", "user", "was_live")

    def __init__(
        self,
        proto: ClientProtocol,
        user: User,
        messages: tuple[bytes, ...],
        counts: Counts,
        on_lost: Callable[[User], None],
    ) -> None:
        self.proto = proto
        self.user = user
        self.messages = messages
        self.counts = counts
        self.on_lost = on_lost
        self.live: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.was_live = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.user.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        user, counts = self.user, self.counts
        for event in self.proto.events_received():
            if isinstance(event, Response):
                if self.proto.state is State.OPEN:
                    for message in self.messages:
                        self.proto.send_text(message)
                else:
                    user.retry_after = retry_after(event.status_code, event.headers.get("Retry-After"))
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                counts.frames += 1
                frame = _frame.decode(event.data)
                if frame.event is not None:
                    user.received(frame.event.conversation_id, frame.event.seq, counts)
                elif frame.events is not None:
                    for envelope in frame.events:
                        user.received(envelope.conversation_id, envelope.seq, counts)
                elif frame.type == "resync":
                    counts.resyncs += 1
                if frame.cursor is not None:
                    user.cursor = frame.cursor
                if not self.was_live and frame.type == "live":
                    self.was_live = user.live = True
                    user.attempt = 0
                    counts.live_now += 1
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
        code = self.proto.close_rcvd.code if self.proto.close_rcvd is not None else 1006
        if not self.was_live or code != 1006:
            why = str(code) if self.proto.handshake_exc is None else type(self.proto.handshake_exc).__name__
            self.counts.closes[why] = self.counts.closes.get(why, 0) + 1
        if code == SLOW_CONSUMER:
            self.counts.slow_consumer += 1
        if self.user.transport is self.transport:
            self.user.transport = None
        if self.was_live:
            self.counts.dropped += 1
            self.counts.live_now -= 1
            self.user.live = False
        if not self.live.done():
            self.live.set_exception(ConnectionError(f"closed before live: {exc}"))
            self.live.exception()  # retrieved: a connect that gave up waiting no longer awaits it
        self.on_lost(self.user)


class Load:
    """The users of this process and the connections they hold."""

    def __init__(self, port: int, first: int, process: int, deflate: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.auth = AuthSettings.from_env(Env(dict(os.environ)))
        self.uri: WebSocketURI = parse_uri(f"ws://127.0.0.1:{port}/v1/stream")
        self.port = port
        self.first = first
        self.process = process
        self.extensions = [ClientPerMessageDeflateFactory()] if deflate else None
        self.counts = Counts()
        self.resuming = False
        self.rng = random.Random(process)

    def source(self, n: int) -> str:
        return f"127.{self.process % 254 + 1}.{(n // 250) % 256}.{n % 250 + 1}"

    async def connect(self, user: User) -> Client:
        """One connection of `user` until live; raises OSError, TimeoutError or ConnectionError."""
        token = mint_token(self.auth, f"u{self.first + user.index}", ttl_s=7200)
        subscribe = (
            {"type": "subscribe"} if user.cursor is None else {"type": "subscribe", "cursor": user.cursor}
        )
        messages = (msgspec.json.encode({"type": "auth", "token": token}), msgspec.json.encode(subscribe))
        _, client = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: Client(
                    ClientProtocol(self.uri, max_size=None, extensions=self.extensions), user, messages,
                    self.counts, self._lost,
                ),
                "127.0.0.1", self.port, local_addr=(self.source(user.index), 0),
            ),
            CONNECT_TIMEOUT_S,
        )  # fmt: skip
        try:
            await asyncio.wait_for(asyncio.shield(client.live), CONNECT_TIMEOUT_S)
        except TimeoutError:
            if client.transport is not None:
                client.transport.abort()  # else it may go live beside the retry
            raise
        return client

    def _lost(self, user: User) -> None:
        if self.resuming and not user.resuming and not user.live:
            self.loop.create_task(self.resume(user))

    async def resume(self, user: User) -> None:
        """Reconnect `user` from its cursor, retrying as the client library does until live."""
        user.resuming = True
        while self.resuming and not user.live:
            delay = retry_delay(user.attempt, BACKOFF_INITIAL_S, BACKOFF_MAX_S, self.rng, user.retry_after)
            user.attempt += 1
            user.retry_after = None
            await asyncio.sleep(delay)
            self.counts.attempts += 1
            try:
                await self.connect(user)
            except (OSError, TimeoutError, ConnectionError):
                continue  # its connection_lost saw `resuming`: the retry is this loop's
            self.counts.resumed_at.append(time.monotonic())
        user.resuming = False

    def check(
        self, expected: dict[str, list[int]], users: list[User], shape: tuple[int, int, int]
    ) -> dict[str, int]:
        """Users whose received spans differ from the log's (missing, short, or foreign conversations)."""
        wrong = missing = foreign = checked = 0
        for user in users:
            if user.cursor is None:
                continue  # never live
            checked += 1
            mine = conversations_of(self.first + user.index, *shape)
            want = {c: expected[c] for c in mine if c in expected}
            foreign += sum(1 for c in user.seen if c not in want)
            missing += sum(1 for c in want if c not in user.seen)
            wrong += any(user.seen.get(c) != span for c, span in want.items())
        return {"checked": checked, "wrong": wrong, "missing": missing, "foreign": foreign}


def answer(payload: Mapping[str, object]) -> None:
    print(json.dumps(payload), flush=True)


async def run(
    port: int, first: int, count: int, process: int, concurrency: int, deflate: int, budget_s: int,
    users_total: int, per_user: int, members: int,
) -> None:  # fmt: skip
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    load = Load(port, first, process, deflate)
    counts = load.counts
    users = [User(n) for n in range(count)]
    gate = asyncio.Semaphore(concurrency)
    stop_at = load.loop.time() + budget_s

    async def open_one(user: User) -> None:
        async with gate:
            if load.loop.time() > stop_at:
                counts.skipped += 1
                return
            try:
                await load.connect(user)
                counts.live += 1
            except (OSError, TimeoutError, ConnectionError):
                counts.failed += 1

    await asyncio.gather(*(open_one(u) for u in users))
    load.resuming = True
    for user in users:  # connections lost while the others connected resume too
        if user.cursor is not None and not user.live:
            load.loop.create_task(load.resume(user))
    answer(asdict(counts))
    reader = asyncio.StreamReader()
    await load.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while command := (await reader.readline()).strip():
        verb, _, arg = command.decode().partition(" ")
        if verb == "stop":
            break
        if verb == "mark":
            counts.resumed_at = []
        elif verb == "drop":
            for user in users:
                if user.transport is not None:
                    user.transport.abort()
        elif verb == "check":
            with open(arg) as f:
                answer(load.check(json.load(f), users, (users_total, per_user, members)))
            continue
        answer(asdict(counts))
    load.resuming = False
    for user in users:
        if user.transport is not None:
            user.transport.abort()


if __name__ == "__main__":
    asyncio.run(run(*(int(a) for a in sys.argv[1:11])))
