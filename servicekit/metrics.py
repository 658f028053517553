"""Prometheus metrics every Parley service exports the same way (default registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

HTTP_RESPONSES = Counter(
    "parley_http_responses", "HTTP answers the service sent, by status code (5xx, 503 included)", ["code"]
)
