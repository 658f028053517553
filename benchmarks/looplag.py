"""A service's event loop lag between two looks at its /metrics (`parley_loop_lag_seconds`, servicekit)."""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

Buckets = list[tuple[float, float]]
"""(upper bound in seconds, cumulative count) of the lag histogram, ascending."""


def lag_buckets(port: int, timeout_s: float = 30) -> Buckets:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s).text
    return sorted(
        (float(s.labels["le"]), s.value)
        for family in text_string_to_metric_families(text)
        if family.name == "parley_loop_lag_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    )


def lag_quantile_ms(before: Buckets, after: Buckets, q: float) -> tuple[float, int]:
    """Upper bound of the bucket holding quantile `q` of the probes between two looks; and their count."""
    deltas = [(le, b - a) for (le, b), (_, a) in zip(after, before, strict=True)]
    total = deltas[-1][1] if deltas else 0
    for le, cumulative in deltas:
        if total and cumulative >= q * total:
            return le * 1000, int(total)
    return math.nan, int(total)


def gc_pauses(port: int) -> dict[str, tuple[float, float]]:
    """The fanout's scheduled collections so far, by kind (young, full): (count, seconds paused in all)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "parley_fanout_gc_pause_seconds":
            for s in family.samples:
                if s.name.endswith(("_count", "_sum")):
                    found.setdefault(s.labels["kind"], [0.0, 0.0])[s.name.endswith("_sum")] = s.value
    return {kind: (count, total) for kind, (count, total) in found.items()}
