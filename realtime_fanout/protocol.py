"""One connection's protocol, sans I/O: fed client messages, live items, signals and the time; drained of
frames to send and of requests for the I/O layer (splice history, publish typing); it decides every close.

Phases: HANDSHAKE (an `auth` first, or a token offered in the upgrade; at most `auth_timeout_s` between
messages), SUBSCRIBING (the I/O layer splices history into the `Session`; the client is not read),
SERVING (token refresh and expiry, typing; one subscribe per connection), CLOSED. The send budget (the
session's pending bytes plus queued control frames, at most `max_buffer_bytes`) is enforced on every input.
Times are epoch seconds (tokens' `exp` are); the caller passes its clock.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable

from realtime_fanout import closecodes
from realtime_fanout.cursor import Cursor
from realtime_fanout.exceptions import ProtocolViolation
from realtime_fanout.frames import (
    Auth,
    AuthenticatedFrame,
    ErrorFrame,
    ResyncFrame,
    Subscribe,
    Typing,
    decode_client_message,
    encode_frame,
)
from realtime_fanout.item import Item
from realtime_fanout.membership import Span
from realtime_fanout.session import Session
from servicekit.auth import Principal, TokenVerifier
from servicekit.exceptions import AuthError
from servicekit.slots import UserSlots


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    SUBSCRIBING = "subscribing"
    SERVING = "serving"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The per-connection limits the protocol enforces (the fanout's settings say their defaults)."""

    auth_timeout_s: float
    max_buffer_bytes: int
    max_message_bytes: int
    max_batch: int


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """How the connection ends: `code` and `reason`, and the error frame sent first when `detail` is given
    (a client's mistake); a buffer overflow or an internal error closes without one."""

    code: int
    reason: str
    detail: str | None = None

    def frame(self) -> bytes | None:
        return None if self.detail is None else encode_frame(ErrorFrame(self.reason, self.detail))


class ConnectionProtocol:
    """The state of one connection's protocol; every method is non-blocking and does no I/O."""

    __slots__ = (
        "_control", "_control_bytes", "_farewell_sent", "_held", "_quiet_until", "_requests", "_slot_taken",
        "close", "conversations", "limits", "phase", "principal", "session", "slots", "verifier",
    )  # fmt: skip

    def __init__(
        self, verifier: TokenVerifier, limits: Limits, now: float, slots: UserSlots | None = None
    ) -> None:
        self.verifier = verifier
        self.limits = limits
        self.slots = slots
        self.phase = Phase.HANDSHAKE
        self.principal: Principal | None = None
        self.conversations: frozenset[str] | None = None
        self.session: Session | None = None
        self.close: Close | None = None
        self._slot_taken = False
        self._farewell_sent = False
        self._quiet_until = now + limits.auth_timeout_s  # the handshake's deadline for the next message
        self._control: list[bytes] = []
        self._control_bytes = 0
        self._held: list[bytes] | None = []  # presence frames wait for the snapshot
        self._requests: list[Subscribe | Typing] = []

    @property
    def closing(self) -> bool:
        return self.close is not None

    @property
    def user_id(self) -> str:
        assert self.principal is not None
        return self.principal.user_id

    # Inputs from the client and the clock.

    def offer_token(self, token: str) -> None:
        """A token offered with the upgrade (subprotocol or query): authenticate as an `auth` would."""
        self._authenticate(token)

    def receive_text(self, text: str, now: float) -> None:
        """One text message from the client."""
        if self.close is not None or self.phase is Phase.SUBSCRIBING:
            return
        try:
            message = decode_client_message(text, self.limits.max_message_bytes)
        except ProtocolViolation as exc:
            self._fail(closecodes.PROTOCOL_ERROR, "protocol-error", str(exc))
            return
        if isinstance(message, Auth):
            self._authenticate(message.token)
        elif self.phase is Phase.SERVING:
            if isinstance(message, Typing):
                self._requests.append(message)
            else:
                self._fail(closecodes.PROTOCOL_ERROR, "already-subscribed", "subscribe once per connection")
        elif self.principal is None:
            self._fail(closecodes.UNAUTHORIZED, "missing-token", "the first message must be auth")
        elif isinstance(message, Typing):
            self._fail(closecodes.PROTOCOL_ERROR, "protocol-error", "subscribe before typing")
        else:
            self.phase = Phase.SUBSCRIBING
            self.conversations = None if message.conversations is None else frozenset(message.conversations)
            self._requests.append(message)
        if self.phase is Phase.HANDSHAKE:
            self._quiet_until = now + self.limits.auth_timeout_s

    def receive_binary(self) -> None:
        """A binary message from the client: the protocol is text only."""
        if self.close is None and self.phase is not Phase.SUBSCRIBING:
            self._fail(closecodes.PROTOCOL_ERROR, "protocol-error", "send text frames")

    def tick(self, now: float) -> None:
        """Time passed: a handshake that went quiet too long, or a token that expired, closes 4401."""
        if self.close is not None:
            return
        if self.phase is Phase.HANDSHAKE and now >= self._quiet_until:
            self._fail(closecodes.UNAUTHORIZED, "auth-timeout", "authenticate first")
        elif self.phase is Phase.SERVING and self.principal is not None and now >= self.principal.expires_at:
            self._fail(closecodes.UNAUTHORIZED, "token-expired", "send a fresh auth before expiry")

    def deadline(self) -> float | None:
        """When `tick` must be called next (None: no deadline in this phase)."""
        if self.close is not None:
            return None
        if self.phase is Phase.HANDSHAKE:
            return self._quiet_until
        if self.phase is Phase.SERVING and self.principal is not None:
            return self.principal.expires_at
        return None

    # Inputs from the I/O layer's splice.

    def attached(
        self, cursor: Cursor, seed: Iterable[Span], replayable: Callable[[Item], bool] | None = None
    ) -> Session:
        """The hub attached this connection: live items buffer from now on in the returned session, which
        starts at `cursor` (the client's, or the hub's positions) and replays what `replayable` admits."""
        self.session = Session(
            self.user_id, cursor, conversations=self.conversations, seed=seed,
            max_batch=self.limits.max_batch, replayable=replayable,
        )  # fmt: skip
        return self.session

    def resync(self, position: str, reason: str) -> None:
        """The client's cursor cannot be served: tell it where it starts instead."""
        self._queue_control(encode_frame(ResyncFrame(position, reason)))

    def feed_replay(self, items: Iterable[Item]) -> None:
        assert self.session is not None
        if self.close is None:
            self.session.feed_replay(items)
            self._check_budget()

    def replay_done(self) -> None:
        """History is spliced: serve from now on (token expiry applies)."""
        assert self.session is not None
        if self.close is None:
            self.session.replay_done()
            self.phase = Phase.SERVING

    def fail(self, code: int, reason: str, detail: str) -> None:
        """The I/O layer cannot go on (e.g. the log is unreadable): close with an error frame."""
        self._fail(code, reason, detail)

    def abort(self) -> None:
        """A bug in handling this connection: close 1011 without an error frame."""
        self._end(Close(closecodes.INTERNAL_ERROR, "internal-error"))

    # Inputs from the hub and the signal bus.

    def offer(self, item: Item) -> bool:
        """A live item; closes 4008 when the send budget overflows. Returns whether still open (the hot
        path: one call per delivery)."""
        session = self.session
        if session is None or self.close is not None:
            return self.close is None
        session.feed_live(item)
        if self._control_bytes + session.pending_bytes > self.limits.max_buffer_bytes:
            self._end(Close(closecodes.SLOW_CONSUMER, "slow-consumer"))
            return False
        return True

    def signal(self, frame: bytes, *, presence: bool) -> None:
        """An ephemeral frame (typing, presence); presence frames wait for the presence snapshot."""
        if self.close is not None:
            return
        if presence and self._held is not None:
            self._held.append(frame)
            return
        self._queue_control(frame)

    def presence_ready(self, snapshot: bytes | None) -> None:
        """Queue the presence snapshot, then the presence frames that arrived while it was read."""
        held, self._held = self._held or [], None
        for frame in ([snapshot] if snapshot is not None else []) + held:
            self._queue_control(frame)

    # Outputs.

    def data_to_send(self) -> list[bytes]:
        """Every frame to send now, in order: control frames first, then the session's. Once closing: only
        the error frame (if the close has one), once."""
        if self.close is not None:
            frame, self._farewell_sent = (None if self._farewell_sent else self.close.frame()), True
            self._control, self._control_bytes = [], 0
            return [frame] if frame is not None else []
        control, self._control = self._control, []
        self._control_bytes = 0
        if self.session is not None:
            control += self.session.frames()
        return control

    def next_request(self) -> Subscribe | Typing | None:
        """What the I/O layer must do next: splice history for a `Subscribe`, publish a `Typing`."""
        return self._requests.pop(0) if self._requests else None

    def finish(self) -> None:
        """The connection is gone: give back the user's slot (idempotent)."""
        if self._slot_taken and self.slots is not None and self.principal is not None:
            self.slots.give_back(self.principal.user_id)
        self._slot_taken = False
        if self.close is None:
            self.phase = Phase.CLOSED

    # Internals.

    def _authenticate(self, token: str) -> None:
        try:
            principal = self.verifier.verify(token)
        except AuthError as exc:
            self._fail(closecodes.UNAUTHORIZED, exc.reason, exc.detail)
            return
        if self.principal is not None and principal.user_id != self.principal.user_id:
            self._fail(closecodes.FORBIDDEN, "user-mismatch", "a refresh token must name the same user")
            return
        if self.slots is not None and not self._slot_taken:
            if not self.slots.take(principal.user_id):
                detail = f"at most {self.slots.limit} connections per user"
                self._fail(closecodes.TOO_MANY_CONNECTIONS, "too-many-connections", detail)
                return
            self._slot_taken = True
        # Only the subject and the expiry are used from here on; the claims would be kept per connection.
        self.principal = dataclasses.replace(principal, claims={})
        self._control.append(encode_frame(AuthenticatedFrame(principal.user_id, principal.expires_at)))

    def _queue_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._control_bytes += len(frame)
        self._check_budget()

    @property
    def pending_bytes(self) -> int:
        """Bytes queued to send (control frames and the session's): what the send budget bounds."""
        return self._control_bytes + (self.session.pending_bytes if self.session is not None else 0)

    def _check_budget(self) -> None:
        if self.pending_bytes > self.limits.max_buffer_bytes:
            self._end(Close(closecodes.SLOW_CONSUMER, "slow-consumer"))

    def _fail(self, code: int, reason: str, detail: str) -> None:
        self._end(Close(code, reason, detail))

    def _end(self, close: Close) -> None:
        if self.close is None and self.phase is not Phase.CLOSED:
            self.close = close
            self.phase = Phase.CLOSED
