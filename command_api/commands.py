"""Turn validated requests into log commands and their events: pure, no I/O.

Each builder returns the `Command` the append script decides on (its operation typed, `rules.py`), with
the event it will append (its envelope minus `seq`) and the memo an idempotent replay answers with.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from command_api import rules
from command_api.bodies import (
    MAX_PARTICIPANTS,
    MAX_TITLE_CHARS,
    AddParticipant,
    CreateConversation,
    EditMessage,
    MarkRead,
    SendMessage,
    check_conversation_id,
    check_id,
    clean_text,
)
from command_api.exceptions import CommandInvalid
from command_api.rules import Command, Operation
from events import schema
from events.codec import encode_unsequenced_tail
from events.ids import chosen_conversation_id, new_event_id, new_object_id

_CONVERSATION_NAMESPACE = uuid.UUID("5b0c4b8e-2f4e-4c55-9a53-7c1b0b6d8f21")


class Memo(msgspec.Struct, frozen=True):
    """What a command's answer needs besides its position; stored for idempotent replays."""

    event_id: str
    message_id: str | None = None


_memo_encoder = msgspec.json.Encoder()
_memo_decoder = msgspec.json.Decoder(Memo)


def decode_memo(text: str) -> Memo:
    return _memo_decoder.decode(text)


@dataclass(frozen=True, slots=True)
class Context:
    """Who asks, and the request-level facts every command carries."""

    actor: str
    idempotency_key: str = ""
    correlation_id: str = ""
    causation_id: str | None = None
    expected_seq: int | None = None
    max_body_chars: int = 4000


def _fingerprint(*parts: object) -> str:
    digest = hashlib.sha256(b"\x1f".join(str(p).encode() for p in parts))
    return digest.hexdigest()[:32]


def _command(
    ctx: Context,
    operation: Operation,
    conversation_id: str,
    payload: schema.AnyPayload,
    fingerprint_parts: tuple[object, ...],
    *,
    message_id: str | None = None,
) -> Command:
    check_conversation_id(conversation_id)
    event_id = new_event_id()
    envelope = schema.UnsequencedEnvelope(
        event_id=event_id,
        schema_version=payload.VERSION,
        occurred_at=datetime.now(UTC),
        actor=ctx.actor,
        conversation_id=conversation_id,
        correlation_id=ctx.correlation_id or event_id,
        causation_id=ctx.causation_id,
        idempotency_key=ctx.idempotency_key or None,
        payload=payload,
    )
    return Command(
        conversation_id=conversation_id,
        actor=ctx.actor,
        operation=operation,
        event_tail=encode_unsequenced_tail(envelope),
        memo=_memo_encoder.encode(Memo(event_id, message_id)).decode(),
        fingerprint=_fingerprint(operation.OP, conversation_id, ctx.expected_seq, *fingerprint_parts)
        if ctx.idempotency_key
        else "",
        idempotency_key=ctx.idempotency_key,
        expected_seq=ctx.expected_seq,
    )


def create_conversation(ctx: Context, body: CreateConversation) -> Command:
    """The conversation id is the client's in the creator's namespace (so a taken id only ever
    reveals one's own conversation), else derived from the idempotency key (so a retry lands on the
    same partition and finds its record), else fresh."""
    if body.conversation_id is not None:
        conversation_id = chosen_conversation_id(ctx.actor, check_id(body.conversation_id, "conversation_id"))
    elif ctx.idempotency_key:
        conversation_id = str(uuid.uuid5(_CONVERSATION_NAMESPACE, f"{ctx.actor}\n{ctx.idempotency_key}"))
    else:
        conversation_id = new_object_id()
    return create_conversation_with_id(ctx, body, conversation_id)


def create_conversation_with_id(ctx: Context, body: CreateConversation, conversation_id: str) -> Command:
    """Create under exactly `conversation_id`, for trusted in-process writers (tests, benchmarks):
    clients only reach `create_conversation`, which puts the id they chose in their namespace."""
    title = clean_text(body.title, "title", MAX_TITLE_CHARS)
    if len(body.participants) > MAX_PARTICIPANTS:
        raise CommandInvalid("too-many-participants", f"at most {MAX_PARTICIPANTS} participants")
    others = [check_id(p, "participants[]") for p in body.participants]
    participants = tuple(dict.fromkeys([ctx.actor, *others]))
    payload = schema.ConversationCreated(title=title, participants=participants)
    return _command(
        ctx, rules.Create(participants), conversation_id, payload, (title, participants, body.conversation_id)
    )


def add_participant(ctx: Context, conversation_id: str, body: AddParticipant) -> Command:
    user_id = check_id(body.user_id, "user_id")
    payload = schema.ParticipantAdded(user_id=user_id)
    return _command(ctx, rules.Add(user_id), conversation_id, payload, (user_id,))


def remove_participant(ctx: Context, conversation_id: str, user_id: str) -> Command:
    check_id(user_id, "user_id")
    payload = schema.ParticipantRemoved(user_id=user_id)
    return _command(ctx, rules.Remove(user_id), conversation_id, payload, (user_id,))


def send_message(ctx: Context, conversation_id: str, body: SendMessage) -> Command:
    text = clean_text(body.body, "body", ctx.max_body_chars)
    reply_to = None if body.reply_to is None else check_id(body.reply_to, "reply_to")
    if body.message_id is not None:
        message_id = check_id(body.message_id, "message_id")
    else:
        message_id = new_object_id()
    payload = schema.MessageSent(message_id=message_id, body=text, reply_to=reply_to)
    return _command(
        ctx,
        rules.Send(message_id, reply_to),
        conversation_id,
        payload,
        (text, reply_to, body.message_id),
        message_id=message_id,
    )


def edit_message(ctx: Context, conversation_id: str, message_id: str, body: EditMessage) -> Command:
    check_id(message_id, "message_id")
    text = clean_text(body.body, "body", ctx.max_body_chars)
    payload = schema.MessageEdited(message_id=message_id, body=text)
    return _command(
        ctx, rules.Edit(message_id), conversation_id, payload, (message_id, text), message_id=message_id
    )


def delete_message(ctx: Context, conversation_id: str, message_id: str) -> Command:
    check_id(message_id, "message_id")
    payload = schema.MessageDeleted(message_id=message_id)
    return _command(
        ctx, rules.Delete(message_id), conversation_id, payload, (message_id,), message_id=message_id
    )


def mark_read(ctx: Context, conversation_id: str, body: MarkRead) -> Command:
    if body.up_to_seq < 1:
        raise CommandInvalid("invalid-body", "up_to_seq must be at least 1")
    payload = schema.MessagesRead(up_to_seq=body.up_to_seq)
    return _command(ctx, rules.Read(body.up_to_seq), conversation_id, payload, (body.up_to_seq,))


def archive(ctx: Context, conversation_id: str) -> Command:
    return _command(ctx, rules.Archive(), conversation_id, schema.ConversationArchived(), ())


def unarchive(ctx: Context, conversation_id: str) -> Command:
    return _command(ctx, rules.Unarchive(), conversation_id, schema.ConversationUnarchived(), ())
