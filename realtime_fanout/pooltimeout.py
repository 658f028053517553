"""What the fanout does with psycopg_pool's timeout: forget the reference cycle the timed-out wait left.

`AsyncConnectionPool.getconn` raises a fresh `PoolTimeout` while handling the one its `WaitingClient`
keeps (`.error`), whose traceback holds the waiting frame, which holds the client: a cycle, and frames
hold their callers, so it held the fanout connection that asked (session, buffers, zlib contexts) until
the next full collection (PARLEY_FANOUT_GC_FULL_EVERY_S). Measured in the soak: a pool of 4 under
reconnects timed out about 30 times a minute.
"""

from __future__ import annotations


def forget_pool_wait(exc: BaseException) -> None:
    """Drop the tracebacks of the errors `exc` was raised while handling (its own is kept for logs)."""
    inner = exc.__context__
    while inner is not None:
        inner.__traceback__ = None
        inner = inner.__context__
