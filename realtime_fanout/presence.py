"""Presence records in Redis (presence.lua): per-connection expiry, exact online/offline transitions.

A user is online while at least one of their connections, on any fanout process, was touched less than
the TTL ago. Each transition flips a hash in the same script that publishes it, so it is published exactly
once; expired connections of dead processes are found by `sweep`, bounded per call.
"""

from __future__ import annotations

from importlib.resources import files

import msgspec

from events.redisclient import RedisClient

PRESENCE_SCRIPT = files("realtime_fanout").joinpath("presence.lua").read_text()


class PresenceEntry(msgspec.Struct, frozen=True):
    """One user's presence: `last_seen` (unix seconds) is set once they have been seen going offline."""

    user_id: str
    online: bool
    last_seen: float | None


def signals_channel(namespace: str) -> str:
    """The one pub/sub channel of a log namespace: typing and presence signals for every process. It is
    in the presence keys' slot, so presence.lua may SPUBLISH to it on a cluster."""
    return f"{namespace}:{PRESENCE_TAG}:signals"


PRESENCE_TAG = "{presence}"
"""Every presence key and the signals channel share one slot (README, Redis Cluster: why one is enough)."""


class PresenceStore:
    """The Redis side of presence for one log namespace; every call is one atomic script or read."""

    def __init__(self, redis: RedisClient, namespace: str, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = f"{namespace}:{PRESENCE_TAG}"
        self.sharded = False
        """Publish with SPUBLISH (a Redis 7 cluster; `SignalBus` decides) rather than PUBLISH."""
        self.channel = signals_channel(namespace)
        self._keys = [f"{self.prefix}:expiry", f"{self.prefix}:online", f"{self.prefix}:seen"]
        self._script = redis.register_script(PRESENCE_SCRIPT)

    async def _run(self, op: str, *args: str | int) -> object:
        publisher = "SPUBLISH" if self.sharded else "PUBLISH"
        return await self._script(
            keys=self._keys, args=[op, self.prefix, self.channel, self.ttl_ms, publisher, *args]
        )

    async def publish(self, payload: bytes) -> None:
        """Publish one signal on the channel, sharded when the presence transitions are."""
        if self.sharded:
            await self.redis.spublish(self.channel, payload)
        else:
            await self.redis.publish(self.channel, payload)

    async def touch(self, connections: list[tuple[str, str]]) -> int:
        """Add or refresh (conn_id, user_id) records for one TTL; returns how many users went online."""
        args = [part for pair in connections for part in pair]
        return int(str(await self._run("touch", *args))) if args else 0

    async def leave(self, conn_id: str, user_id: str) -> bool:
        """Forget one connection; True when it was the user's last (they went offline, published)."""
        return await self.leave_many([(conn_id, user_id)]) == 1

    async def leave_many(self, connections: list[tuple[str, str]], grace_s: float = 0.0) -> int:
        """Forget (conn_id, user_id) records in one script call; returns how many users went offline. With
        `grace_s` they are kept that long instead (a sweep then forgets them, last seen when they left):
        a user who reconnects meanwhile (a network blip, a restart) goes neither offline nor online."""
        args = [part for pair in connections for part in pair]
        return int(str(await self._run("leave", round(grace_s * 1000), *args))) if args else 0

    async def sweep(self, limit: int) -> tuple[int, int]:
        """Forget at most `limit` expired connections; returns (forgotten, users gone offline)."""
        reply = await self._run("sweep", limit)
        assert isinstance(reply, list)
        return int(reply[0]), int(reply[1])

    async def snapshot(self, users: list[str]) -> list[PresenceEntry]:
        """Current presence of `users`, as the transitions published so far describe it."""
        if not users:
            return []
        online = await self.redis.hmget(self._keys[1], users)
        seen = await self.redis.hmget(self._keys[2], users)
        return [
            PresenceEntry(user, on is not None, None if on is not None or ms is None else int(ms) / 1000)
            for user, on, ms in zip(users, online, seen, strict=True)
        ]
