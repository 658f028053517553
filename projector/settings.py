"""The projector's settings, read once from the environment (see README.md, its Configuration)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Self

from servicekit.auth_settings import AuthSettings
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.log_settings import LogSettings
from servicekit.settings import Env, EnvSettings, read_settings, setting

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


def _worker_id() -> str:
    """This process's name in the leases: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class ProjectorSettings(EnvSettings):
    """Where to read (log), where to write (Postgres), how big a batch, who we are for leases."""

    log: LogSettings
    database_url: str = setting("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/parley")
    auth: AuthSettings | None = None
    http: HttpEdgeSettings = EDGE_DEFAULTS
    batch: int = setting("PARLEY_PROJECTOR_BATCH", DEFAULT_BATCH, minimum=1)
    block_ms: int = setting("PARLEY_PROJECTOR_BLOCK_MS", 1000, minimum=1)
    http_host: str = setting("PARLEY_PROJECTOR_HTTP_HOST", "127.0.0.1")
    http_port: int = setting("PARLEY_PROJECTOR_HTTP_PORT", 8002, minimum=0)
    read_wait_s: float = setting("PARLEY_READ_WAIT_S", 5.0, minimum=0)
    query_pool_size: int = setting("PARLEY_QUERY_POOL_SIZE", QUERY_POOL_SIZE, minimum=1)
    query_pool_timeout_s: float = setting("PARLEY_QUERY_POOL_TIMEOUT_S", QUERY_POOL_TIMEOUT_S, minimum=0.01)
    query_statement_timeout_ms: int = setting(
        "PARLEY_QUERY_STATEMENT_TIMEOUT_MS", QUERY_STATEMENT_TIMEOUT_MS, minimum=1
    )
    query_max_concurrent_per_user: int = setting(
        "PARLEY_QUERY_MAX_CONCURRENT_PER_USER", QUERY_MAX_CONCURRENT_PER_USER, minimum=1
    )
    query_database_urls: tuple[str, ...] = setting("PARLEY_QUERY_DATABASE_URLS", ())
    query_replica_max_lag_s: float = setting(
        "PARLEY_QUERY_REPLICA_MAX_LAG_S", QUERY_REPLICA_MAX_LAG_S, minimum=0
    )
    query_replica_check_s: float = setting(
        "PARLEY_QUERY_REPLICA_CHECK_S", QUERY_REPLICA_CHECK_S, minimum=0.05
    )
    search_max_chars: int = setting("PARLEY_SEARCH_MAX_CHARS", SEARCH_MAX_CHARS, minimum=1)
    search_max_terms: int = setting("PARLEY_SEARCH_MAX_TERMS", SEARCH_MAX_TERMS, minimum=1)
    lease_ttl_s: float = setting("PARLEY_PROJECTOR_LEASE_TTL_S", 5.0, minimum=0.5)
    worker_id: str = setting("PARLEY_PROJECTOR_WORKER_ID", default_factory=_worker_id)
    cache_conversations: int = setting("PARLEY_PROJECTOR_CACHE_CONVERSATIONS", 50_000, minimum=1)
    cache_messages: int = setting("PARLEY_PROJECTOR_CACHE_MESSAGES", 500_000, minimum=0)
    state_messages: int = setting("PARLEY_PROJECTOR_STATE_MESSAGES", 1_000, minimum=1)
    retry_max_s: float = setting("PARLEY_PROJECTOR_RETRY_MAX_S", 10.0, minimum=0.1)
    max_lag_s: float = setting("PARLEY_PROJECTOR_MAX_LAG_S", 30.0, minimum=0)
    rebuild_processes: int = setting("PARLEY_PROJECTOR_REBUILD_PROCESSES", 2, minimum=1)
    gc_paced: bool = setting("PARLEY_PROJECTOR_GC_PACED", True)
    gc_young_every_s: float = setting("PARLEY_PROJECTOR_GC_YOUNG_EVERY_S", 1.0, minimum=0.01)
    gc_full_every_s: float = setting("PARLEY_PROJECTOR_GC_FULL_EVERY_S", 600.0, minimum=1.0)
    analyst_claim: str = setting("PARLEY_ANALYST_CLAIM", "roles")
    analyst_role: str = setting("PARLEY_ANALYST_ROLE", "analyst")
    retention: bool = setting("PARLEY_RETENTION", True)
    retain_stream_s: float = setting("PARLEY_RETAIN_STREAM_S", RETAIN_STREAM_S, minimum=0)
    retain_stream_events: int = setting("PARLEY_RETAIN_STREAM_EVENTS", RETAIN_STREAM_EVENTS, minimum=0)
    retention_interval_s: float = setting("PARLEY_RETENTION_INTERVAL_S", 10.0, minimum=0.01)

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
    def from_env(cls, env: Env | None = None, *, auth: bool = True) -> Self:
        """Read PARLEY_PROJECTOR_* (and the shared log/JWT settings; JWT only when `auth`)."""
        return cls(**read_settings(cls, env or Env(), **({} if auth else {"auth": None})))
