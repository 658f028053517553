"""Prometheus metrics every Parley service exports the same way (default registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

HTTP_RESPONSES = Counter(
    "parley_http_responses", "HTTP answers the service sent, by status code (5xx, 503 included)", ["code"]
)
TASK_FAILURES = Counter(
    "parley_task_failures",
    "Supervised tasks that raised unexpectedly, by policy",
    ["service", "task", "policy"],
)
TASK_STOPPED = Gauge(
    "parley_task_stopped", "1 while a supervised task is stopped by a crash", ["service", "task"]
)
