"""Redis clients whose pooled connections survive a Redis restart, and a way to send a write at most once.

A restart kills every pooled connection. A client from `redis_client` finds out before it is hurt: a
connection the server closed is replaced when it is taken from the pool (before anything is written on
it), one idle longer than the health-check interval is PINGed first, TCP keepalive finds peers that
vanished without closing, and a connection error is retried on a fresh connection (short backoff; a
timeout is not retried: a hung Redis shows at once). Retrying re-sends the command: right for reads,
PINGs, script loading and writes whose repetition is harmless, wrong for a write that may have run. Such
a command goes through `send_once`, which retries only what happens before any of its bytes are written
(connecting, the health-check PING).

With `cluster=True` the client is a `RedisCluster` that learns the topology from the node the URL names
and follows MOVED/ASK; `send_once` then goes to the node serving one routing key's slot, and resends only
what a node refused without running it (MOVED, ASK, TRYAGAIN, CLUSTERDOWN)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeAlias

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException

try:  # redis-py >= 7: with maintenance notifications on (their default, "auto", for RESP3) the pool
    # skips its check that a pooled connection is still open; they serve managed clusters, not Parley.
    from redis.maint_notifications import MaintNotificationsConfig

    _POOL_OPTIONS: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
except ImportError:  # pragma: no cover - older redis-py always checks
    _POOL_OPTIONS = {}

REDIS_RETRIES = 3
REDIS_HEALTH_CHECK_S = 15.0
CLUSTER_REDIRECTS = 8
"""How often `send_once` follows a refusal (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) before giving up."""
Command = Sequence[Any]
RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""A single Redis or a Redis Cluster: every service takes either (`redis_client(..., cluster=)`)."""
REDIS_ERRORS: tuple[type[redis.exceptions.RedisError], type[RedisClusterException]] = (
    redis.exceptions.RedisError,
    RedisClusterException,
)
"""What a call to a Redis or a Redis Cluster may raise (a cluster client with no node for a slot raises a
`RedisClusterException`, which is no `RedisError`)."""
_REFUSED = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def redis_client(
    url: str,
    socket_timeout_s: float | None,
    *,
    cluster: bool = False,
    health_check_s: float = REDIS_HEALTH_CHECK_S,
    max_connections: int | None = None,
    pool_wait_s: float | None = None,
) -> RedisClient:
    """A client on `url` whose dead pooled connections are replaced before a caller sees an error; with
    `cluster`, on the Redis Cluster one of whose nodes `url` names (`max_connections` is then per node).

    `socket_timeout_s` bounds each reply (None: no bound; a blocking read needs more than its block time).
    `pool_wait_s` (one Redis only): when all `max_connections` (default 100) are busy, a command waits up to
    that long for one rather than failing at once ("Too many connections"), as a reconnect storm's burst
    of resumes would.
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES, (redis.exceptions.ConnectionError,))
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s, "socket_connect_timeout": 2, "socket_keepalive": True,
        "health_check_interval": health_check_s, "retry": retry,
    }  # fmt: skip
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections or 100, **options)
    if pool_wait_s is not None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections or 100, timeout=pool_wait_s, **options, **_POOL_OPTIONS
        )
        return aioredis.Redis.from_pool(pool)
    return aioredis.Redis.from_url(url, max_connections=max_connections, **options, **_POOL_OPTIONS)


def slot_group(client: RedisClient, key: str) -> int:
    """What batches of one-slot work are keyed by: `key`'s slot on a cluster, 0 (one batch) otherwise."""
    return client.keyslot(key) if isinstance(client, RedisCluster) else 0


async def _exchange(conn: Connection, commands: Sequence[Command]) -> list[Any]:
    """Write `commands` at once on `conn` and read a reply for each, an error reply as its exception."""
    try:
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except redis.exceptions.ResponseError as exc:  # a whole reply: the connection is fine
                replies.append(exc)
        return replies
    except BaseException:
        await conn.disconnect()  # replies may be pending on it
        raise


async def send_on_node(node: ClusterNode, commands: Sequence[Command]) -> list[Any]:
    """Send `commands` in one write on one of `node`'s connections and read a reply for each (an error
    reply as its exception); nothing is re-sent."""
    conn = node.acquire_connection()
    try:
        return await _exchange(conn, commands)
    finally:
        node.release(conn)


async def send_once(client: RedisClient, commands: Sequence[Command], route: Any = None) -> list[Any]:
    """Send `commands` in one write on one pooled connection, and read a reply for each (an error reply
    as its `ResponseError`). They are never re-sent: only connecting and the idle connection's PING are
    retried, before anything is written. On a cluster they go to the node serving `route`'s slot (every
    key they name must be in that slot); what the node refused unrun is sent again where it points.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: the connection failed; once the
            commands were written, whether they ran is unknown.
    """
    if isinstance(client, RedisCluster):
        return await _send_once_cluster(client, commands, route)
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await _exchange(conn, commands)
    finally:
        await pool.release(conn)


async def _send_once_cluster(client: RedisCluster, commands: Sequence[Command], route: Any) -> list[Any]:
    if route is None:
        raise ValueError("send_once on a cluster needs a routing key")
    slot = client.keyslot(route)
    asking: ClusterNode | None = None
    for attempt in range(CLUSTER_REDIRECTS):
        try:
            await learn_topology(client)
            node = asking or client.nodes_manager.get_node_from_slot(slot)
        except (RedisClusterException, redis.exceptions.ConnectionError) as exc:  # no map of the slots now
            await refresh_topology(client)
            await asyncio.sleep(0.05 * (attempt + 1))
            if attempt == CLUSTER_REDIRECTS - 1:
                raise redis.exceptions.ConnectionError(f"slot {slot}: no node known: {exc}") from exc
            continue
        sent = [("ASKING",), *commands] if asking is not None else list(commands)
        try:
            replies = await send_on_node(node, sent)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await refresh_topology(client)  # a failover: the next call goes to the promoted replica
            raise
        if asking is not None:
            replies, asking = replies[1:], None
        first = replies[0] if replies else None
        if not isinstance(first, _REFUSED):
            return replies
        if isinstance(first, redis.exceptions.MovedError):
            await client.nodes_manager.move_slot(first)
        elif isinstance(first, redis.exceptions.AskError):
            asking = client.get_node(first.host, first.port) or ClusterNode(
                first.host, first.port, **client.nodes_manager.connection_kwargs
            )
        else:
            await asyncio.sleep(0.05 * (attempt + 1))
            if isinstance(first, redis.exceptions.ClusterDownError):
                await refresh_topology(client)
    raise redis.exceptions.ClusterError(f"slot {slot}: still refused after {CLUSTER_REDIRECTS} redirects")


async def learn_topology(client: RedisCluster) -> None:
    """Learn the topology if the client has none (fresh, or after a failed refresh), within
    REFRESH_TIMEOUT_S.

    Raises:
        redis.exceptions.ConnectionError: no node answered in time.
    """
    if not client._initialize:  # what execute_command checks too
        return
    try:
        await asyncio.wait_for(client.initialize(), REFRESH_TIMEOUT_S)
    except TimeoutError as exc:
        raise redis.exceptions.ConnectionError("the cluster's topology could not be learned in time") from exc


REFRESH_TIMEOUT_S = 5.0
"""A topology refresh that takes longer is abandoned (the next call tries again), never waited on."""


async def refresh_topology(client: RedisCluster) -> None:
    """Learn the slots' owners again (after a failover); a cluster still electing leaves the old map."""
    try:
        await asyncio.wait_for(client.nodes_manager.initialize(), REFRESH_TIMEOUT_S)
    except (redis.exceptions.RedisError, RedisClusterException, TimeoutError):
        client._initialize = True  # the next call learns it again (learn_topology)


async def run_script_once(
    client: RedisClient,
    script: AsyncScript,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    then: Sequence[Command] = (),
) -> list[Any]:
    """Run `script` once per `(keys, args)` in `calls`, then `then`, in one write (`send_once`); returns
    every reply, an error reply as its exception. A call Redis answers NOSCRIPT did not run: the script is
    loaded and only those calls are sent again (with `then`, whose replies are the second ones). On a
    cluster every key of every call must be in one slot (the first key's routes them)."""

    def evalsha(keys: Sequence[Any], args: Sequence[Any]) -> Command:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    route = calls[0][0][0] if calls and calls[0][0] else None
    replies = await send_once(client, [*(evalsha(k, a) for k, a in calls), *then], route)
    missing = [
        i for i, r in enumerate(replies[: len(calls)]) if isinstance(r, redis.exceptions.NoScriptError)
    ]
    if missing:
        await client.script_load(script.script)
        again = await send_once(client, [*(evalsha(*calls[i]) for i in missing), *then], route)
        for i, reply in zip(missing, again, strict=False):
            replies[i] = reply
        replies[len(calls) :] = again[len(missing) :]
    return replies


def raise_first_error(replies: Sequence[Any]) -> None:
    """Raise the first error reply among `replies`, as a pipeline does."""
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
