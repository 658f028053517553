"""The write side's rules, written once as pure code: what a command decides, given the state it meets.

`decide(state, command)` is the specification of the append script (`append.lua`, with the per-user key
claim `claim.lua` the appender runs first): the script is its atomic executor in Redis and gives the same
answer and leaves the same state for every command (tests/test_commands_rules_script.py drives random
histories through both, on Redis 6.2 and 7). No I/O. What the rules do not cover: the log's own failures
(a missing log or a changed epoch, answered before any command) and expiry (a claim and a record live for
the idempotency TTL; `State` holds those alive).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, assert_never


@dataclass(frozen=True, slots=True)
class Create:
    """Create the conversation; its members are the actor and `participants`."""

    OP: ClassVar[str] = "create"
    participants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Send:
    """Post message `message_id`, a reply to `reply_to` when given."""

    OP: ClassVar[str] = "send"
    message_id: str
    reply_to: str | None = None


@dataclass(frozen=True, slots=True)
class Edit:
    OP: ClassVar[str] = "edit"
    message_id: str


@dataclass(frozen=True, slots=True)
class Delete:
    OP: ClassVar[str] = "delete"
    message_id: str


@dataclass(frozen=True, slots=True)
class Add:
    OP: ClassVar[str] = "add"
    user_id: str


@dataclass(frozen=True, slots=True)
class Remove:
    OP: ClassVar[str] = "remove"
    user_id: str


@dataclass(frozen=True, slots=True)
class Read:
    """Move the actor's read marker to `up_to_seq`."""

    OP: ClassVar[str] = "read"
    up_to_seq: int


@dataclass(frozen=True, slots=True)
class Archive:
    OP: ClassVar[str] = "archive"


@dataclass(frozen=True, slots=True)
class Unarchive:
    OP: ClassVar[str] = "unarchive"


Operation = Create | Send | Edit | Delete | Add | Remove | Read | Archive | Unarchive


@dataclass(frozen=True, slots=True)
class Command:
    """`actor` does `operation` on `conversation_id`, on the request's conditions.

    `event_tail` (the event's JSON envelope without its leading `seq`) and `memo` (what a replay answers
    with) are opaque to the rules; `fingerprint` names the request an Idempotency-Key is bound to.
    """

    conversation_id: str
    actor: str
    operation: Operation
    event_tail: bytes
    memo: str
    fingerprint: str = ""
    idempotency_key: str = ""
    expected_seq: int | None = None

    @property
    def op(self) -> str:
        return self.operation.OP


@dataclass(frozen=True, slots=True)
class Message:
    author: str
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Conversation:
    """What deciding needs of one conversation: never a body, every message however old."""

    seq: int
    creator: str
    members: frozenset[str]
    messages: Mapping[str, Message] = field(default_factory=dict)
    read: Mapping[str, int] = field(default_factory=dict)
    """Read markers, kept when their user leaves (and found again if they come back)."""
    archived: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Record:
    """The answer an accepted keyed command left for its retries."""

    fingerprint: str
    seq: int
    memo: str


Key = tuple[str, str]
"""(user, Idempotency-Key): keys are per user."""


@dataclass(frozen=True, slots=True)
class State:
    """The write side's state. The script keeps records per partition; a key's claim pins it to one
    request, so to one conversation and one partition, and one map says the same."""

    conversations: Mapping[str, Conversation] = field(default_factory=dict)
    claims: Mapping[Key, str] = field(default_factory=dict)
    """The fingerprint each key is bound to: the first request that reached the log with it."""
    records: Mapping[Key, Record] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Accepted:
    """The command's one event, `event`, is appended at `seq`."""

    seq: int
    event: bytes
    state: State


@dataclass(frozen=True, slots=True)
class Replayed:
    """A retry: the original's answer (its `seq`, and its position in the log), nothing appended."""

    seq: int
    memo: str
    state: State


@dataclass(frozen=True, slots=True)
class Refused:
    """Refused with stable slug `reason` (`detail`: the current sequence or read marker, where it applies);
    `state` differs from the one decided on at most by the key's claim, which a refusal keeps."""

    reason: str
    detail: str
    state: State


Decision = Accepted | Replayed | Refused


def decide(state: State, command: Command) -> Decision:
    """The answer to `command` and the state it leaves.

    The order of the checks is part of the rules: the Idempotency-Key first (it is the actor's own), then
    the conversation: to anyone not in it, one refusal, exactly as for a missing one, before any other
    (the expected sequence, messages, participants), so nothing about it shows.
    """
    actor, key = command.actor, command.idempotency_key
    if key:
        held = state.claims.get((actor, key))
        if held is None:
            state = replace(state, claims={**state.claims, (actor, key): command.fingerprint})
        elif held != command.fingerprint:
            return Refused("idempotency-key-reused", "", state)
        record = state.records.get((actor, key))
        if record is not None:
            if record.fingerprint != command.fingerprint:
                return Refused("idempotency-key-reused", "", state)
            return Replayed(record.seq, record.memo, state)
    conversation = state.conversations.get(command.conversation_id)
    refusal = _refusal(conversation, command)
    if refusal is not None:
        return Refused(*refusal, state)
    after = _applied(conversation, command)
    records = state.records
    if key:
        records = {**records, (actor, key): Record(command.fingerprint, after.seq, command.memo)}
    conversations = {**state.conversations, command.conversation_id: after}
    state = replace(state, conversations=conversations, records=records)
    return Accepted(after.seq, b'{"seq":%d,' % after.seq + command.event_tail, state)


def _refusal(conversation: Conversation | None, command: Command) -> tuple[str, str] | None:
    if isinstance(command.operation, Create):
        if conversation is not None:
            return "conversation-exists", ""
    elif conversation is None or command.actor not in conversation.members:
        return "conversation-not-found", ""
    seq = 0 if conversation is None else conversation.seq
    if command.expected_seq is not None and command.expected_seq != seq:
        return "sequence-mismatch", str(seq)
    if conversation is None:
        return None
    return _operation_refusal(conversation, command.actor, command.operation)


def _operation_refusal(c: Conversation, actor: str, operation: Operation) -> tuple[str, str] | None:
    """The refusals a participant may get; None when the operation may run."""
    reason, detail = "", ""
    match operation:
        case Create():
            pass
        case Send(message_id, reply_to):
            if message_id in c.messages:
                reason = "message-id-taken"
            elif reply_to is not None and reply_to not in c.messages:  # a deleted one may be replied to
                reason = "reply-target-not-found"
        case Edit(message_id) | Delete(message_id):
            message = c.messages.get(message_id)
            if message is None:
                reason = "message-not-found"
            elif message.deleted:
                reason = "message-deleted"
            elif message.author != actor:
                reason = "not-the-author"
        case Add(user_id):
            if user_id in c.members:
                reason = "already-a-participant"
        case Remove(user_id):
            if user_id not in c.members:
                reason = "participant-not-found"
            elif user_id == c.creator:
                reason = "creator-cannot-leave"
            elif user_id != actor and actor != c.creator:
                reason = "removal-forbidden"
        case Read(up_to_seq):
            marker = c.read.get(actor)
            if up_to_seq > c.seq:
                reason, detail = "read-beyond-end", str(c.seq)
            elif marker is not None and up_to_seq <= marker:
                reason, detail = "read-marker-not-advanced", str(marker)
        case Archive():
            if actor in c.archived:
                reason = "already-archived"
        case Unarchive():
            if actor not in c.archived:
                reason = "not-archived"
        case _:
            assert_never(operation)
    return (reason, detail) if reason else None


def _applied(c: Conversation | None, command: Command) -> Conversation:
    """The conversation after the accepted `command` (its next sequence included)."""
    actor, operation = command.actor, command.operation
    if c is None:
        assert isinstance(operation, Create)
        return Conversation(1, actor, frozenset((actor, *operation.participants)))
    match operation:
        case Send(message_id):
            c = replace(c, messages={**c.messages, message_id: Message(actor)})
        case Delete(message_id):
            c = replace(c, messages={**c.messages, message_id: Message(c.messages[message_id].author, True)})
        case Add(user_id):
            c = replace(c, members=c.members | {user_id})
        case Remove(user_id):
            c = replace(c, members=c.members - {user_id}, archived=c.archived - {user_id})
        case Read(up_to_seq):
            c = replace(c, read={**c.read, actor: up_to_seq})
        case Archive():
            c = replace(c, archived=c.archived | {actor})
        case Unarchive():
            c = replace(c, archived=c.archived - {actor})
        case Create() | Edit():
            pass
        case _:
            assert_never(operation)
    return replace(c, seq=c.seq + 1)
