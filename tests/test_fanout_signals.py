"""Ephemeral signals: typing and presence. Pure rules, presence.lua on a real Redis, and two real fanout
processes with real WebSocket clients."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from command_api.append import Appender
from realtime_fanout.exceptions import ProtocolViolation
from realtime_fanout.frames import (
    PresenceSnapshotFrame,
    Typing,
    TypingFrame,
    decode_client_message,
    encode_frame,
)
from realtime_fanout.hub import Hub
from realtime_fanout.membership import MembershipIndex, Span
from realtime_fanout.presence import PresenceEntry, PresenceStore
from realtime_fanout.signalbus import SignalBus
from realtime_fanout.signals import (
    PresenceSignal,
    RateLimiter,
    TypingSignal,
    TypingTracker,
    decode_signal,
    encode_signal,
    presence_recipients,
    presence_visible,
    typing_recipients,
)
from servicekit.log_settings import LogSettings
from tests.fanout_fixtures import PARTITIONS, Client, Log, archive_everything


def test_rate_limiter_allows_the_burst_then_the_rate() -> None:
    limiter = RateLimiter(2.0)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", 0.0)  # per key
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)
    assert limiter.allow("a", 10.0) and limiter.allow("a", 10.0) and not limiter.allow("a", 10.0)
    assert all(RateLimiter(0).allow("a", 0.0) for _ in range(100))


def test_rate_limiter_forgets_only_idle_buckets() -> None:
    limiter = RateLimiter(1.0, max_keys=10)
    assert limiter.allow("busy", 0.0) and not limiter.allow("busy", 0.0)
    for n in range(20):
        limiter.allow(f"u{n}", 100.0 + n)  # "busy" refilled by now: forgetting it is exact
    assert len(limiter) <= 11
    assert not limiter.allow("u19", 119.0)  # a bucket still draining is kept


def test_typing_tracker_reports_transitions_and_expiry_once() -> None:
    tracker = TypingTracker(5.0)
    assert tracker.start("c", "u", 0.0)
    assert not tracker.start("c", "u", 3.0)  # renewal: no new start
    assert tracker.expire(7.9) == []  # the renewal moved the deadline to 8
    assert tracker.expire(8.0) == [("c", "u")]
    assert tracker.expire(100.0) == [] and not tracker.stop("c", "u")  # expired: no second stop
    assert tracker.start("c", "u", 200.0) and tracker.typing("c", "u")
    assert tracker.stop("c", "u") and not tracker.stop("c", "u")
    assert tracker.expire(300.0) == [] and tracker.next_deadline() is None


def test_recipients_follow_current_membership() -> None:
    index = MembershipIndex()
    index.learn([Span("room", "alice", 1), Span("room", "bob", 1), Span("room", "carol", 1, 5)])
    index.learn([Span("side", "alice", 1), Span("side", "dave", 2), Span("far", "eve", 1)])
    assert typing_recipients(index.members["room"], "alice") == {"bob"}
    assert presence_recipients(index, "alice", "shared") == {"bob", "dave"}
    assert presence_recipients(index, "carol", "shared") == set()  # removed: shares nothing now
    assert presence_recipients(index, "nobody", "shared") == set()


def test_presence_scope_engaged_needs_the_target_to_have_acted_since_joining() -> None:
    index = MembershipIndex()
    index.learn([Span("trap", "stranger", 1), Span("trap", "victim", 1), Span("room", "victim", 1)])
    index.learn([Span("room", "friend", 1)])
    index.note_act("trap", "stranger", 1)  # the stranger created "trap", naming the victim
    index.note_act("room", "victim", 1)  # the victim created "room" with a friend
    assert presence_recipients(index, "victim", "shared") == {"stranger", "friend"}
    assert presence_recipients(index, "victim", "engaged") == {"friend"}
    assert presence_visible(index, "stranger", "engaged") == set()
    assert presence_visible(index, "victim", "engaged") == {"stranger"}  # the stranger acted: consented
    assert presence_recipients(index, "victim", "off") == presence_visible(index, "victim", "off") == set()
    index.note_act("trap", "victim", 3)  # the victim posted in "trap"
    assert presence_recipients(index, "victim", "engaged") == {"stranger", "friend"}
    assert presence_visible(index, "stranger", "engaged") == {"victim"}
    index.learn([Span("trap", "victim", 1, 4), Span("trap", "victim", 6)])  # removed, then added back
    assert presence_recipients(index, "victim", "engaged") == {"friend"}  # acts before the re-add: none
    index.note_act("trap", "victim", 2)  # an older act learned late changes nothing
    assert not index.engaged("trap", "victim")
    index.note_act("trap", "victim", 7)
    assert index.engaged("trap", "victim") and not index.engaged("trap", "nobody")


def test_signal_and_frame_formats() -> None:
    typing = TypingSignal("c", "u", "start")
    assert decode_signal(encode_signal(typing)) == typing
    lua = b'{"online":false,"user_id":"u","last_seen":1700000000123,"type":"presence"}'
    assert decode_signal(lua) == PresenceSignal("u", False, 1700000000123)
    assert decode_signal(b'{"type":"presence","user_id":"u","online":true,"last_seen":null}') == (
        PresenceSignal("u", True, None)
    )
    assert decode_signal(b"nonsense") is None
    assert msgspec.json.decode(encode_frame(TypingFrame("c", "u", "stop"))) == {
        "type": "typing", "conversation_id": "c", "user_id": "u", "state": "stop",
    }  # fmt: skip
    snapshot = encode_frame(PresenceSnapshotFrame([PresenceEntry("u", False, 1.5)]))
    assert msgspec.json.decode(snapshot) == {
        "type": "presence_snapshot", "users": [{"user_id": "u", "online": False, "last_seen": 1.5}],
    }  # fmt: skip
    message = decode_client_message('{"type":"typing","conversation_id":"c","state":"start"}')
    assert message == Typing("c", "start")
    with pytest.raises(ProtocolViolation):
        decode_client_message('{"type":"typing","conversation_id":"c","state":"maybe"}')


async def published(pubsub: Any, wait_s: float = 0.3) -> list[dict[str, Any]]:
    """Every message on the subscribed channel within `wait_s` (at most 200 reads)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    for _ in range(200):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            out.append(msgspec.json.decode(message["data"]))
    return out


async def test_presence_transitions_are_exact_with_several_connections(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    store = PresenceStore(redis_client, log_namespace, ttl_s=30)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(store.channel)
    assert await store.touch([("c1", "alice"), ("c2", "alice"), ("c3", "bob")]) == 2
    assert await store.touch([("c1", "alice")]) == 0  # a refresh is no transition
    assert not await store.leave("c1", "alice")
    assert await store.snapshot(["alice", "bob", "carol"]) == [
        PresenceEntry("alice", True, None), PresenceEntry("bob", True, None),
        PresenceEntry("carol", False, None),
    ]  # fmt: skip
    before = time.time()
    assert await store.leave("c2", "alice")
    assert not await store.leave("c2", "alice")  # twice: no second offline
    messages = await published(pubsub)
    assert [(m["user_id"], m["online"]) for m in messages] == [
        ("alice", True),
        ("bob", True),
        ("alice", False),
    ]
    [alice] = await store.snapshot(["alice"])
    assert (
        not alice.online and alice.last_seen is not None and before - 1 <= alice.last_seen <= time.time() + 1
    )
    assert messages[-1]["last_seen"] == round(alice.last_seen * 1000)
    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


async def test_expired_connections_are_swept_once_and_concurrent_leaves_go_offline_once(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    store = PresenceStore(redis_client, log_namespace, ttl_s=0.2)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(store.channel)
    await store.touch([("d1", "dead"), ("d2", "dead"), ("g1", "gone"), ("l1", "live")])
    await asyncio.sleep(0.3)
    await store.touch([("l1", "live")])
    assert await store.sweep(limit=1) == (1, 1)  # bounded; a user's other expired records go along
    assert await store.sweep(limit=1) == (1, 1)
    assert await store.sweep(limit=10) == (0, 0)
    [dead] = await store.snapshot(["dead"])
    assert not dead.online and dead.last_seen is not None and dead.last_seen <= time.time() - 0.25
    long = PresenceStore(redis_client, log_namespace, ttl_s=30)
    conns = [(f"k{n}", "many") for n in range(20)]
    await long.touch(conns)
    results = await asyncio.gather(*(long.leave(conn, user) for conn, user in conns))
    assert sum(results) == 1
    messages = [(m["user_id"], m["online"]) for m in await published(pubsub)]
    for user in ("dead", "gone", "many"):
        assert messages.count((user, False)) == 1, messages
    assert ("live", False) not in messages
    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


async def test_a_leave_with_grace_is_no_transition_when_the_user_comes_back_within_it(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    store = PresenceStore(redis_client, log_namespace, ttl_s=30)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(store.channel)
    await store.touch([("a1", "alice"), ("b1", "bob")])
    left = time.time()
    assert await store.leave_many([("a1", "alice"), ("b1", "bob")], grace_s=0.3) == 0  # a storm: kept
    await store.touch([("a2", "alice")])  # alice is back in time, bob is not
    await asyncio.sleep(0.4)
    assert await store.sweep(limit=10) == (2, 1)
    messages = await published(pubsub)
    assert [(m["user_id"], m["online"]) for m in messages] == [("alice", True), ("bob", True), ("bob", False)]
    [alice, bob] = await store.snapshot(["alice", "bob"])
    assert alice.online and not bob.online and bob.last_seen is not None
    assert left - 1 <= bob.last_seen <= left + 0.2  # when he left, not when the grace ended
    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


def frames_of(client: Client, kind: str, **match: Any) -> list[dict[str, Any]]:
    return [f for f in client.control if f["type"] == kind and all(f[k] == v for k, v in match.items())]


async def drain(client: Client, wait_s: float = 0.3) -> None:
    """Read whatever arrives until the connection stays quiet for `wait_s` (at most 100 frames)."""
    for _ in range(100):
        try:
            await client.next_frame(wait_s)
        except TimeoutError:
            return


async def metric(port: int, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


async def send_typing(client: Client, cid: str, state: str) -> None:
    await client.ws.send(
        msgspec.json.encode({"type": "typing", "conversation_id": cid, "state": state}).decode()
    )


async def test_typing_reaches_only_the_other_current_participants_across_processes(
    appender: Appender, make_fanout: Any
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob", "carol")
    await log.create("side", "dave")
    env = {"PARLEY_FANOUT_TYPING_TTL_S": "1", "PARLEY_FANOUT_TYPING_PER_S": "2"}
    one, two = await make_fanout(**env), await make_fanout(**env)
    alice = await Client.open(one.url, "alice")
    alice2 = await Client.open(two.url, "alice")  # the sender's own other connection gets nothing
    carol = await Client.open(one.url, "carol")
    bob = await Client.open(two.url, "bob")
    dave = await Client.open(two.url, "dave")  # an outsider
    await send_typing(alice, "room", "start")
    for client in (bob, carol):
        await client.until(lambda c: frames_of(c, "typing"))
        assert frames_of(client, "typing") == [
            {"type": "typing", "conversation_id": "room", "user_id": "alice", "state": "start"}
        ]
    await send_typing(alice, "room", "stop")
    await bob.until(lambda c: len(frames_of(c, "typing")) == 2)
    assert frames_of(bob, "typing", state="stop", user_id="alice")

    await log.remove("room", "alice", "carol")
    for client in (carol, bob):  # both processes have applied the removal
        await client.until(lambda c: c.events and c.events[-1]["payload"]["type"] == "participant_removed")
    await send_typing(carol, "room", "start")  # not a participant any more: dropped
    await asyncio.sleep(0.6)  # alice's bucket refills
    started = time.monotonic()
    await send_typing(alice, "room", "start")
    await bob.until(lambda c: len(frames_of(c, "typing")) == 3)
    assert frames_of(bob, "typing")[-1]["user_id"] == "alice"
    await bob.until(lambda c: len(frames_of(c, "typing")) == 4, wait_s=5)  # expiry: a synthesized stop
    assert frames_of(bob, "typing")[-1] == {
        "type": "typing", "conversation_id": "room", "user_id": "alice", "state": "stop",
    }  # fmt: skip
    assert 0.8 <= time.monotonic() - started <= 3.0

    await asyncio.sleep(1.0)  # a full bucket: 2 pass, the other 8 are dropped
    for n in range(10):
        await send_typing(alice, "room", "start" if n % 2 == 0 else "stop")
    await asyncio.sleep(1.0)
    await send_typing(alice, "room", "start")
    await bob.until(lambda c: len(frames_of(c, "typing")) == 7)
    assert [f["state"] for f in frames_of(bob, "typing")[4:]] == ["start", "stop", "start"]
    assert await metric(one.port, "parley_fanout_typing_dropped_total", reason="rate") == 8
    assert await metric(one.port, "parley_fanout_typing_dropped_total", reason="not-participant") == 1
    await asyncio.gather(*(drain(c) for c in (alice, alice2, carol, dave)))
    for client in (alice, alice2, dave):
        assert frames_of(client, "typing") == []
    assert len(frames_of(carol, "typing")) == 2  # only what came before the removal
    for client in (alice, alice2, carol, bob, dave):
        await client.close()


async def test_presence_across_processes_with_several_connections_and_a_killed_process(
    appender: Appender, make_fanout: Any
) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    await log.create("side", "carol")
    ttl = 2.0  # heartbeats every ttl/3; a process stalled longer than ttl is rightly seen as gone
    env = {"PARLEY_FANOUT_PRESENCE_TTL_S": str(ttl), "PARLEY_FANOUT_PRESENCE_SCOPE": "shared"}
    one, two = await make_fanout(**env), await make_fanout(**env)
    bob = await Client.open(one.url, "bob")
    carol = await Client.open(one.url, "carol")  # shares nothing with alice
    await bob.until(lambda c: frames_of(c, "presence_snapshot"))
    assert frames_of(bob, "presence_snapshot")[0]["users"] == [
        {"user_id": "alice", "online": False, "last_seen": None}
    ]

    def alice_states(c: Client) -> list[bool]:
        return [f["online"] for f in frames_of(c, "presence", user_id="alice")]

    a1 = await Client.open(one.url, "alice")
    await a1.until(lambda c: frames_of(c, "presence_snapshot"))
    assert frames_of(a1, "presence_snapshot")[0]["users"] == [
        {"user_id": "bob", "online": True, "last_seen": None}
    ]
    await bob.until(lambda c: alice_states(c) == [True])
    a2 = await Client.open(two.url, "alice")
    # `live` comes before the connection's presence is recorded; its snapshot comes after.
    await a2.until(lambda c: frames_of(c, "presence_snapshot"))
    await a1.close()  # alice still has a2 on the other process
    await asyncio.sleep(0.5)
    await drain(bob)  # read what came meanwhile: no offline
    assert alice_states(bob) == [True]
    before = time.time()
    await a2.close()
    await bob.until(lambda c: alice_states(c) == [True, False])
    offline = frames_of(bob, "presence", user_id="alice")[-1]
    assert before - 1 <= offline["last_seen"] <= time.time() + 1

    a3 = await Client.open(two.url, "alice")
    await bob.until(lambda c: alice_states(c) == [True, False, True])
    await asyncio.sleep(ttl / 3 + 0.1)  # at least one heartbeat from `two`
    two.signal(signal.SIGKILL)
    two.wait()
    killed = time.monotonic()
    # `two`'s records expire ttl after its last touch and `one`'s next sweep publishes alice offline. A
    # heartbeat stalled past ttl may flap her earlier (offline, then online again), so wait out the ttl.
    await asyncio.sleep(ttl)
    await drain(bob)
    await bob.until(lambda c: not alice_states(c)[-1], wait_s=6)
    assert time.monotonic() - killed <= ttl + ttl / 3 + 1.5  # ttl + sweep period + slack
    states = alice_states(bob)
    assert states[:4] == [True, False, True, False]
    assert all(a != b for a, b in itertools.pairwise(states))  # each transition published once, in order
    again = await Client.open(one.url, "bob")
    await again.until(lambda c: frames_of(c, "presence_snapshot"))
    [entry] = frames_of(again, "presence_snapshot")[0]["users"]
    assert entry["user_id"] == "alice" and not entry["online"] and entry["last_seen"] is not None
    await drain(carol, 0.1)
    assert frames_of(carol, "presence", user_id="alice") == []
    for client in (bob, again, a3):
        await client.close()


def presence_of(client: Client, user: str) -> list[bool]:
    return [f["online"] for f in frames_of(client, "presence", user_id=user)]


def snapshot_users(client: Client) -> list[str]:
    return [entry["user_id"] for entry in frames_of(client, "presence_snapshot")[-1]["users"]]


async def test_a_stranger_who_names_a_victim_learns_nothing_of_their_presence_until_they_act(
    appender: Appender, make_fanout: Any
) -> None:
    """The default scope (`engaged`): being named in a conversation is no consent to be seen; the victim's
    presence shows there once they act in it (here: post), also on a process started after that."""
    log = Log(appender)
    await log.create("trap", "stranger", "victim")
    fanout = await make_fanout()
    stranger = await Client.open(fanout.url, "stranger")
    await stranger.until(lambda c: frames_of(c, "presence_snapshot"))
    assert snapshot_users(stranger) == []
    victim = await Client.open(fanout.url, "victim")
    await victim.until(lambda c: frames_of(c, "presence_snapshot"))
    assert snapshot_users(victim) == ["stranger"]  # the stranger acted (created "trap")
    await victim.close()
    again = await Client.open(fanout.url, "stranger")
    await again.until(lambda c: frames_of(c, "presence_snapshot"))
    assert snapshot_users(again) == []
    await drain(stranger)
    assert presence_of(stranger, "victim") == []  # online and offline went unseen

    await log.send("trap", "victim", "who are you?")
    await stranger.until(lambda c: c.bodies() == ["who are you?"])
    victim = await Client.open(fanout.url, "victim")
    await stranger.until(lambda c: presence_of(c, "victim") == [True])
    later = await make_fanout()  # learns the act from the stream at start
    for url in (fanout.url, later.url):
        seen = await Client.open(url, "stranger")
        await seen.until(lambda c: frames_of(c, "presence_snapshot"))
        assert frames_of(seen, "presence_snapshot")[-1]["users"] == [
            {"user_id": "victim", "online": True, "last_seen": None}
        ]
        await seen.close()
    for client in (stranger, again, victim):
        await client.close()


async def test_presence_scope_off_shows_nobody(appender: Appender, make_fanout: Any) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    await log.send("room", "bob", "hi")
    fanout = await make_fanout(PARLEY_FANOUT_PRESENCE_SCOPE="off")
    alice = await Client.open(fanout.url, "alice")
    bob = await Client.open(fanout.url, "bob")
    await drain(alice)
    assert presence_of(alice, "bob") == [] and snapshot_users(alice) == []
    await alice.close()
    await bob.close()


async def test_acts_in_archived_history_count_for_presence(
    appender: Appender, make_fanout: Any, redis_client: aioredis.Redis, log_namespace: str, database_url: str
) -> None:
    """A process whose streams were trimmed learns who acted where from the archive, as memberships."""
    log = Log(appender)
    await log.create("answered", "one", "victim")
    await log.send("answered", "victim", "hello one")
    await log.create("ignored", "two", "victim")
    assert appender.epoch is not None
    assert await archive_everything(database_url, redis_client, log_namespace, appender.epoch) == 3
    layout = LogSettings("", log_namespace, PARTITIONS).layout()
    for partition in range(PARTITIONS):
        await redis_client.xtrim(layout.stream_key(partition), maxlen=0, approximate=False)
    fanout = await make_fanout(DATABASE_URL=database_url)
    victim = await Client.open(fanout.url, "victim")
    one, two = [await Client.open(fanout.url, user) for user in ("one", "two")]
    for client in (one, two):
        await client.until(lambda c: frames_of(c, "presence_snapshot"))
    assert snapshot_users(one) == ["victim"] and snapshot_users(two) == []
    for client in (victim, one, two):
        await client.close()


class Joiner:
    """A connection as the signal bus sees it, keeping the presence snapshot it is handed."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.conversations: frozenset[str] | None = None
        self.snapshot: bytes | None = None
        self.ready = 0

    def signal(self, frame: bytes, *, presence: bool) -> None: ...

    def presence_ready(self, snapshot: bytes | None) -> None:
        self.snapshot, self.ready = snapshot, self.ready + 1

    def abort(self) -> None:
        raise AssertionError(f"{self.user_id} aborted")


async def test_joins_that_arrive_together_cost_one_touch_and_one_snapshot_and_see_each_other(
    redis_client: aioredis.Redis, log_namespace: str
) -> None:
    """A reconnect storm's joins are batched: one presence script call and one read for them all, and each
    snapshot is read after every join of its batch was recorded (each sees the others online)."""
    users = [f"u{n}" for n in range(40)]
    hub = Hub(redis_client, LogSettings("", log_namespace, 1).layout())  # not started: its index by hand
    hub.index.learn([Span("c", user, 1) for user in users] + [Span("d", "u0", 1), Span("d", "out", 1)])
    bus = SignalBus(redis_client, hub, typing_ttl_s=5, typing_per_s=2, presence_ttl_s=30,
                    presence_scope="shared")  # fmt: skip
    calls = {"touch": 0, "snapshot": 0}
    touch, snapshot = bus.store.touch, bus.store.snapshot

    async def counted_touch(connections: list[tuple[str, str]]) -> int:
        calls["touch"] += 1
        return await touch(connections)

    async def counted_snapshot(of: list[str]) -> list[PresenceEntry]:
        calls["snapshot"] += 1
        return await snapshot(of)

    bus.store.touch, bus.store.snapshot = counted_touch, counted_snapshot  # type: ignore[method-assign,assignment]
    joiners = [Joiner(user) for user in users]
    await asyncio.gather(*(bus.join(conn) for conn in joiners))
    assert calls == {"touch": 1, "snapshot": 1}
    for conn in joiners:
        assert conn.ready == 1 and conn.snapshot is not None
        entries = msgspec.json.decode(conn.snapshot)["users"]
        seen = {entry["user_id"]: entry["online"] for entry in entries}
        expected = {user: True for user in users if user != conn.user_id}
        if conn.user_id == "u0":
            expected["out"] = False  # shares d with u0 only, never joined
        assert seen == expected, conn.user_id
    assert await snapshot(users) == [PresenceEntry(user, True, None) for user in users]
    late = Joiner("u1")
    await bus.join(late)  # alone: a batch of one
    assert calls == {"touch": 2, "snapshot": 2} and late.ready == 1
