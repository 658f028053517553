"""Prometheus metrics of the fanout (process-wide, on the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("parley_fanout_connections", "Open, subscribed WebSocket connections")
ENTRIES_READ = Counter("parley_fanout_entries_read_total", "Log entries the hub read (once per process)")
ENTRIES_REFUSED = Counter(
    "parley_fanout_entries_refused_total", "Decodable entries the hub refused as not events of the log"
)
DELIVERIES = Counter("parley_fanout_deliveries_total", "Events queued to sessions (one per recipient)")
CLOSES = Counter("parley_fanout_closes_total", "Connections the server closed, by close code", ["code"])
CONNECTION_FAILURES = Counter(
    "parley_fanout_connection_failures", "Connections closed 1011 because handling them raised (a bug)"
)
ADMISSION_REFUSED = Counter(
    "parley_fanout_admission_refused_total",
    "WebSocket upgrades answered 503: PARLEY_FANOUT_MAX_ADMITTING connections were being established",
)
RESYNCS = Counter("parley_fanout_resyncs_total", "Resync frames sent, by reason", ["reason"])
UNREAD_RESEEDS = Counter(
    "parley_fanout_unread_reseeds_total",
    "Conversations whose unread count was read again (a read or delete the held ids could not decide), by "
    "outcome (exact|dropped: no usable seed, no more unread frames for it on that connection)",
    ["outcome"],
)
HISTORY_READS = Counter(
    "parley_fanout_history_reads_total", "History pages read from a backend (redis|archive)", ["source"]
)
HISTORY_COALESCED = Counter(
    "parley_fanout_history_coalesced_total", "History page reads served by a shared read", ["source"]
)
TYPING_DROPPED = Counter(
    "parley_fanout_typing_dropped_total", "Typing signals dropped (rate|not-participant)", ["reason"]
)
SIGNALS_DELIVERED = Counter(
    "parley_fanout_signals_delivered_total", "Ephemeral frames queued to connections", ["kind"]
)
SIGNAL_ERRORS = Counter("parley_fanout_signal_errors_total", "Failed presence/pub-sub Redis calls", ["op"])

GC_PAUSE_SECONDS = Histogram(
    "parley_fanout_gc_pause_seconds",
    "Pauses of the scheduled garbage collections, by kind (young, full).",
    ["kind"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5),
)
