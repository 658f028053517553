"""The fanout's settings, read once from the environment (see README.md, its Configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from events.admission import MAX_MESSAGES
from realtime_fanout.frames import MAX_CLIENT_MESSAGE_BYTES
from realtime_fanout.signals import PresenceScope
from realtime_fanout.unread import UNREAD_WINDOW
from servicekit.auth_settings import AuthSettings
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.log_settings import LogSettings
from servicekit.settings import EnvSettings, setting

WsEdge = Literal["native", "uvicorn"]
"""native: realtime_fanout/edge.py (no task per idle connection); uvicorn: its protocol (wsproto.py)."""


@dataclass(frozen=True, slots=True)
class FanoutSettings(EnvSettings):
    """Where to listen, where the log is, and the per-connection limits."""

    log: LogSettings
    auth: AuthSettings
    http: HttpEdgeSettings = EDGE_DEFAULTS
    host: str = setting("PARLEY_FANOUT_HOST", "127.0.0.1")
    port: int = setting("PARLEY_FANOUT_PORT", 8001, minimum=0)
    max_buffer_bytes: int = setting("PARLEY_FANOUT_MAX_BUFFER_BYTES", 1_048_576, minimum=4096)
    max_batch: int = setting("PARLEY_FANOUT_MAX_BATCH", 100, minimum=1)
    gc_paced: bool = setting("PARLEY_FANOUT_GC_PACED", True)
    gc_young_every_s: float = setting("PARLEY_FANOUT_GC_YOUNG_EVERY_S", 1.0, minimum=0.01)
    gc_full_every_s: float = setting("PARLEY_FANOUT_GC_FULL_EVERY_S", 600.0, minimum=1.0)
    ping_interval_s: float = setting("PARLEY_FANOUT_PING_INTERVAL_S", 20.0, minimum=0.1)
    ping_timeout_s: float = setting("PARLEY_FANOUT_PING_TIMEOUT_S", 20.0, minimum=0.1)
    auth_timeout_s: float = setting("PARLEY_FANOUT_AUTH_TIMEOUT_S", 10.0, minimum=0.1)
    close_timeout_s: float = setting("PARLEY_FANOUT_CLOSE_TIMEOUT_S", 5.0, minimum=0.1)
    read_block_ms: int = setting("PARLEY_FANOUT_READ_BLOCK_MS", 5_000, minimum=10)
    read_count: int = setting("PARLEY_FANOUT_READ_COUNT", 1_000, minimum=1)
    replay_page: int = setting("PARLEY_FANOUT_REPLAY_PAGE", 500, minimum=1)
    database_url: str | None = setting("DATABASE_URL", None)
    archive_wait_s: float = setting("PARLEY_FANOUT_ARCHIVE_WAIT_S", 2.0, minimum=0.0)
    history_linger_s: float = setting("PARLEY_FANOUT_HISTORY_LINGER_S", 2.0, minimum=0.0)
    history_cache_pages: int = setting("PARLEY_FANOUT_HISTORY_CACHE_PAGES", 64, minimum=0)
    recent_items: int = setting("PARLEY_FANOUT_RECENT_ITEMS", 20_000, minimum=0)
    redis_pool_wait_s: float = setting("PARLEY_FANOUT_REDIS_POOL_WAIT_S", 5.0, minimum=0.0)
    unread_wait_s: float = setting("PARLEY_FANOUT_UNREAD_WAIT_S", 1.0, minimum=0.0)
    unread_window: int = setting("PARLEY_FANOUT_UNREAD_WINDOW", UNREAD_WINDOW, minimum=1)
    ledger_ids: int = setting("PARLEY_FANOUT_LEDGER_IDS", MAX_MESSAGES, minimum=0)
    typing_ttl_s: float = setting("PARLEY_FANOUT_TYPING_TTL_S", 5.0, minimum=0.1)
    typing_per_s: float = setting("PARLEY_FANOUT_TYPING_PER_S", 2.0, minimum=0.0)
    presence_ttl_s: float = setting("PARLEY_FANOUT_PRESENCE_TTL_S", 30.0, minimum=0.3)
    presence_leave_grace_s: float = setting("PARLEY_FANOUT_PRESENCE_LEAVE_GRACE_S", 5.0, minimum=0.0)
    presence_scope: PresenceScope = setting("PARLEY_FANOUT_PRESENCE_SCOPE", "engaged")
    max_message_bytes: int = setting(
        "PARLEY_FANOUT_MAX_MESSAGE_BYTES", MAX_CLIENT_MESSAGE_BYTES, minimum=1024
    )
    max_connections_per_user: int = setting("PARLEY_FANOUT_MAX_CONNECTIONS_PER_USER", 20, minimum=1)
    max_admitting: int = setting("PARLEY_FANOUT_MAX_ADMITTING", 1000, minimum=0)
    admission_retry_after_s: int = setting("PARLEY_FANOUT_ADMISSION_RETRY_AFTER_S", 1, minimum=1)
    ws_deflate: bool = setting("PARLEY_FANOUT_WS_DEFLATE", True)
    ws_edge: WsEdge = setting("PARLEY_FANOUT_WS_EDGE", "native")
