"""The live edges a running command API holds: Redis, the appender, the rate limiter, the verifier."""

from __future__ import annotations

import logging

from command_api.append import Appender, AppendSettings
from command_api.exceptions import LogUnavailable
from command_api.ratelimit import RateLimiter
from command_api.settings import CommandApiSettings
from events.redisclient import redis_client
from servicekit.auth import TokenVerifier

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 1.0
"""A pooled connection idle this long is PINGed before reuse: appends are never retried once sent, so
a connection a Redis restart killed must be found before an append is written to it."""


class Services:
    """Built in the app's lifespan and closed on shutdown; nothing connects before `open`."""

    def __init__(self, settings: CommandApiSettings) -> None:
        self.settings = settings
        layout = settings.log.layout()
        self.redis = redis_client(
            settings.log.redis_url, 5, cluster=settings.log.redis_cluster, health_check_s=HEALTH_CHECK_S,
            max_connections=64,
        )  # fmt: skip
        self.appender = Appender(
            self.redis,
            layout,
            AppendSettings(
                idempotency_ttl_s=settings.idempotency_ttl_s,
                wait_replicas=settings.wait_replicas,
                wait_timeout_ms=settings.wait_timeout_ms,
            ),
        )
        self.limiter = RateLimiter(self.redis, layout, settings.rate_limit_per_s, settings.rate_limit_burst)
        self.verifier = TokenVerifier(settings.auth)

    async def open(self) -> None:
        """Open the log (creating it on first use); a Redis outage here is retried on the first command."""
        try:
            epoch = await self.appender.open()
            log.info("log open: epoch %s, %d partitions", epoch, self.settings.log.partitions)
        except LogUnavailable as exc:
            log.error("log not reachable at start (%s); will retry on first command", exc)

    async def close(self) -> None:
        await self.appender.close()
        await self.limiter.close()
        await self.redis.aclose()
