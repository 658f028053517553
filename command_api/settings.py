"""The command API's settings, read once from the environment (see README, Configuration)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from servicekit.auth_settings import AuthSettings
from servicekit.exceptions import SettingError
from servicekit.http_settings import EDGE_DEFAULTS, HttpEdgeSettings
from servicekit.log_settings import LogSettings
from servicekit.settings import EnvSettings, setting

_HTTP = ("http", "https")
_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+")


def _url(key: str, value: str, schemes: tuple[str, ...]) -> str:
    """A URL of one of `schemes` whose origin may be named in the page's Content-Security-Policy."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not _HOST_PORT.fullmatch(parts.netloc):
        raise SettingError(key, f"must be a {'/'.join(schemes)} URL with a host, got {value!r}")
    return value


def _http_url(key: str, value: str) -> str:
    return _url(key, value, _HTTP)


def _ws_url(key: str, value: str) -> str:
    return _url(key, value, ("ws", "wss"))


def _http_urls(key: str, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_http_url(key, value) for value in values)


@dataclass(frozen=True, slots=True)
class CommandApiSettings(EnvSettings):
    """Where to listen, the log, the token checks, and the limits of a command."""

    log: LogSettings
    auth: AuthSettings
    http: HttpEdgeSettings = EDGE_DEFAULTS
    host: str = setting("PARLEY_API_HOST", "127.0.0.1")
    port: int = setting("PARLEY_API_PORT", 8000, minimum=0)
    max_body_chars: int = setting("PARLEY_MAX_BODY_CHARS", 4000, minimum=1)
    max_request_bytes: int = setting("PARLEY_MAX_REQUEST_BYTES", 65_536, minimum=1024)
    idempotency_ttl_s: float = setting("PARLEY_IDEMPOTENCY_TTL_S", 86_400, minimum=1)
    wait_replicas: int = setting("PARLEY_WAIT_REPLICAS", 0, minimum=0)
    wait_timeout_ms: int = setting("PARLEY_WAIT_TIMEOUT_MS", 1_000, minimum=0)
    rate_limit_per_s: float = setting("PARLEY_RATE_LIMIT_PER_S", 50, minimum=0)
    rate_limit_burst: int = setting("PARLEY_RATE_LIMIT_BURST", 200, minimum=1)
    web_query_url: str = setting("PARLEY_WEB_QUERY_URL", "http://127.0.0.1:8002", check=_http_url)
    web_fanout_url: str = setting("PARLEY_WEB_FANOUT_URL", "ws://127.0.0.1:8001/v1/stream", check=_ws_url)
    web_frame_ancestors: tuple[str, ...] = setting("PARLEY_WEB_FRAME_ANCESTORS", (), check=_http_urls)
