"""The write side's rules (`command_api/rules.py`) as a table, without Redis: every refusal in its order, what
each accepted operation changes, and idempotency. tests/test_commands_rules_script.py holds the script to them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from importlib.resources import files

import pytest

from command_api import rules
from command_api.append import operation_args
from command_api.rules import (
    Accepted,
    Add,
    Archive,
    Command,
    Conversation,
    Create,
    Delete,
    Edit,
    Message,
    Operation,
    Read,
    Refused,
    Remove,
    Replayed,
    Send,
    State,
    Unarchive,
    decide,
)

TAIL = b'"type":"x"}'

BASE = State(
    conversations={
        "c": Conversation(
            seq=5,
            creator="alice",
            members=frozenset({"alice", "bob", "dave"}),
            messages={"m1": Message("alice"), "m2": Message("bob", deleted=True), "m3": Message("bob")},
            read={"bob": 3, "carol": 2},  # carol left: her marker stays
            archived=frozenset({"bob"}),
        )
    }
)


def command(
    actor: str,
    operation: Operation,
    cid: str = "c",
    *,
    key: str = "",
    fp: str = "",
    expected: int | None = None,
) -> Command:
    return Command(cid, actor, operation, TAIL, "memo-" + actor, fp, key, expected)


def reason(decision: rules.Decision) -> str:
    return decision.reason if isinstance(decision, Refused) else "ok"


REFUSALS = [
    # Existence is private: the same refusal for a stranger as for a missing conversation, before any other.
    ("carol", Send("new"), None, "conversation-not-found"),
    ("carol", Send("m1"), 0, "conversation-not-found"),
    ("carol", Read(99), None, "conversation-not-found"),
    ("zoe", Remove("bob"), None, "conversation-not-found"),
    ("alice", Create(("bob",)), 3, "conversation-exists"),
    ("zoe", Create(()), None, "conversation-exists"),  # chosen ids are namespaced by the builder, not here
    ("alice", Send("m1"), 4, "sequence-mismatch"),
    ("alice", Archive(), 6, "sequence-mismatch"),
    ("alice", Send("m1"), None, "message-id-taken"),
    ("alice", Send("m2"), 5, "message-id-taken"),  # a deleted message's id stays taken
    ("alice", Send("new", reply_to="nope"), None, "reply-target-not-found"),
    ("alice", Send("new", reply_to="m2"), None, "ok"),  # a deleted message may be replied to
    ("alice", Edit("nope"), None, "message-not-found"),
    ("bob", Edit("m2"), None, "message-deleted"),
    ("alice", Delete("m2"), None, "message-deleted"),  # deleted before not-the-author
    ("bob", Edit("m1"), None, "not-the-author"),
    ("alice", Delete("m3"), None, "not-the-author"),
    ("alice", Edit("m1"), 5, "ok"),
    ("alice", Add("bob"), None, "already-a-participant"),
    ("bob", Add("carol"), None, "ok"),  # any participant may add
    ("bob", Remove("carol"), None, "participant-not-found"),
    ("bob", Remove("alice"), None, "creator-cannot-leave"),
    ("alice", Remove("alice"), None, "creator-cannot-leave"),
    ("bob", Remove("dave"), None, "removal-forbidden"),
    ("bob", Remove("bob"), None, "ok"),
    ("alice", Remove("dave"), None, "ok"),
    ("alice", Read(6), None, "read-beyond-end"),
    ("bob", Read(3), None, "read-marker-not-advanced"),
    ("bob", Read(2), None, "read-marker-not-advanced"),
    ("bob", Read(4), None, "ok"),
    ("alice", Read(5), None, "ok"),
    ("bob", Archive(), None, "already-archived"),
    ("alice", Unarchive(), None, "not-archived"),
    ("alice", Archive(), None, "ok"),
    ("bob", Unarchive(), None, "ok"),
]


@pytest.mark.parametrize(("actor", "operation", "expected", "outcome"), REFUSALS)
def test_each_rule_in_its_order(actor: str, operation: Operation, expected: int | None, outcome: str) -> None:
    decision = decide(BASE, command(actor, operation, expected=expected))
    assert reason(decision) == outcome
    if isinstance(decision, Refused):
        assert decision.state == BASE  # a refusal (without a key) changes nothing


@pytest.mark.parametrize(
    ("actor", "operation", "detail"),
    [("alice", Send("x"), "5"), ("alice", Read(9), "5"), ("bob", Read(1), "3")],
)
def test_the_refusals_that_carry_a_sequence(actor: str, operation: Operation, detail: str) -> None:
    expected = 1 if isinstance(operation, Send) else None
    decision = decide(BASE, command(actor, operation, expected=expected))
    assert isinstance(decision, Refused) and decision.detail == detail


def test_a_creation_makes_the_creator_a_member_at_seq_1() -> None:
    decision = decide(State(), command("alice", Create(("bob", "carol")), "new", expected=0))
    assert isinstance(decision, Accepted)
    assert (decision.seq, decision.event) == (1, b'{"seq":1,' + TAIL)
    created = decision.state.conversations["new"]
    assert created == Conversation(1, "alice", frozenset({"alice", "bob", "carol"}))
    assert reason(decide(State(), command("alice", Create(()), "new", expected=1))) == "sequence-mismatch"


def test_what_each_accepted_operation_changes() -> None:
    def after(actor: str, operation: Operation) -> Conversation:
        decision = decide(BASE, command(actor, operation))
        assert isinstance(decision, Accepted), decision
        assert decision.seq == 6 and decision.event == b'{"seq":6,' + TAIL
        changed = decision.state.conversations["c"]
        assert changed.seq == 6
        return replace(changed, seq=5)

    c = BASE.conversations["c"]
    assert after("bob", Send("m4", reply_to="m1")).messages == {**c.messages, "m4": Message("bob")}
    assert after("alice", Edit("m1")) == c
    assert after("bob", Delete("m3")).messages == {**c.messages, "m3": Message("bob", deleted=True)}
    assert after("bob", Add("carol")).members == c.members | {"carol"}
    # Leaving drops the archive mark and keeps the read marker.
    assert after("alice", Remove("bob")) == replace(c, members=c.members - {"bob"}, archived=frozenset())
    assert after("dave", Read(4)).read == {**c.read, "dave": 4}
    assert after("alice", Archive()).archived == {"alice", "bob"}
    assert after("bob", Unarchive()).archived == frozenset()


def test_a_returning_participant_finds_their_read_marker_and_their_messages() -> None:
    state = BASE
    for step in (command("bob", Remove("bob")), command("alice", Add("bob"))):
        decision = decide(state, step)
        assert isinstance(decision, Accepted)
        state = decision.state
    assert reason(decide(state, command("bob", Read(3)))) == "read-marker-not-advanced"
    assert reason(decide(state, command("bob", Edit("m3")))) == "ok"
    assert state.conversations["c"].archived == frozenset()


def test_an_idempotency_key_replays_its_answer_and_refuses_another_request() -> None:
    first = decide(BASE, command("bob", Send("k1"), key="k", fp="A"))
    assert isinstance(first, Accepted)
    state = first.state
    assert state.claims == {("bob", "k"): "A"}
    assert state.records == {("bob", "k"): rules.Record("A", 6, "memo-bob")}
    retry = decide(state, command("bob", Send("k1"), key="k", fp="A"))
    assert retry == Replayed(6, "memo-bob", state)
    other = decide(state, command("bob", Send("k2"), key="k", fp="B"))
    assert other == Refused("idempotency-key-reused", "", state)
    # Keys are per user; the same key of another user is theirs.
    assert reason(decide(state, command("alice", Send("k2"), key="k", fp="B"))) == "ok"


def test_a_refused_keyed_command_binds_its_key_and_may_be_retried() -> None:
    refused = decide(BASE, command("carol", Send("x"), key="k", fp="A"))
    assert refused == Refused("conversation-not-found", "", replace(BASE, claims={("carol", "k"): "A"}))
    state = refused.state
    assert reason(decide(state, command("carol", Send("y"), key="k", fp="B"))) == "idempotency-key-reused"
    added = decide(state, command("alice", Add("carol")))
    assert isinstance(added, Accepted)
    retried = decide(added.state, command("carol", Send("x"), key="k", fp="A"))
    assert isinstance(retried, Accepted) and retried.seq == 7


def test_a_record_of_another_request_refuses_even_without_a_claim() -> None:
    state = replace(BASE, records={("bob", "k"): rules.Record("A", 4, "m")})
    assert reason(decide(state, command("bob", Send("x"), key="k", fp="B"))) == "idempotency-key-reused"
    assert decide(state, command("bob", Send("x"), key="k", fp="A")) == Replayed(
        4, "m", replace(state, claims={("bob", "k"): "A"})
    )


def test_the_script_names_each_operations_arguments_as_the_appender_sends_them() -> None:
    lua = files("command_api").joinpath("append.lua").read_text()
    table = re.search(r"local OPERATIONS = \{(.*?)\n\}", lua, re.S)
    assert table is not None
    named = {
        op: re.findall(r"'(\w+)'", names) for op, names in re.findall(r"(\w+) = \{([^}]*)\}", table.group(1))
    }
    examples: list[Operation] = [
        Create(("a", "b")), Send("m", "r"), Edit("m"), Delete("m"), Add("u"), Remove("u"), Read(3),
        Archive(), Unarchive(),
    ]  # fmt: skip
    assert set(named) == {e.OP for e in examples}
    for example in examples:
        if not isinstance(example, Create):  # one argument per participant
            assert len(operation_args(example)) == len(named[example.OP]), example.OP
