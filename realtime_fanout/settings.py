"""The fanout's settings, read once from the environment (see README.md, its Configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from events.config import LogSettings
from realtime_fanout.frames import MAX_CLIENT_MESSAGE_BYTES
from realtime_fanout.signals import PRESENCE_SCOPES, PresenceScope
from servicekit.auth_settings import AuthSettings
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.settings import Env


@dataclass(frozen=True, slots=True)
class FanoutSettings:
    """Where to listen, where the log is, and the per-connection limits."""

    log: LogSettings
    auth: AuthSettings
    http: HttpEdgeSettings = EDGE_DEFAULTS
    host: str = "127.0.0.1"
    port: int = 8001
    max_buffer_bytes: int = 1_048_576
    max_batch: int = 100
    gc_paced: bool = True
    gc_young_every_s: float = 1.0
    gc_full_every_s: float = 600.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    auth_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    read_block_ms: int = 5_000
    read_count: int = 1_000
    replay_page: int = 500
    database_url: str | None = None
    archive_wait_s: float = 2.0
    history_linger_s: float = 2.0
    history_cache_pages: int = 64
    unread_wait_s: float = 1.0
    typing_ttl_s: float = 5.0
    typing_per_s: float = 2.0
    presence_ttl_s: float = 30.0
    presence_scope: PresenceScope = "engaged"
    max_message_bytes: int = MAX_CLIENT_MESSAGE_BYTES
    max_connections_per_user: int = 20

    @classmethod
    def from_env(cls, env: Env | None = None) -> FanoutSettings:
        env = env or Env()
        return cls(
            log=LogSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            http=HttpEdgeSettings.from_env(env),
            host=env.str("PARLEY_FANOUT_HOST", "127.0.0.1"),
            port=env.int("PARLEY_FANOUT_PORT", 8001, minimum=0),
            max_buffer_bytes=env.int("PARLEY_FANOUT_MAX_BUFFER_BYTES", 1_048_576, minimum=4096),
            max_batch=env.int("PARLEY_FANOUT_MAX_BATCH", 100, minimum=1),
            gc_paced=env.bool("PARLEY_FANOUT_GC_PACED", True),
            gc_young_every_s=env.float("PARLEY_FANOUT_GC_YOUNG_EVERY_S", 1.0, minimum=0.01),
            gc_full_every_s=env.float("PARLEY_FANOUT_GC_FULL_EVERY_S", 600.0, minimum=1.0),
            ping_interval_s=env.float("PARLEY_FANOUT_PING_INTERVAL_S", 20.0, minimum=0.1),
            ping_timeout_s=env.float("PARLEY_FANOUT_PING_TIMEOUT_S", 20.0, minimum=0.1),
            auth_timeout_s=env.float("PARLEY_FANOUT_AUTH_TIMEOUT_S", 10.0, minimum=0.1),
            close_timeout_s=env.float("PARLEY_FANOUT_CLOSE_TIMEOUT_S", 5.0, minimum=0.1),
            read_block_ms=env.int("PARLEY_FANOUT_READ_BLOCK_MS", 5_000, minimum=10),
            read_count=env.int("PARLEY_FANOUT_READ_COUNT", 1_000, minimum=1),
            replay_page=env.int("PARLEY_FANOUT_REPLAY_PAGE", 500, minimum=1),
            database_url=env.optional_str("DATABASE_URL"),
            archive_wait_s=env.float("PARLEY_FANOUT_ARCHIVE_WAIT_S", 2.0, minimum=0.0),
            history_linger_s=env.float("PARLEY_FANOUT_HISTORY_LINGER_S", 2.0, minimum=0.0),
            history_cache_pages=env.int("PARLEY_FANOUT_HISTORY_CACHE_PAGES", 64, minimum=0),
            unread_wait_s=env.float("PARLEY_FANOUT_UNREAD_WAIT_S", 1.0, minimum=0.0),
            typing_ttl_s=env.float("PARLEY_FANOUT_TYPING_TTL_S", 5.0, minimum=0.1),
            typing_per_s=env.float("PARLEY_FANOUT_TYPING_PER_S", 2.0, minimum=0.0),
            presence_ttl_s=env.float("PARLEY_FANOUT_PRESENCE_TTL_S", 30.0, minimum=0.3),
            presence_scope=cast(
                PresenceScope, env.choice("PARLEY_FANOUT_PRESENCE_SCOPE", "engaged", PRESENCE_SCOPES)
            ),
            max_message_bytes=env.int(
                "PARLEY_FANOUT_MAX_MESSAGE_BYTES", MAX_CLIENT_MESSAGE_BYTES, minimum=1024
            ),
            max_connections_per_user=env.int("PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER", 20, minimum=1),
        )
