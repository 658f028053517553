"""Per-user token bucket kept in Redis, so every API process shares one budget per user."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

from command_api.batching import MicroBatcher
from command_api.exceptions import LogUnavailable, RateLimited
from events.layout import LogLayout
from events.redisclient import REDIS_ERRORS, RedisClient, slot_group

RATE_LIMIT_SCRIPT = files("command_api").joinpath("ratelimit.lua").read_text()


class RateLimiter:
    """`check(user)` takes one token or raises `RateLimited`; checks of concurrent requests share
    one script call (on a cluster, those of users whose buckets share a slot). A rate of 0 disables limiting.
    """

    def __init__(self, redis: RedisClient, layout: LogLayout, per_s: float, burst: int) -> None:
        self.layout = layout
        self.per_s = per_s
        self.burst = burst
        self.redis = redis
        self._script = redis.register_script(RATE_LIMIT_SCRIPT)
        self._batcher: MicroBatcher[int, str, int] = MicroBatcher(self._flush, max_batch=512)

    async def check(self, user_id: str) -> None:
        """Raises:
        RateLimited: the user's bucket is empty.
        LogUnavailable: Redis did not answer.
        """
        if self.per_s <= 0:
            return
        group = slot_group(self.redis, self.layout.rate_limit_key(user_id))
        wait_ms = await self._batcher.submit(group, user_id)
        if wait_ms > 0:
            raise RateLimited(wait_ms / 1000)

    async def _flush(self, _key: int, users: Sequence[str]) -> list[int | BaseException]:
        keys = [self.layout.rate_limit_key(u) for u in users]
        try:
            reply = await self._script(keys=keys, args=[self.per_s, self.burst])
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: {exc}") from exc
        return [int(x) for x in reply]

    async def close(self) -> None:
        await self._batcher.close()
