"""The HTTP edge's settings (see servicekit.httpedge), apart so that settings import no framework."""

from __future__ import annotations

import re
from dataclasses import dataclass

from servicekit.exceptions import SettingError
from servicekit.settings import Env

DEFAULT_MAX_HEADER_BYTES = 16_384
DEFAULT_HEADER_TIMEOUT_S = 10.0
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")


@dataclass(frozen=True, slots=True)
class HttpEdgeSettings:
    """Limits and policy of the HTTP edge, the same variables at every service (README, Configuration)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    allowed_origins: tuple[str, ...] = ()
    access_log: bool = False
    reuse_port: bool = False

    @classmethod
    def from_env(cls, env: Env | None = None) -> HttpEdgeSettings:
        env = env or Env()
        return cls(
            max_header_bytes=env.int("PARLEY_HTTP_MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES, minimum=1024),
            header_timeout_s=env.float("PARLEY_HTTP_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S, minimum=0.1),
            allowed_origins=_origins(env.csv("PARLEY_ALLOWED_ORIGINS")),
            access_log=env.bool("PARLEY_HTTP_ACCESS_LOG", False),
            reuse_port=env.bool("PARLEY_HTTP_REUSE_PORT", False),
        )


def _origins(values: tuple[str, ...]) -> tuple[str, ...]:
    """Origins as browsers send them (`scheme://host[:port]`, compared case-insensitively)."""
    origins = tuple(value.rstrip("/").lower() for value in values)
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise SettingError("PARLEY_ALLOWED_ORIGINS", f"expected scheme://host[:port], got {origin!r}")
    return origins


EDGE_DEFAULTS = HttpEdgeSettings()
"""The edge settings when none are read (an immutable default for the services' settings objects)."""
