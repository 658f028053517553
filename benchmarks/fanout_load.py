"""The fanout load shape shared by every stack measured: who subscribes to what, what is sent, what counts.

Subscriber i belongs to `per_subscriber` of the `conversations`; messages go round-robin over the
conversations; a delivery is one message received by one subscriber. Losses and duplicates are
counted per (subscriber, message id), not inferred from totals.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FanoutLoad:
    subscribers: int = 1000
    conversations: int = 100
    per_subscriber: int = 3
    messages: int = 5000
    rate_per_s: float = 0.0
    """Messages sent per second; 0 sends as fast as the publisher can (saturation)."""
    max_seconds: float = 60.0

    def conversation_ids(self) -> list[str]:
        return [f"bench-conv-{c}" for c in range(self.conversations)]

    def memberships(self) -> list[list[str]]:
        """Subscriber i is in conversations i, i+1, ... (mod C): every conversation gets a fair share."""
        ids = self.conversation_ids()
        return [
            [ids[(i + j) % self.conversations] for j in range(self.per_subscriber)]
            for i in range(self.subscribers)
        ]

    def members_of(self) -> dict[str, list[int]]:
        members: dict[str, list[int]] = {c: [] for c in self.conversation_ids()}
        for i, convs in enumerate(self.memberships()):
            for c in convs:
                members[c].append(i)
        return members

    def sends(self) -> list[tuple[str, str]]:
        """(conversation id, message id) of every message, in sending order."""
        ids = self.conversation_ids()
        return [(ids[m % self.conversations], f"m{m}") for m in range(self.messages)]

    def expected_deliveries(self) -> int:
        members = self.members_of()
        return sum(len(members[c]) for c, _ in self.sends())


@dataclass
class Tally:
    """What the subscribers received: unique deliveries, duplicates, and latencies when measured."""

    received: Counter[tuple[int, str]] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    fanout_latencies_s: list[float] = field(default_factory=list)
    built_to_appended_s: list[float] = field(default_factory=list)
    appended_to_receipt_s: list[float] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    disconnects: int = 0

    def record(
        self, subscriber: int, message_id: str, sent_at: float | None = None, logged_at: float | None = None
    ) -> None:
        """`sent_at`: when the sender sent it; `logged_at`: when the log accepted it (the event's time)."""
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received[(subscriber, message_id)] += 1
        wall = time.time()
        if sent_at is not None:
            self.latencies_s.append(wall - sent_at)
        if logged_at is not None:
            self.fanout_latencies_s.append(wall - logged_at)

    def record_append(self, logged_at: float, appended_at: float) -> None:
        """Split a delivery at its append: `appended_at` is Redis's clock (the stream id's milliseconds)."""
        self.built_to_appended_s.append(appended_at - logged_at)
        self.appended_to_receipt_s.append(time.time() - appended_at)

    def fanout_percentile_ms(self, q: float) -> float:
        """From the event's `occurred_at` (set by the command API) to receipt: the log and fanout part."""
        return _percentile_ms(self.fanout_latencies_s, q)

    def split_percentile_ms(self, q: float) -> tuple[float, float]:
        """(built by the API -> appended, appended -> receipt) at quantile `q`, over the recorded splits."""
        return _percentile_ms(self.built_to_appended_s, q), _percentile_ms(self.appended_to_receipt_s, q)

    @property
    def unique(self) -> int:
        return len(self.received)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values())

    def rate(self) -> float:
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return self.unique / (self.last_at - self.first_at)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def wait_quiet(tally: Tally, expected: int, quiet_s: float, deadline: float) -> None:
    """Return once everything expected arrived, nothing new came for `quiet_s`, or the deadline passed."""
    last, last_change = -1, time.perf_counter()
    while time.perf_counter() < deadline:
        count = sum(tally.received.values())
        if tally.unique >= expected:
            return
        if count != last:
            last, last_change = count, time.perf_counter()
        elif time.perf_counter() - last_change > quiet_s:
            return
        await asyncio.sleep(0.05)


async def paced(sends: list[tuple[str, str]], rate_per_s: float) -> AsyncIterator[tuple[str, str]]:
    """Yield `sends` at `rate_per_s` (0: as fast as consumed), catching up in bursts if behind."""
    started = time.perf_counter()
    for n, item in enumerate(sends):
        if rate_per_s > 0:
            due = started + n / rate_per_s
            delay = due - time.perf_counter()
            if delay > 0.002:
                await asyncio.sleep(delay)
        yield item


def _percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
