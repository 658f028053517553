"""Ephemeral signals (typing, presence), sans I/O: rate limits, typing expiry, who receives what, and the
pub/sub message format. Nothing here touches a socket or a clock; callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from typing import Literal

import msgspec

from realtime_fanout.membership import MembershipIndex

TypingState = Literal["start", "stop"]


class RateLimiter:
    """Token bucket per key: `rate` tokens per second, capacity `burst`; each allowed call takes one token.

    At most `max_keys` buckets are kept; beyond that, full (idle) buckets are forgotten, which is exact
    because a forgotten bucket is recreated full.
    """

    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        """True (and one token taken) when `key` has a token at `now`; a rate of 0 or less allows all."""
        if self.rate <= 0:
            return True
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        self._buckets = {
            k: (t, last)
            for k, (t, last) in self._buckets.items()
            if t + (now - last) * self.rate < self.burst
        }

    def __len__(self) -> int:
        return len(self._buckets)


class TypingTracker:
    """Who is typing where, as one process heard it: a "start" holds for `ttl_s` unless renewed or stopped.

    Only transitions are reported (start when not typing, stop when typing, expiry), so receivers get one
    `start` and exactly one `stop` per typing spell.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._deadlines: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, str, str]] = []

    def start(self, conversation_id: str, user_id: str, now: float) -> bool:
        """Record (or renew) a start; True when the user was not typing there (deliver `start`)."""
        key = (conversation_id, user_id)
        new = key not in self._deadlines
        deadline = now + self.ttl_s
        self._deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, conversation_id, user_id))
        return new

    def stop(self, conversation_id: str, user_id: str) -> bool:
        """Record a stop; True when the user was typing there (deliver `stop`)."""
        return self._deadlines.pop((conversation_id, user_id), None) is not None

    def expire(self, now: float) -> list[tuple[str, str]]:
        """The (conversation, user) starts whose deadline passed by `now`, each reported once."""
        expired: list[tuple[str, str]] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, cid, user = heapq.heappop(self._heap)
            if self._deadlines.get((cid, user)) == deadline:
                del self._deadlines[(cid, user)]
                expired.append((cid, user))
        return expired

    def next_deadline(self) -> float | None:
        """The earliest time `expire` may report something (stale heap entries make it early, never late)."""
        return self._heap[0][0] if self._heap else None

    def typing(self, conversation_id: str, user_id: str) -> bool:
        return (conversation_id, user_id) in self._deadlines


def typing_recipients(members: Collection[str], sender: str) -> set[str]:
    """A typing signal goes to the conversation's current participants except its sender."""
    return {user for user in members if user != sender}


PresenceScope = Literal["engaged", "shared", "off"]
PRESENCE_SCOPES: tuple[PresenceScope, ...] = ("engaged", "shared", "off")


def presence_recipients(index: MembershipIndex, user_id: str, scope: PresenceScope) -> set[str]:
    """Who may see `user_id`'s presence: `shared`, everyone sharing a conversation with them; `engaged`,
    everyone sharing one in which `user_id` has acted since joining (being named is no consent); `off`,
    nobody. Never the user itself."""
    out: set[str] = set()
    if scope == "off":
        return out
    for cid in index.conversations_of(user_id):
        if scope == "shared" or index.engaged(cid, user_id):
            out.update(index.members.get(cid, ()))
    out.discard(user_id)
    return out


def presence_visible(index: MembershipIndex, viewer: str, scope: PresenceScope) -> set[str]:
    """The users whose presence `viewer` may see: those for whom `viewer` is in `presence_recipients`."""
    out: set[str] = set()
    if scope == "off":
        return out
    for cid in index.conversations_of(viewer):
        out.update(u for u in index.members.get(cid, ()) if scope == "shared" or index.engaged(cid, u))
    out.discard(viewer)
    return out


class TypingSignal(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    """Pub/sub: `user_id` started or stopped typing in `conversation_id` (already authorized)."""

    conversation_id: str
    user_id: str
    state: TypingState


class PresenceSignal(msgspec.Struct, frozen=True, tag="presence", tag_field="type"):
    """Pub/sub (published by presence.lua): `user_id` went online, or offline last seen at `last_seen` ms."""

    user_id: str
    online: bool
    last_seen: float | None = None


Signal = TypingSignal | PresenceSignal

_signal_decoder: msgspec.json.Decoder[Signal] = msgspec.json.Decoder(Signal)
_encoder = msgspec.json.Encoder()


def encode_signal(signal: Signal) -> bytes:
    return _encoder.encode(signal)


def decode_signal(data: bytes | str) -> Signal | None:
    """The signal in a pub/sub payload, or None when it is not one (it is then ignored)."""
    try:
        return _signal_decoder.decode(data)
    except msgspec.DecodeError:
        return None
