"""Prometheus metrics of the command API."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

COMMANDS = Counter(
    "parley_commands_total",
    "Commands answered, by command type, outcome (accepted, replayed, refused, invalid, "
    "rate_limited, unavailable, unauthorized) and reason slug.",
    ["type", "outcome", "reason"],
)

APPEND_SECONDS = Histogram(
    "parley_append_seconds",
    "Time from handing a command to the appender until the log answered (batching included).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
