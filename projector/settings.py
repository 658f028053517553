"""The projector's settings, read once from the environment (see README.md, its Configuration)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from events.config import LogSettings
from servicekit.auth_settings import AuthSettings
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.settings import Env

DEFAULT_BATCH = 20_000
# The query API's limits (README: Configuration).
QUERY_POOL_SIZE = 8
QUERY_POOL_TIMEOUT_S = 2.0
QUERY_STATEMENT_TIMEOUT_MS = 2000
QUERY_MAX_CONCURRENT_PER_USER = 8
QUERY_REPLICA_MAX_LAG_S = 2.0
QUERY_REPLICA_CHECK_S = 0.5
SEARCH_MAX_CHARS = 256
SEARCH_MAX_TERMS = 16
RETAIN_STREAM_S = 24 * 3600.0
RETAIN_STREAM_EVENTS = 10_000


@dataclass(frozen=True, slots=True)
class ProjectorSettings:
    """Where to read (log), where to write (Postgres), how big a batch, who we are for leases."""

    log: LogSettings
    database_url: str
    auth: AuthSettings | None = None
    http: HttpEdgeSettings = EDGE_DEFAULTS
    batch: int = DEFAULT_BATCH
    block_ms: int = 1000
    http_host: str = "127.0.0.1"
    http_port: int = 8002
    read_wait_s: float = 5.0
    query_pool_size: int = QUERY_POOL_SIZE
    query_pool_timeout_s: float = QUERY_POOL_TIMEOUT_S
    query_statement_timeout_ms: int = QUERY_STATEMENT_TIMEOUT_MS
    query_max_concurrent_per_user: int = QUERY_MAX_CONCURRENT_PER_USER
    query_database_urls: tuple[str, ...] = ()
    query_replica_max_lag_s: float = QUERY_REPLICA_MAX_LAG_S
    query_replica_check_s: float = QUERY_REPLICA_CHECK_S
    search_max_chars: int = SEARCH_MAX_CHARS
    search_max_terms: int = SEARCH_MAX_TERMS
    lease_ttl_s: float = 5.0
    worker_id: str = ""
    cache_conversations: int = 50_000
    retry_max_s: float = 10.0
    max_lag_s: float = 30.0
    rebuild_processes: int = 2
    gc_paced: bool = True
    gc_young_every_s: float = 1.0
    gc_full_every_s: float = 600.0
    analyst_claim: str = "roles"
    analyst_role: str = "analyst"
    retention: bool = True
    retain_stream_s: float = RETAIN_STREAM_S
    retain_stream_events: int = RETAIN_STREAM_EVENTS
    retention_interval_s: float = 10.0

    def child_env(self) -> dict[str, str]:
        """The environment a child process needs to read the same log into the same database."""
        return {
            "REDIS_URL": self.log.redis_url,
            "PARLEY_LOG_NAMESPACE": self.log.namespace,
            "PARLEY_PARTITIONS": str(self.log.partitions),
            "DATABASE_URL": self.database_url,
            "PARLEY_PROJECTOR_BATCH": str(self.batch),
        }

    @classmethod
    def from_env(cls, env: Env | None = None, *, auth: bool = True) -> ProjectorSettings:
        """Read PARLEY_PROJECTOR_* (and the shared log/JWT settings; JWT only when `auth`)."""
        env = env or Env()
        default_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        return cls(
            log=LogSettings.from_env(env),
            database_url=env.str("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/parley"),
            auth=AuthSettings.from_env(env) if auth else None,
            http=HttpEdgeSettings.from_env(env),
            batch=env.int("PARLEY_PROJECTOR_BATCH", DEFAULT_BATCH, minimum=1),
            block_ms=env.int("PARLEY_PROJECTOR_BLOCK_MS", 1000, minimum=1),
            http_host=env.str("PARLEY_PROJECTOR_HTTP_HOST", "127.0.0.1"),
            http_port=env.int("PARLEY_PROJECTOR_HTTP_PORT", 8002, minimum=0),
            read_wait_s=env.float("PARLEY_READ_WAIT_S", 5.0, minimum=0),
            query_pool_size=env.int("PARLEY_QUERY_POOL_SIZE", QUERY_POOL_SIZE, minimum=1),
            query_pool_timeout_s=env.float("PARLEY_QUERY_POOL_TIMEOUT_S", QUERY_POOL_TIMEOUT_S, minimum=0.01),
            query_statement_timeout_ms=env.int(
                "PARLEY_QUERY_STATEMENT_TIMEOUT_MS", QUERY_STATEMENT_TIMEOUT_MS, minimum=1
            ),
            query_max_concurrent_per_user=env.int(
                "PARLEY_QUERY_MAX_CONCURRENT_PER_USER", QUERY_MAX_CONCURRENT_PER_USER, minimum=1
            ),
            query_database_urls=env.csv("PARLEY_QUERY_DATABASE_URLS"),
            query_replica_max_lag_s=env.float(
                "PARLEY_QUERY_REPLICA_MAX_LAG_S", QUERY_REPLICA_MAX_LAG_S, minimum=0
            ),
            query_replica_check_s=env.float(
                "PARLEY_QUERY_REPLICA_CHECK_S", QUERY_REPLICA_CHECK_S, minimum=0.05
            ),
            search_max_chars=env.int("PARLEY_SEARCH_MAX_CHARS", SEARCH_MAX_CHARS, minimum=1),
            search_max_terms=env.int("PARLEY_SEARCH_MAX_TERMS", SEARCH_MAX_TERMS, minimum=1),
            lease_ttl_s=env.float("PARLEY_PROJECTOR_LEASE_TTL_S", 5.0, minimum=0.5),
            worker_id=env.str("PARLEY_PROJECTOR_WORKER_ID", default_id),
            cache_conversations=env.int("PARLEY_PROJECTOR_CACHE_CONVERSATIONS", 50_000, minimum=1),
            retry_max_s=env.float("PARLEY_PROJECTOR_RETRY_MAX_S", 10.0, minimum=0.1),
            max_lag_s=env.float("PARLEY_PROJECTOR_MAX_LAG_S", 30.0, minimum=0),
            rebuild_processes=env.int("PARLEY_PROJECTOR_REBUILD_PROCESSES", 2, minimum=1),
            gc_paced=env.bool("PARLEY_PROJECTOR_GC_PACED", True),
            gc_young_every_s=env.float("PARLEY_PROJECTOR_GC_YOUNG_EVERY_S", 1.0, minimum=0.01),
            gc_full_every_s=env.float("PARLEY_PROJECTOR_GC_FULL_EVERY_S", 600.0, minimum=1.0),
            analyst_claim=env.str("PARLEY_ANALYST_CLAIM", "roles"),
            analyst_role=env.str("PARLEY_ANALYST_ROLE", "analyst"),
            retention=env.bool("PARLEY_RETENTION", True),
            retain_stream_s=env.float("PARLEY_RETAIN_STREAM_S", RETAIN_STREAM_S, minimum=0),
            retain_stream_events=env.int("PARLEY_RETAIN_STREAM_EVENTS", RETAIN_STREAM_EVENTS, minimum=0),
            retention_interval_s=env.float("PARLEY_RETENTION_INTERVAL_S", 10.0, minimum=0.01),
        )
