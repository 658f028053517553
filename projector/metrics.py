"""The projector's Prometheus metrics (default registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_APPLIED = Counter(
    "parley_projector_events_applied", "Log entries committed to the read models", ["partition"]
)
DEAD_LETTERS = Counter(
    "parley_projector_dead_letters", "Entries sent to the dead-letter table", ["partition", "reason"]
)
BATCH_SIZE = Histogram(
    "parley_projector_batch_size",
    "Entries per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000),
)
BATCH_SECONDS = Histogram(
    "parley_projector_batch_seconds", "Time to fold and commit one batch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
LAG_EVENTS = Gauge("parley_projector_lag_events", "Entries in the log not yet applied", ["partition"])
LAG_SECONDS = Gauge(
    "parley_projector_lag_seconds", "Newest log entry time minus last applied entry time", ["partition"]
)
EPOCH_MISMATCH = Gauge(
    "parley_projector_epoch_mismatch", "1 while a partition is stopped: log epoch differs from checkpoint",
    ["partition"],
)  # fmt: skip
LOG_GAP = Gauge(
    "parley_projector_log_gap", "1 while a partition is stopped: entries after its checkpoint were trimmed",
    ["partition"],
)  # fmt: skip
STOPPED = Gauge(
    "parley_projector_partition_stopped", "1 while a partition's projection is stopped", ["partition"]
)
OWNED = Gauge("parley_projector_partitions_owned", "Partitions this worker holds the lease of")
DB_ERRORS = Counter("parley_projector_db_errors", "Batches that failed on a Postgres error and were retried")
GC_PAUSE_SECONDS = Histogram(
    "parley_projector_gc_pause_seconds",
    "Pauses of the scheduled garbage collections, by kind (young, full).",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
RETENTION_TRIMMED = Counter(
    "parley_retention_trimmed_entries",
    "Stream entries the retention task trimmed (all archived)",
    ["partition"],
)
RETENTION_TRIM_POINT = Gauge(
    "parley_retention_trim_point_ms",
    "Time (Unix ms) of the oldest entry the stream keeps: the last MINID applied, or the first entry",
    ["partition"],
)
RETENTION_BLOCKED = Gauge(
    "parley_retention_blocked_by_archive",
    "1 while the window asks to trim past the archive's head (the projector is stopped or lagging)",
    ["partition"],
)
RETENTION_STREAM_ENTRIES = Gauge(
    "parley_retention_stream_entries",
    "Entries the partition's stream holds after the last pass",
    ["partition"],
)
RETENTION_ERRORS = Counter(
    "parley_retention_errors", "Retention passes of a partition that failed and were retried"
)
RETENTION_LAST_PASS = Gauge(
    "parley_retention_last_pass_timestamp_seconds", "When the last retention pass ended"
)
QUERY_READS = Counter(
    "parley_query_reads", "Query API snapshot reads, by the server that answered them", ["target"]
)
REPLICA_SERVING = Gauge(
    "parley_query_replica_serving", "1 while a streaming replica serves the query API's reads", ["replica"]
)
REPLICA_LAG_SECONDS = Gauge(
    "parley_query_replica_lag_seconds", "A replica's replay lag behind the primary's WAL (NaN: unknown)",
    ["replica"],
)  # fmt: skip
