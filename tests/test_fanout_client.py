"""The client library's pure parts: frame translation, backoff with jitter, token refresh timing."""

from __future__ import annotations

import random

from realtime_fanout.client import (
    Event,
    Live,
    Resync,
    backoff_delay,
    items_of,
    refresh_delay,
    retry_after,
    retry_delay,
)


def test_a_batch_carries_its_cursor_on_the_last_event_only() -> None:
    frame = {"type": "events", "cursor": "C2", "events": [{"n": 1}, {"n": 2}]}
    assert items_of(frame) == [Event({"n": 1}, None), Event({"n": 2}, "C2")]
    assert items_of({"type": "event", "cursor": "C1", "event": {"n": 0}}) == [Event({"n": 0}, "C1")]


def test_control_frames_become_markers_or_nothing() -> None:
    assert items_of({"type": "live", "cursor": "C"}) == [Live("C")]
    assert items_of({"type": "resync", "position": "P", "reason": "history-gone"}) == [
        Resync("P", "history-gone")
    ]
    assert items_of({"type": "authenticated", "user_id": "u", "expires_at": 1.0}) == []
    assert items_of({"type": "something-new"}) == []


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(7)
    for attempt, cap in ((0, 0.1), (1, 0.2), (3, 0.8), (10, 5.0), (1000, 5.0)):
        delays = [backoff_delay(attempt, 0.1, 5.0, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2  # spread over the whole range


def test_refresh_is_due_a_margin_before_expiry_but_not_in_a_hurry() -> None:
    assert refresh_delay(expires_at=3600, now=0, margin_s=60) == 3540
    assert refresh_delay(expires_at=10, now=0, margin_s=60) == 5  # short tokens: halfway
    assert refresh_delay(expires_at=0, now=5, margin_s=60) == 0


def test_a_refusal_s_retry_after_is_waited_at_least_spread_and_capped() -> None:
    rng = random.Random(3)
    delays = [retry_delay(0, 0.1, 10.0, rng, retry_after_s=2.0) for _ in range(200)]
    assert all(2.0 <= d <= 3.0 for d in delays) and max(delays) - min(delays) > 0.8
    assert all(retry_delay(20, 0.1, 10.0, rng, retry_after_s=1.0) <= 10.0 for _ in range(50))
    assert all(retry_delay(0, 0.1, 10.0, rng, retry_after_s=3600.0) == 10.0 for _ in range(5))
    assert all(retry_delay(0, 0.1, 10.0, rng) <= 0.1 for _ in range(50))  # none asked: backoff alone


def test_retry_after_is_read_from_refusals_in_seconds_only() -> None:
    assert retry_after(503, "2") == 2.0 and retry_after(429, " 1 ") == 1.0
    assert retry_after(503, None) is None and retry_after(503, "Wed, 21 Oct 2026 07:28:00 GMT") is None
    assert retry_after(503, "-1") is None and retry_after(500, "2") is None
