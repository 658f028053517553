"""The append script decides as the rules say (`command_api/rules.py`): random histories through both, on
every Redis at hand (6.2 and 7).

Many users, joins and leaves, edits and deletes racing (submitted together, so they share script calls),
expected sequences, Idempotency-Keys reused with the same and with other requests. After every step the
script's answers (the events appended, byte for byte; refusal slugs and their current sequence; replays)
must be the ones `rules.decide` gives, and its state read back from Redis must be the rules' state. Commands
submitted together must match the rules in some order of them.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from command_api import bodies, rules
from command_api.append import Appended, Appender
from command_api.commands import (
    Context,
    add_participant,
    archive,
    create_conversation_with_id,
    delete_message,
    edit_message,
    mark_read,
    remove_participant,
    send_message,
    unarchive,
)
from command_api.exceptions import CommandRefused
from command_api.statekeys import bucket_of, message_field
from events.layout import LogLayout

USERS = ("alice", "bob", "carol", "dave", "erin")
CONVERSATIONS = ("c0", "c1", "c2")
MESSAGE_IDS = (
    "m1", "m2", "m3",
    "0190a0b0-0000-7000-8000-000000000001",  # server-made shape: packed into 16 bytes
    "0190a0b0-0000-7000-8000-000000000002",
    "0190A0B0-0000-7000-8000-000000000003",  # not canonical: kept as text
)  # fmt: skip
KEYS = ("",) * 7 + ("k1", "k2", "k3")
TEXTS = ("hi", "yo")
PARTITIONS = 2


@dataclass(frozen=True)
class Recipe:
    """One request, as a client would make it again on a retry (the builder draws fresh event ids)."""

    kind: str
    args: tuple[Any, ...]
    actor: str
    conversation_id: str
    key: str
    expected: int | str | None  # "current": the conversation's sequence as the rules have it


def _build(recipe: Recipe, state: rules.State) -> rules.Command:
    expected = recipe.expected
    if expected == "current":
        conversation = state.conversations.get(recipe.conversation_id)
        expected = 0 if conversation is None else conversation.seq
    assert not isinstance(expected, str)
    ctx = Context(recipe.actor, idempotency_key=recipe.key, expected_seq=expected)
    cid, args = recipe.conversation_id, recipe.args
    builders: dict[str, Callable[[], rules.Command]] = {
        "create": lambda: create_conversation_with_id(
            ctx, bodies.CreateConversation(args[1], list(args[0])), cid
        ),
        "send": lambda: send_message(ctx, cid, bodies.SendMessage(args[0], args[1], args[2])),
        "edit": lambda: edit_message(ctx, cid, args[0], bodies.EditMessage(args[1])),
        "delete": lambda: delete_message(ctx, cid, args[0]),
        "add": lambda: add_participant(ctx, cid, bodies.AddParticipant(args[0])),
        "remove": lambda: remove_participant(ctx, cid, args[0]),
        "read": lambda: mark_read(ctx, cid, bodies.MarkRead(args[0])),
        "archive": lambda: archive(ctx, cid),
        "unarchive": lambda: unarchive(ctx, cid),
    }
    return builders[recipe.kind]()


users, message_ids, texts = st.sampled_from(USERS), st.sampled_from(MESSAGE_IDS), st.sampled_from(TEXTS)
KINDS = (
    ("send",) * 6 + ("edit",) * 3 + ("delete",) * 2 + ("add", "remove", "read", "archive") * 3
    + ("unarchive",) * 2 + ("create",)
)  # fmt: skip
expectations: st.SearchStrategy[int | str | None] = st.sampled_from(
    [None] * 6 + ["current", "current", 0, 1, 3]
)


def often(draw: st.DrawFn, options: Sequence[str], tenths: int = 8) -> str | None:
    """One of `options` (when there are any) `tenths` of the time, else None."""
    return draw(st.sampled_from(options)) if options and draw(st.integers(0, 9)) < tenths else None


@st.composite
def recipes(draw: st.DrawFn, state: rules.State, conversation: str | None = None) -> Recipe:
    """Mostly what a participant would do (their own messages, known ids), sometimes anything at all."""
    cid = conversation or draw(st.sampled_from(CONVERSATIONS))
    c = state.conversations.get(cid)
    members, known = (sorted(c.members), sorted(c.messages)) if c else ([], [])
    actor = often(draw, members) or draw(users)
    kind = "create" if c is None and draw(st.booleans()) else draw(st.sampled_from(KINDS))
    mid = often(draw, known, 7) or draw(message_ids)
    args: tuple[Any, ...]
    if kind == "create":
        args = (tuple(sorted(draw(st.sets(users, max_size=3)))), draw(texts))
    elif kind == "send":
        fresh = draw(st.sampled_from([*MESSAGE_IDS, None])) if draw(st.integers(0, 9)) < 8 else mid
        args = (draw(texts), often(draw, known, 3) or draw(st.none() | message_ids), fresh)
    elif kind in ("edit", "delete"):
        if c is not None and mid in c.messages and draw(st.integers(0, 9)) < 7:
            actor = c.messages[mid].author
        args = (mid, draw(texts)) if kind == "edit" else (mid,)
    elif kind == "add":
        args = (draw(users),)
    elif kind == "remove":
        who = draw(st.sampled_from(["self", "creator", "another"]))
        archived = sorted(c.archived) if c else []  # leaving drops the mark: try it on those who have one
        other = often(draw, archived, 5) or often(draw, members, 7) or draw(users)
        args = (actor if who == "self" else other,)
        if c is not None and who == "creator":
            actor = c.creator
    elif kind == "read":
        actor = often(draw, sorted(c.read) if c else [], 6) or actor
        seq, marker = (c.seq, c.read.get(actor, 1)) if c else (0, 1)
        near = st.sampled_from([marker, marker, marker + 1, seq, seq + 1]) | st.integers(1, seq + 1)
        args = (max(1, draw(near)),)
    else:
        args = ()
    key = draw(st.sampled_from(KEYS))
    return Recipe(kind, args, actor, cid, key, draw(expectations))


Answer = tuple[object, ...]


def rules_answer(decision: rules.Decision) -> Answer:
    match decision:
        case rules.Accepted(seq, event):
            return ("accepted", seq, event)
        case rules.Replayed(seq, memo):
            return ("replayed", seq, memo)
        case rules.Refused(reason, detail):
            return ("refused", reason, detail)
    raise AssertionError(decision)


class ScriptMatchesRules(RuleBasedStateMachine):
    """A fresh log per example; `redis` and `loop` are the test's."""

    redis: aioredis.Redis
    loop: asyncio.AbstractEventLoop
    seen: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        self.layout = LogLayout("rules" + uuid.uuid4().hex[:10], PARTITIONS)
        self.appender = Appender(self.redis, self.layout)
        self.run(self.appender.open())
        self.state = rules.State()
        self.made: list[Recipe] = []
        self.appended = 0
        self.message_ids = set(MESSAGE_IDS)
        self.keys = {(user, key) for user in USERS for key in KEYS if key}

    @initialize(creator=users, others=st.sets(users, min_size=1, max_size=3))
    def first_conversation(self, creator: str, others: set[str]) -> None:
        self.submit([Recipe("create", (tuple(sorted(others)), "hi"), creator, CONVERSATIONS[0], "", None)])

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.appender.close())

    @rule(data=st.data())
    def one(self, data: st.DataObject) -> None:
        self.submit([data.draw(recipes(self.state))])

    @rule(data=st.data(), size=st.integers(2, 3), one_conversation=st.booleans())
    def together(self, data: st.DataObject, size: int, one_conversation: bool) -> None:
        cid = data.draw(st.sampled_from(CONVERSATIONS)) if one_conversation else None
        self.submit([data.draw(recipes(self.state, cid)) for _ in range(size)])

    @precondition(lambda self: any(c.messages for c in self.state.conversations.values()))
    @rule(data=st.data(), moves=st.lists(st.sampled_from(["edit", "delete"]), min_size=2, max_size=3))
    def race_on_one_message(self, data: st.DataObject, moves: list[str]) -> None:
        cid = data.draw(st.sampled_from(sorted(k for k, c in self.state.conversations.items() if c.messages)))
        c = self.state.conversations[cid]
        mid = data.draw(st.sampled_from(sorted(c.messages)))
        authors = [c.messages[mid].author] * 3
        actors = [data.draw(st.sampled_from([*authors, c.creator, *USERS])) for _ in moves]
        self.submit([
            Recipe(kind, (mid, "again") if kind == "edit" else (mid,), actor, cid, "", None)
            for actor, kind in zip(actors, moves, strict=True)
        ])  # fmt: skip

    @precondition(lambda self: any(r.key for r in self.made))
    @rule(index=st.integers(0, 10**6), together=st.booleans())
    def retry(self, index: int, together: bool) -> None:
        keyed = [r for r in self.made if r.key]
        again = keyed[index % len(keyed)]
        self.submit([again, again] if together else [again])

    def submit(self, group: Sequence[Recipe]) -> None:
        commands = [_build(r, self.state) for r in group]
        self.made += group
        for c in commands:
            if isinstance(c.operation, rules.Send):
                self.message_ids.add(c.operation.message_id)
        answers = self.run(self.script_answers(commands))
        back, entries = self.run(self.read_back())
        tried = []
        for order in itertools.permutations(range(len(commands))):
            state = self.state
            decided: list[Answer] = [()] * len(commands)
            for i in order:
                decision = rules.decide(state, commands[i])
                decided[i], state = rules_answer(decision), decision.state
            if decided == answers and state == back:
                self.state = state
                self.appended += sum(answer[0] == "accepted" for answer in answers)
                assert entries == self.appended, "the log holds other entries than the accepted events"
                self.seen.update(str(answer[0]) for answer in answers)
                return
            tried.append((order, decided, state == back))
        raise AssertionError(
            f"the script answered {answers}\nfor {[(c.actor, c.operation, c.expected_seq) for c in commands]}"
            f"\nthe rules, in each order (answers, same state): {tried}\nrules' state before: {self.state}"
            f"\nscript's state after: {back}"
        )

    async def script_answers(self, commands: list[rules.Command]) -> list[Answer]:
        results = await asyncio.gather(*(self.appender.append(c) for c in commands), return_exceptions=True)
        return [await self.script_answer(c, r) for c, r in zip(commands, results, strict=True)]

    async def script_answer(self, command: rules.Command, result: Appended | BaseException) -> Answer:
        if isinstance(result, CommandRefused):
            return ("refused", result.reason, result.detail)
        if not isinstance(result, Appended):
            raise result
        position = result.position
        assert position.partition == self.layout.partition_for(command.conversation_id)
        stream = self.layout.stream_key(position.partition)
        found: Any = await self.redis.xrange(stream, position.stream_id, position.stream_id)
        [(_, fields)] = found
        event: bytes = fields[b"e"]
        assert event.startswith(b'{"seq":%d,' % result.seq)
        if result.replayed:
            assert b'"conversation_id":"%s"' % command.conversation_id.encode() in event
            return ("replayed", result.seq, result.memo)
        return ("accepted", result.seq, event)

    async def read_back(self) -> tuple[rules.State, int]:
        """The script's state as the rules' model (every key it keeps, each field accounted for), and how
        many entries the log holds."""
        layout = self.layout
        keys = {cid: layout.conversation_key(layout.partition_for(cid), cid) for cid in CONVERSATIONS}
        idempotency = sorted(self.keys)
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.values():
            pipe.hgetall(key)
        for user, k in idempotency:
            pipe.get(layout.idempotency_claim_key(user, k))
            for partition in range(PARTITIONS):
                pipe.get(layout.idempotency_key(partition, user, k))
        for partition in range(PARTITIONS):
            pipe.xlen(layout.stream_key(partition))
        replies = iter(await pipe.execute())
        hashes = {cid: next(replies) for cid in keys}
        claims, records = {}, {}
        for user, k in idempotency:
            if (claim := next(replies)) is not None:
                claims[user, k] = claim.decode()
            found = [r.decode().split("\n", 3) for r in (next(replies) for _ in range(PARTITIONS)) if r]
            assert len(found) <= 1, "a key recorded on two partitions"
            for fingerprint, seq, _, memo in found:
                records[user, k] = rules.Record(fingerprint, int(seq), memo)
        entries = sum(next(replies) for _ in range(PARTITIONS))
        conversations = {}
        for cid, fields in hashes.items():
            if fields:
                conversations[cid] = await self.conversation_back(keys[cid], fields)
        return rules.State(conversations, claims, records), entries

    async def conversation_back(self, key: str, raw: dict[bytes, bytes]) -> rules.Conversation:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        seq, creator, count = int(fields.pop("seq")), fields.pop("creator"), int(fields.pop("k", "0"))
        buckets, given = int(fields.pop("b", "1")), int(fields.pop("n", "0"))
        assert fields.pop("v") == "2"
        kept: dict[str, dict[str, str]] = {"m": {}, "r": {}, "a": {}, "u": {}}
        for name, value in fields.items():
            kind, user = name.split(":", 1)
            kept[kind][user] = value
        assert set(kept["m"].values()) | set(kept["a"].values()) <= {"1"}
        ordinals = {int(o): user for user, o in kept["u"].items()}
        assert sorted(ordinals) == list(range(1, given + 1))
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(buckets):
            pipe.hgetall(f"{key}#{bucket}")
        pipe.exists(f"{key}#{buckets}")
        *stored, beyond = await pipe.execute()
        assert not beyond
        by_field = {message_field(m): m for m in self.message_ids}
        messages = {}
        for bucket, entries in enumerate(stored):
            for f, value in entries.items():
                assert bucket_of(f, buckets) == bucket
                messages[by_field[f]] = rules.Message(ordinals[abs(int(value))], int(value) < 0)
        assert len(messages) == count
        return rules.Conversation(
            seq, creator, frozenset(kept["m"]), messages,
            {user: int(marker) for user, marker in kept["r"].items()}, frozenset(kept["a"]),
        )  # fmt: skip


@pytest.fixture
def loop() -> Any:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_the_append_script_decides_as_the_rules(
    contract_redis_url: str, loop: asyncio.AbstractEventLoop
) -> None:
    client = aioredis.Redis.from_url(contract_redis_url)
    ScriptMatchesRules.redis, ScriptMatchesRules.loop, ScriptMatchesRules.seen = client, loop, Counter()
    try:
        run_state_machine_as_test(
            ScriptMatchesRules,
            settings=settings(
                max_examples=30, stateful_step_count=50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )  # fmt: skip
    finally:
        loop.run_until_complete(client.aclose())
    seen = ScriptMatchesRules.seen
    assert seen["accepted"] >= 0.1 * seen.total() and seen["replayed"], seen  # the histories did things
