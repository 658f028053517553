"""The wire protocol's JSON frames (msgspec): what clients send and what the server sends back.

Server → client (`type`):
  event    {"type":"event","cursor":C,"event":E}              one event; C is the cursor just after it
  events   {"type":"events","cursor":C,"events":[E, ...]}     a batch, in log order; C is after the last
  live     {"type":"live","cursor":C}                          history is done, what follows is live
  resync   {"type":"resync","position":C,"reason":R}           the cursor cannot be served; C is the head
  authenticated {"type":"authenticated","user_id":U,"expires_at":T}
  error    {"type":"error","reason":R,"detail":D}              sent just before a protocol-error close
  unread   {"type":"unread","conversation_id":C,"unread":N,"read_seq":R,"seq":S}   after the event at S
  read     {"type":"read","conversation_id":C,"user_id":U,"up_to_seq":S,"seq":Q}   a read receipt
  typing   {"type":"typing","conversation_id":C,"user_id":U,"state":"start"|"stop"}  ephemeral
  presence {"type":"presence","user_id":U,"online":B,"last_seen":T|null}         ephemeral transition
  presence_snapshot {"type":"presence_snapshot","users":[{"user_id","online","last_seen"}, ...]}
Client → server: {"type":"auth","token":T}, {"type":"subscribe","cursor":C?,"conversations":[...]?} and,
after subscribe, {"type":"typing","conversation_id":C,"state":"start"|"stop"}.
"""

from __future__ import annotations

import msgspec

from realtime_fanout.exceptions import ProtocolViolation
from realtime_fanout.presence import PresenceEntry
from realtime_fanout.signals import TypingState

MAX_CLIENT_MESSAGE_BYTES = 16_384


class Auth(msgspec.Struct, frozen=True, tag="auth", tag_field="type"):
    """Authenticate (first message), or refresh the token of a running session."""

    token: str


class Subscribe(msgspec.Struct, frozen=True, tag="subscribe", tag_field="type"):
    """Start streaming: after `cursor` when given (else from now), narrowed to `conversations` if given."""

    cursor: str | None = None
    conversations: list[str] | None = None


class Typing(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    """The sender started or stopped typing in a conversation (ignored unless a current participant)."""

    conversation_id: str
    state: TypingState


ClientMessage = Auth | Subscribe | Typing

_client_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)


def decode_client_message(data: str | bytes, max_bytes: int = MAX_CLIENT_MESSAGE_BYTES) -> ClientMessage:
    """Parse one client frame.

    Raises:
        ProtocolViolation: too large, not JSON, or not a known message.
    """
    if len(data) > max_bytes:
        raise ProtocolViolation(f"client messages are at most {max_bytes} bytes")
    try:
        return _client_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolViolation(str(exc)) from None


class EventFrame(msgspec.Struct, frozen=True, tag="event", tag_field="type"):
    cursor: str
    event: msgspec.Raw


class EventsFrame(msgspec.Struct, frozen=True, tag="events", tag_field="type"):
    cursor: str
    events: list[msgspec.Raw]


class LiveFrame(msgspec.Struct, frozen=True, tag="live", tag_field="type"):
    cursor: str


class ResyncFrame(msgspec.Struct, frozen=True, tag="resync", tag_field="type"):
    position: str
    reason: str


class AuthenticatedFrame(msgspec.Struct, frozen=True, tag="authenticated", tag_field="type"):
    user_id: str
    expires_at: float


class ErrorFrame(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    reason: str
    detail: str = ""


class UnreadFrame(msgspec.Struct, frozen=True, tag="unread", tag_field="type"):
    """The user's unread count and read marker in a conversation, as of the event at `seq`."""

    conversation_id: str
    unread: int
    read_seq: int
    seq: int


class ReadFrame(msgspec.Struct, frozen=True, tag="read", tag_field="type"):
    """A read receipt: `user_id` read the conversation up to `up_to_seq` (event at `seq`)."""

    conversation_id: str
    user_id: str
    up_to_seq: int
    seq: int


class TypingFrame(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    """`user_id` started or stopped typing in `conversation_id` (a stop also follows an expired start)."""

    conversation_id: str
    user_id: str
    state: TypingState


class PresenceFrame(msgspec.Struct, frozen=True, tag="presence", tag_field="type"):
    """`user_id` went online, or offline (`last_seen` in unix seconds; null while online)."""

    user_id: str
    online: bool
    last_seen: float | None


class PresenceSnapshotFrame(msgspec.Struct, frozen=True, tag="presence_snapshot", tag_field="type"):
    """Presence of everyone sharing a conversation with you, sent once after subscribe."""

    users: list[PresenceEntry]


ServerFrame = (
    EventFrame
    | EventsFrame
    | LiveFrame
    | ResyncFrame
    | AuthenticatedFrame
    | ErrorFrame
    | UnreadFrame
    | ReadFrame
    | TypingFrame
    | PresenceFrame
    | PresenceSnapshotFrame
)

_encoder = msgspec.json.Encoder()
_server_decoder: msgspec.json.Decoder[ServerFrame] = msgspec.json.Decoder(ServerFrame)


def encode_frame(frame: ServerFrame) -> bytes:
    return _encoder.encode(frame)


def decode_server_frame(data: str | bytes) -> ServerFrame:
    """Parse one server frame (for clients); raises msgspec.DecodeError when it is not one."""
    return _server_decoder.decode(data)
