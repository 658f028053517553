"""Redis clients whose pooled connections survive a Redis restart, and a way to send a write at most once.

A restart kills every pooled connection. A client from `redis_client` finds out before it is hurt: a
connection the server closed is replaced when it is taken from the pool (before anything is written on
it), one idle longer than the health-check interval is PINGed first, TCP keepalive finds peers that
vanished without closing, and a connection error is retried on a fresh connection (short backoff; a
timeout is not retried: a hung Redis shows at once). Retrying re-sends the command: right for reads,
PINGs, script loading and writes whose repetition is harmless, wrong for a write that may have run. Such
a command goes through `send_once`, which retries only what happens before any of its bytes are written
(connecting, the health-check PING)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

try:  # redis-py >= 7: with maintenance notifications on (their default, "auto", for RESP3) the pool
    # skips its check that a pooled connection is still open; they serve managed clusters, not Parley.
    from redis.maint_notifications import MaintNotificationsConfig

    _POOL_OPTIONS: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
except ImportError:  # pragma: no cover - older redis-py always checks
    _POOL_OPTIONS = {}

REDIS_RETRIES = 3
REDIS_HEALTH_CHECK_S = 15.0
Command = Sequence[Any]


def redis_client(
    url: str,
    socket_timeout_s: float | None,
    *,
    health_check_s: float = REDIS_HEALTH_CHECK_S,
    max_connections: int | None = None,
) -> aioredis.Redis:
    """A client on `url` whose dead pooled connections are replaced before a caller sees an error.

    `socket_timeout_s` bounds each reply (None: no bound; a blocking read needs more than its block time).
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES, (redis.exceptions.ConnectionError,))
    return aioredis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=2, socket_keepalive=True,
        health_check_interval=health_check_s, retry=retry, max_connections=max_connections, **_POOL_OPTIONS,
    )  # fmt: skip


async def send_once(client: aioredis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Send `commands` in one write on one pooled connection, and read a reply for each (an error reply
    as its `ResponseError`). They are never re-sent: only connecting and the idle connection's PING are
    retried, before anything is written.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: the connection failed; once the
            commands were written, whether they ran is unknown.
    """
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
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
    finally:
        await pool.release(conn)


async def run_script_once(
    client: aioredis.Redis,
    script: AsyncScript,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    then: Sequence[Command] = (),
) -> list[Any]:
    """Run `script` once per `(keys, args)` in `calls`, then `then`, in one write (`send_once`); returns
    every reply, an error reply as its exception. A call Redis answers NOSCRIPT did not run: the script is
    loaded and only those calls are sent again (with `then`, whose replies are the second ones)."""

    def evalsha(keys: Sequence[Any], args: Sequence[Any]) -> Command:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    replies = await send_once(client, [*(evalsha(k, a) for k, a in calls), *then])
    missing = [
        i for i, r in enumerate(replies[: len(calls)]) if isinstance(r, redis.exceptions.NoScriptError)
    ]
    if missing:
        await client.script_load(script.script)
        again = await send_once(client, [*(evalsha(*calls[i]) for i in missing), *then])
        for i, reply in zip(missing, again, strict=False):
            replies[i] = reply
        replies[len(calls) :] = again[len(missing) :]
    return replies


def raise_first_error(replies: Sequence[Any]) -> None:
    """Raise the first error reply among `replies`, as a pipeline does."""
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
