"""Supervision in the real fanout (in process, real Redis, real WebSocket clients): a bug in one
connection's handling closes that connection with 1011 and nobody else's; a bug in the hub stops it loudly
(CRITICAL log line, /readyz 503, every connection closed 1011 so it resumes elsewhere)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from command_api.append import Appender
from events.schema import ConversationCreated, MessageSent
from realtime_fanout.hub import Hub
from realtime_fanout.item import Item
from realtime_fanout.membership import Span
from realtime_fanout.metrics import CONNECTION_FAILURES
from realtime_fanout.routing import Router
from realtime_fanout.session import Session
from realtime_fanout.signalbus import SignalBus
from realtime_fanout.signals import TypingSignal, encode_signal
from servicekit.log_settings import LogSettings
from tests.fanout_fixtures import Client, Log, close_code, fanout_env, token
from tests.fanout_inprocess import served_fanout
from tests.test_fanout_session import FakeLog


@dataclass(eq=False)
class Recorder:
    """A hub subscriber and signal target that records what it got; `broken` raises on every delivery."""

    user_id: str
    broken: bool = False
    conversations: frozenset[str] | None = None
    got: list[Item | bytes] = field(default_factory=list)
    aborted: int = 0

    def offer(self, item: Item) -> None:
        if self.broken:
            raise RuntimeError(f"a bug in {self.user_id}'s handling")
        self.got.append(item)

    def signal(self, frame: bytes, *, presence: bool) -> None:
        self.offer(frame)  # type: ignore[arg-type]

    def presence_ready(self, snapshot: bytes | None) -> None: ...

    def abort(self) -> None:
        self.aborted += 1


def test_the_hub_isolates_a_subscriber_whose_offer_raises(caplog: pytest.LogCaptureFixture) -> None:
    log = FakeLog(1)
    hub = Hub(aioredis.Redis(), LogSettings("", "supervision-test", 1).layout())  # never reads: fed by hand
    hub.epoch = "e"
    hub.dispatch(log.append("c", "ann", ConversationCreated(title="t", participants=("ann", "bob", "cat"))))
    ann, bob, cat = Recorder("ann"), Recorder("bob", broken=True), Recorder("cat")
    for sub in (ann, bob, cat):
        hub.attach(sub)
    hub.dispatch(log.append("c", "ann", MessageSent("m1", "hi")))
    assert (len(ann.got), len(cat.got), bob.aborted) == (1, 1, 1)
    assert "connection of bob failed handling entry" in caplog.text


def test_the_signal_bus_isolates_a_connection_whose_signal_raises() -> None:
    hub = Hub(aioredis.Redis(), LogSettings("", "supervision-test", 1).layout())
    hub.index.learn([Span("c", "ann", 1), Span("c", "bob", 1), Span("c", "cat", 1)])
    bus = SignalBus(aioredis.Redis(), hub, typing_ttl_s=5, typing_per_s=2, presence_ttl_s=30,
                    presence_scope="shared")  # fmt: skip
    ann, bob, cat = Recorder("ann"), Recorder("bob", broken=True), Recorder("cat")
    for conn in (ann, bob, cat):
        bus._conns.setdefault(conn.user_id, {})[conn] = conn.user_id  # joined, as `join` registers them
    bus.on_message(encode_signal(TypingSignal("c", "dan", "start")))
    assert (len(ann.got), len(cat.got), bob.aborted) == (1, 1, 1)


async def ready(base: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base) as http:
        return await http.get("/readyz")


async def test_a_bug_in_one_session_closes_that_connection_1011_and_nobody_elses(
    appender: Appender, redis_server_url: str, log_namespace: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    log = Log(appender)
    await log.create("room", "alice", "bob", "carol")
    feed_live = Session.feed_live

    def failing_for_bob(self: Session, item: Item) -> None:
        if self.user_id == "bob":
            raise RuntimeError("a bug in bob's session")
        feed_live(self, item)

    async with served_fanout(fanout_env(redis_server_url, log_namespace)) as fanout:
        alice, bob, carol = [await Client.open(fanout.url, user) for user in ("alice", "bob", "carol")]
        cursor = bob.cursor
        failures = CONNECTION_FAILURES._value.get()
        monkeypatch.setattr(Session, "feed_live", failing_for_bob)
        await log.send("room", "alice", "one")
        assert await close_code(bob.ws) == 1011
        for client in (alice, carol):
            await client.until(lambda c: c.bodies() == ["one"])
        assert CONNECTION_FAILURES._value.get() == failures + 1
        assert "connection of bob failed handling entry" in caplog.text
        assert "a bug in bob's session" in caplog.text
        monkeypatch.setattr(Session, "feed_live", feed_live)
        await log.send("room", "carol", "two")
        for client in (alice, carol):
            await client.until(lambda c: c.bodies() == ["one", "two"])
        assert (await ready(fanout.http)).status_code == 200
        again = await Client.open(fanout.url, "bob", cursor)  # resumes with nothing lost
        await again.until(lambda c: c.bodies() == ["one", "two"])
        for client in (alice, carol, again):
            await client.close()


async def test_a_bug_in_the_hub_stops_it_loudly_and_closes_every_connection_1011(
    appender: Appender, redis_server_url: str, log_namespace: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    log = Log(appender)
    await log.create("room", "alice", "bob")
    await log.create("doomed", "alice")
    route = Router.route

    def failing_for_doomed(self: Router, item: Item) -> Any:
        if item.conversation_id == "doomed":
            raise RuntimeError("a bug in the hub's routing")
        return route(self, item)

    async with served_fanout(fanout_env(redis_server_url, log_namespace)) as fanout:
        alice, bob = [await Client.open(fanout.url, user) for user in ("alice", "bob")]
        monkeypatch.setattr(Router, "route", failing_for_doomed)
        with caplog.at_level(logging.INFO):
            await log.send("doomed", "alice", "boom")
            assert await close_code(alice.ws) == 1011
            assert await close_code(bob.ws) == 1011
        (critical,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert "FANOUT STOPPED: task fanout-hub crashed" in critical.getMessage()
        assert critical.exc_info is not None and "a bug in the hub's routing" in str(critical.exc_info[1])
        r = await ready(fanout.http)
        assert r.status_code == 503
        assert "the hub stopped: RuntimeError" in r.json()["failures"]["hub"]
        assert "fanout-hub: crashed" in r.json()["failures"]["tasks"]
        async with connect(fanout.url) as late:  # a new subscriber is sent elsewhere, not left waiting
            await late.send(msgspec.json.encode({"type": "auth", "token": token("alice")}).decode())
            await late.send('{"type":"subscribe"}')
            assert await close_code(late) == 4503
