"""The command API's settings, read once from the environment (see README, Configuration)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from events.config import LogSettings
from servicekit.auth_settings import AuthSettings
from servicekit.exceptions import SettingError
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.settings import Env

DEFAULT_QUERY_URL = "http://127.0.0.1:8002"
DEFAULT_FANOUT_URL = "ws://127.0.0.1:8001/v1/stream"


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
    web_query_url: str = DEFAULT_QUERY_URL
    web_fanout_url: str = DEFAULT_FANOUT_URL
    web_frame_ancestors: tuple[str, ...] = ()

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
            web_query_url=_url(QUERY_URL, env.str(QUERY_URL, DEFAULT_QUERY_URL), _HTTP),
            web_fanout_url=_url(FANOUT_URL, env.str(FANOUT_URL, DEFAULT_FANOUT_URL), ("ws", "wss")),
            web_frame_ancestors=tuple(_url(ANCESTORS, a, _HTTP) for a in env.csv(ANCESTORS)),
        )


QUERY_URL = "PARLEY_WEB_QUERY_URL"
FANOUT_URL = "PARLEY_WEB_FANOUT_URL"
ANCESTORS = "PARLEY_WEB_FRAME_ANCESTORS"
_HTTP = ("http", "https")
_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+")


def _url(key: str, value: str, schemes: tuple[str, ...]) -> str:
    """A URL of one of `schemes` whose origin may be named in the page's Content-Security-Policy."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not _HOST_PORT.fullmatch(parts.netloc):
        raise SettingError(key, f"must be a {'/'.join(schemes)} URL with a host, got {value!r}")
    return value
