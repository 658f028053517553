"""The HTTP edge's settings (see servicekit.httpedge), apart so that settings import no framework."""

from __future__ import annotations

import re
from dataclasses import dataclass

from servicekit.exceptions import SettingError
from servicekit.settings import EnvSettings, setting

DEFAULT_MAX_HEADER_BYTES = 16_384
DEFAULT_HEADER_TIMEOUT_S = 10.0
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")


def _origins(key: str, values: tuple[str, ...]) -> tuple[str, ...]:
    """Origins as browsers send them (`scheme://host[:port]`, compared case-insensitively)."""
    origins = tuple(value.rstrip("/").lower() for value in values)
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise SettingError(key, f"expected scheme://host[:port], got {origin!r}")
    return origins


@dataclass(frozen=True, slots=True)
class HttpEdgeSettings(EnvSettings):
    """Limits and policy of the HTTP edge, the same variables at every service (README, Configuration)."""

    max_header_bytes: int = setting("PARLEY_HTTP_MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES, minimum=1024)
    header_timeout_s: float = setting("PARLEY_HTTP_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S, minimum=0.1)
    allowed_origins: tuple[str, ...] = setting("PARLEY_ALLOWED_ORIGINS", (), check=_origins)
    access_log: bool = setting("PARLEY_HTTP_ACCESS_LOG", False)
    reuse_port: bool = setting("PARLEY_HTTP_REUSE_PORT", False)


EDGE_DEFAULTS = HttpEdgeSettings()
"""The edge settings when none are read (an immutable default for the services' settings objects)."""
