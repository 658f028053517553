"""The per-connection protocol, sans I/O: handshake, token refresh and expiry, subscribe, typing, the send
budget and every close reason, driven by messages and a fake clock; no server, no socket."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import encode
from events.log import LogEntry
from events.schema import ConversationCreated, Envelope, MessageSent
from realtime_fanout.cursor import Cursor
from realtime_fanout.frames import Subscribe, Typing
from realtime_fanout.item import Item, decode_entry
from realtime_fanout.membership import Span
from realtime_fanout.protocol import ConnectionProtocol, Limits, Phase
from servicekit.auth import TokenVerifier
from servicekit.auth_settings import AuthSettings
from servicekit.slots import UserSlots
from servicekit.tokens import mint_token

AUTH = AuthSettings(algorithms=("HS256",), secret="protocol-test-secret-" + "x" * 24, dev_mode=True)
T0 = 1_800_000_000.0
LIMITS = Limits(auth_timeout_s=10.0, max_buffer_bytes=4096, max_message_bytes=16_384, max_batch=100)


def item(n: int, body: str = "b") -> Item:
    payload = ConversationCreated(title="t", participants=("ann",)) if n == 1 else MessageSent(f"m{n}", body)
    env = Envelope(seq=n, event_id=uuid.uuid4().hex, schema_version=type(payload).VERSION, occurred_at=datetime(2024, 1, 1, tzinfo=UTC),
                   actor="ann", conversation_id="c", correlation_id="", payload=payload)  # fmt: skip
    decoded = decode_entry(LogEntry(0, f"{1000 + n}-0", encode(env)))
    assert decoded is not None
    return decoded


@dataclass
class Driver:
    """One protocol, a clock, and what it sent (frame types, in order) and asked for."""

    slots: UserSlots | None = None
    limits: Limits = LIMITS
    now: float = T0
    sent: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Subscribe | Typing] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.verifier = TokenVerifier(AUTH, now=lambda: self.now)
        self.p = ConnectionProtocol(self.verifier, self.limits, self.now, self.slots)

    def token(self, user: str, ttl_s: float = 3600) -> str:
        return mint_token(AUTH, user, ttl_s=ttl_s, now=self.now)

    def flush(self) -> None:
        self.sent += [msgspec.json.decode(f) for f in self.p.data_to_send()]

    def drain(self) -> None:
        self.flush()
        while (request := self.p.next_request()) is not None:
            self.requests.append(request)
            if isinstance(request, Subscribe):  # what the I/O layer does: attach, splice nothing, serve
                self.p.attached(Cursor("e", ["1001-0"]), [Span("c", "ann", 1)])
                self.p.replay_done()
                self.sent += [msgspec.json.decode(f) for f in self.p.data_to_send()]

    def send(self, message: dict[str, Any] | str) -> Driver:
        text = message if isinstance(message, str) else msgspec.json.encode(message).decode()
        self.p.receive_text(text, self.now)
        self.drain()
        return self

    def auth(self, user: str = "ann", ttl_s: float = 3600) -> Driver:
        return self.send({"type": "auth", "token": self.token(user, ttl_s)})

    def subscribe(self, **fields: Any) -> Driver:
        return self.send({"type": "subscribe", **fields})

    def wait(self, seconds: float) -> Driver:
        self.now += seconds
        self.p.tick(self.now)
        self.drain()
        return self

    def types(self) -> list[str]:
        return [f["type"] for f in self.sent]

    def closed(self) -> tuple[int, str] | None:
        return None if self.p.close is None else (self.p.close.code, self.p.close.reason)


def test_auth_then_subscribe_is_authenticated_then_live() -> None:
    d = Driver().auth().subscribe()
    assert d.types() == ["authenticated", "live"] and d.closed() is None
    assert d.sent[0] == {"type": "authenticated", "user_id": "ann", "expires_at": T0 + 3600}
    assert [type(r) for r in d.requests] == [Subscribe] and d.p.phase is Phase.SERVING


def test_a_token_offered_with_the_upgrade_authenticates() -> None:
    d = Driver()
    d.p.offer_token(d.token("ann"))
    d.subscribe()
    assert d.types() == ["authenticated", "live"]


CLOSES: list[tuple[str, Any, tuple[int, str]]] = [
    ("subscribe first", lambda d: d.subscribe(), (4401, "missing-token")),
    ("typing first", lambda d: d.send({"type": "typing", "conversation_id": "c", "state": "start"}),
     (4401, "missing-token")),
    ("a bad token", lambda d: d.send({"type": "auth", "token": "not.a.jwt"}), (4401, "malformed-token")),
    ("an expired token", lambda d: d.send({"type": "auth", "token": mint_token(AUTH, "ann", 1, now=T0 - 7200)}),
     (4401, "expired-token")),
    ("typing before subscribe", lambda d: d.auth().send({"type": "typing", "conversation_id": "c", "state": "start"}),
     (4400, "protocol-error")),
    ("not JSON", lambda d: d.send("{nope"), (4400, "protocol-error")),
    ("an unknown type", lambda d: d.send({"type": "hello"}), (4400, "protocol-error")),
    ("too long", lambda d: d.send({"type": "auth", "token": "x" * 20_000}), (4400, "protocol-error")),
    ("quiet in the handshake", lambda d: d.wait(10), (4401, "auth-timeout")),
    ("authenticated but quiet", lambda d: d.auth().wait(9).wait(1), (4401, "auth-timeout")),
    ("the token expires while serving", lambda d: d.auth(ttl_s=60).subscribe().wait(59).wait(1),
     (4401, "token-expired")),
    ("a refresh names another user", lambda d: d.auth().subscribe().auth("bob"), (4403, "user-mismatch")),
    ("another user before subscribe", lambda d: d.auth().auth("bob"), (4403, "user-mismatch")),
    ("a second subscribe", lambda d: d.auth().subscribe().subscribe(), (4400, "already-subscribed")),
]  # fmt: skip


@pytest.mark.parametrize(("steps", "close"), [c[1:] for c in CLOSES], ids=[c[0] for c in CLOSES])
def test_each_close_reason_comes_with_its_error_frame_last(steps: Any, close: tuple[int, str]) -> None:
    d = Driver()
    steps(d)
    assert d.closed() == close
    assert d.sent[-1]["type"] == "error" and d.sent[-1]["reason"] == close[1] and d.sent[-1]["detail"]
    assert d.types().count("error") == 1
    d.auth().subscribe().wait(10_000)  # once closed, nothing changes and nothing more is sent
    assert d.closed() == close and d.types().count("error") == 1 and d.p.deadline() is None


def test_messages_in_the_handshake_each_restart_the_auth_timeout() -> None:
    d = Driver().wait(9).auth().wait(9).auth().wait(9)
    assert d.closed() is None and d.p.deadline() == d.now + 1
    d.subscribe().wait(9)  # serving: only the token's expiry counts
    assert d.closed() is None and d.p.deadline() == T0 + 18 + 3600  # the last token


def test_a_refresh_moves_the_expiry() -> None:
    d = Driver().auth(ttl_s=60).subscribe().wait(30).auth(ttl_s=60)
    assert d.p.deadline() == T0 + 90
    d.wait(59)
    assert d.closed() is None
    d.wait(1)
    assert d.closed() == (4401, "token-expired")
    assert d.types() == ["authenticated", "live", "authenticated", "error"]


def test_typing_while_serving_is_a_request_for_the_io_layer() -> None:
    d = Driver().auth().subscribe().send({"type": "typing", "conversation_id": "c", "state": "start"})
    assert d.requests[1] == Typing("c", "start") and d.closed() is None


def test_binary_frames_are_refused() -> None:
    d = Driver().auth()
    d.p.receive_binary()
    d.drain()
    assert d.closed() == (4400, "protocol-error") and d.sent[-1]["detail"] == "send text frames"


def test_no_client_input_is_read_while_subscribing() -> None:
    d = Driver().auth()
    d.p.receive_text('{"type":"subscribe"}', d.now)
    assert d.p.phase is Phase.SUBSCRIBING and d.p.deadline() is None
    d.p.receive_text("{nope", d.now)
    d.p.receive_binary()
    d.p.tick(d.now + 10_000)
    assert d.closed() is None


def test_slots_cap_connections_per_user_and_are_given_back() -> None:
    slots = UserSlots(1)
    first, second = Driver(slots).auth(), Driver(slots).auth()
    assert first.closed() is None and second.closed() == (4429, "too-many-connections")
    assert Driver(slots).auth("bob").closed() is None  # per user
    first.auth()  # a refresh takes no second slot
    assert first.closed() is None
    first.p.finish()
    first.p.finish()  # idempotent
    assert Driver(slots).auth().closed() is None
    assert Driver(slots).auth().closed() == (4429, "too-many-connections")


def test_the_send_budget_closes_4008_without_an_error_frame() -> None:
    d = Driver().auth().subscribe()
    d.p.offer(item(2, "x" * 3000))
    d.drain()
    assert d.closed() is None and d.types()[-1] == "event"
    d.p.offer(item(3, "x" * 3000))
    d.p.offer(item(4, "x" * 3000))
    assert d.closed() == (4008, "slow-consumer")
    d.drain()
    assert d.types()[-1] == "event"  # pending events are dropped, no error frame: resume from the cursor


def test_control_frames_count_against_the_budget_too() -> None:
    d = Driver().auth().subscribe()
    for _ in range(5):
        d.p.signal(b"x" * 1000, presence=False)
    assert d.closed() == (4008, "slow-consumer")


def test_presence_frames_wait_for_the_snapshot() -> None:
    d = Driver().auth().subscribe()
    d.p.signal(b'{"type":"presence","n":1}', presence=True)
    d.p.signal(b'{"type":"typing"}', presence=False)
    d.drain()
    d.p.presence_ready(b'{"type":"presence_snapshot","users":[]}')
    d.p.signal(b'{"type":"presence","n":2}', presence=True)
    d.drain()
    assert d.types()[2:] == ["typing", "presence_snapshot", "presence", "presence"]
    assert [f.get("n") for f in d.sent[4:]] == [1, 2]


def test_abort_closes_1011_without_an_error_frame() -> None:
    d = Driver().auth().subscribe()
    d.p.offer(item(2))
    d.p.abort()
    d.drain()
    assert d.closed() == (1011, "internal-error") and d.types() == ["authenticated", "live"]


def test_the_io_layer_may_fail_the_subscribe() -> None:
    d = Driver().auth()
    d.p.receive_text('{"type":"subscribe"}', d.now)
    d.p.fail(4503, "log-unavailable", "the log is not readable yet")
    d.flush()
    assert d.closed() == (4503, "log-unavailable") and d.types() == ["authenticated", "error"]


def test_a_resync_is_sent_before_the_history() -> None:
    d = Driver().auth()
    d.p.receive_text('{"type":"subscribe","cursor":"bad"}', d.now)
    d.p.attached(Cursor("e", ["1001-0"]), [Span("c", "ann", 1)])
    d.p.resync("e-cursor", "malformed-cursor")
    d.p.feed_replay([item(2)])
    d.p.replay_done()
    d.flush()
    assert d.types() == ["authenticated", "resync", "event", "live"]


# The property: random client messages and time steps against an independent model of the close rule.

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("auth"), st.sampled_from(["ann", "bob"]), st.sampled_from([5.0, 60.0, 3600.0])),
        st.tuples(st.just("bad-auth"), st.none(), st.none()),
        st.tuples(st.just("subscribe"), st.none(), st.none()),
        st.tuples(st.just("typing"), st.none(), st.none()),
        st.tuples(st.just("garbage"), st.none(), st.none()),
        st.tuples(st.just("wait"), st.none(), st.sampled_from([1.0, 4.0, 9.0, 11.0, 100.0])),
    ),
    max_size=12,
)


def model(steps: list[tuple[str, str | None, float | None]]) -> tuple[tuple[int, str] | None, int]:
    """The close (code, reason) and the number of `authenticated` frames, by the README's rules."""
    now, quiet_until, user, exp, serving, auths = T0, T0 + 10, None, 0.0, False, 0
    for kind, who, value in steps:
        if kind == "wait":
            assert value is not None
            now += value
            if not serving and now >= quiet_until:
                return (4401, "auth-timeout"), auths
            if serving and now >= exp:
                return (4401, "token-expired"), auths
            continue
        if kind == "garbage":
            return (4400, "protocol-error"), auths
        if kind == "bad-auth":
            return (4401, "malformed-token"), auths
        if kind == "auth":
            if user is not None and who != user:
                return (4403, "user-mismatch"), auths
            assert value is not None
            user, exp, auths = who, int(now + value), auths + 1
        elif kind == "subscribe" and serving:
            return (4400, "already-subscribed"), auths
        elif user is None:
            return (4401, "missing-token"), auths
        elif kind == "subscribe":
            serving = True
            if now >= exp:
                return (4401, "token-expired"), auths
        elif not serving:
            return (4400, "protocol-error"), auths
        if not serving:
            quiet_until = now + 10
    return None, auths


@settings(max_examples=400, deadline=None)
@given(steps=STEPS)
def test_random_conversations_close_as_the_model_says(
    steps: list[tuple[str, str | None, float | None]],
) -> None:
    d = Driver()
    for kind, who, value in steps:
        if kind == "auth":
            assert who is not None and value is not None
            d.auth(who, value)
        elif kind == "bad-auth":
            d.send({"type": "auth", "token": "not.a.jwt"})
        elif kind == "subscribe":
            d.subscribe()
            if d.p.phase is Phase.SERVING:
                d.wait(0)  # the I/O layer feeds the time once serving (an expired token closes at once)
        elif kind == "typing":
            d.send({"type": "typing", "conversation_id": "c", "state": "start"})
        elif kind == "garbage":
            d.send("{nope")
        else:
            assert value is not None
            d.wait(value)
    close, auths = model(steps)
    assert d.closed() == close
    assert d.types().count("authenticated") == auths
    assert d.types().count("error") == (close is not None)
    if close is not None:
        assert d.types()[-1] == "error"
    assert d.types().count("live") == (1 if any(r for r in d.requests if isinstance(r, Subscribe)) else 0)
