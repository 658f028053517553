"""The command API's settings, read once from the environment (see README, Configuration)."""

from __future__ import annotations

from dataclasses import dataclass

from events.config import LogSettings
from servicekit.auth_settings import AuthSettings
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.settings import Env


@dataclass(frozen=True, slots=True)
class CommandApiSettings:
    log: LogSettings
    auth: AuthSettings
    http: HttpEdgeSettings = EDGE_DEFAULTS
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_chars: int = 4000
    max_request_bytes: int = 65_536
    idempotency_ttl_s: float = 86_400
    wait_replicas: int = 0
    wait_timeout_ms: int = 1_000
    rate_limit_per_s: float = 50
    rate_limit_burst: int = 200

    @classmethod
    def from_env(cls, env: Env | None = None) -> CommandApiSettings:
        env = env or Env()
        return cls(
            log=LogSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            http=HttpEdgeSettings.from_env(env),
            host=env.str("PARLEY_API_HOST", "127.0.0.1"),
            port=env.int("PARLEY_API_PORT", 8000, minimum=0),
            max_body_chars=env.int("PARLEY_MAX_BODY_CHARS", 4000, minimum=1),
            max_request_bytes=env.int("PARLEY_MAX_REQUEST_BYTES", 65_536, minimum=1024),
            idempotency_ttl_s=env.float("PARLEY_IDEMPOTENCY_TTL_S", 86_400, minimum=1),
            wait_replicas=env.int("PARLEY_WAIT_REPLICAS", 0, minimum=0),
            wait_timeout_ms=env.int("PARLEY_WAIT_TIMEOUT_MS", 1_000, minimum=0),
            rate_limit_per_s=env.float("PARLEY_RATE_LIMIT_PER_S", 50, minimum=0),
            rate_limit_burst=env.int("PARLEY_RATE_LIMIT_BURST", 200, minimum=1),
        )
