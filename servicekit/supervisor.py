"""Every long-lived task of a service runs under one `Supervisor`, by a stated `Policy`.

A task that raises unexpectedly (anything but cancellation) is logged with its name, its context and the
traceback, counted in `parley_task_failures_total{service,task,policy}`, and then either restarted with
backoff (`RESTART`: its state survives the crash, e.g. a retry loop) or stopped loudly (`STOP`: going on
could skip or misdeliver data): a CRITICAL log line, `parley_task_stopped{service,task}` at 1, and
`check()` (wired into /readyz) raising until the service is restarted. A task that returns is done.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from servicekit.exceptions import TaskStopped
from servicekit.metrics import TASK_FAILURES, TASK_STOPPED

log = logging.getLogger(__name__)

BACKOFF_S = 0.1
BACKOFF_MAX_S = 5.0
HEALTHY_AFTER_S = 30.0  # a task that ran this long before crashing restarts at the shortest backoff


def honour_cancellation() -> None:
    """Raise CancelledError when the current task was asked to stop. On Python 3.11 `asyncio.wait_for`
    (redis-py waits for every reply with it) can swallow a cancellation that races a result (CPython
    gh-86296); a loop around such a call must check, or `stop()` waits for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: list[asyncio.Task[None]], name: str, again_after_s: float = 1.0) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again each `again_after_s` those that
    go on (a loop without `honour_cancellation` around a call that swallowed the cancel): a backstop, so a
    lost cancellation costs a warning and a second, never a stopped reader. Their outcomes stay in them."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_after_s)
        if pending:
            log.warning("%d %s task(s) still running %.1fs after a cancel: cancelling again",
                        len(pending), name, again_after_s)  # fmt: skip


class Policy(enum.Enum):
    """What a crash of a task leads to."""

    RESTART = "restart"
    STOP = "stop"


class Supervisor:
    """The long-lived tasks of one service (`service` names it in logs and metrics)."""

    def __init__(
        self, service: str, *, backoff_s: float = BACKOFF_S, backoff_max_s: float = BACKOFF_MAX_S
    ) -> None:
        self.service = service
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stopped: dict[str, str] = {}
        self.failures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(
        self,
        name: str,
        run: Callable[[], Awaitable[object]],
        policy: Policy,
        *,
        context: Callable[[], str] | None = None,
        on_stop: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[None]:
        """Start `run()` as the task `name`; a crash is handled by `policy` (`run` is called again on a
        restart). `context()` adds what the log line should say of the state at the crash; `on_stop(exc)`
        runs once the task stopped under `STOP` (e.g. to close what depended on it)."""
        self.stopped.pop(name, None)
        TASK_STOPPED.labels(self.service, name).set(0)
        task = asyncio.create_task(self._supervise(name, run, policy, context, on_stop), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def check(self) -> None:
        """Raise TaskStopped naming every task stopped under `STOP` (for /readyz)."""
        if self.stopped:
            raise TaskStopped("; ".join(f"{name}: {why}" for name, why in sorted(self.stopped.items())))

    async def close(self) -> None:
        """Cancel every task still running and wait for them (cancelling again any that goes on)."""
        await cancel_and_wait(list(self._tasks), self.service)

    async def _supervise(
        self,
        name: str,
        run: Callable[[], Awaitable[object]],
        policy: Policy,
        context: Callable[[], str] | None,
        on_stop: Callable[[BaseException], None] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff_s
        while True:
            started = loop.time()
            try:
                await run()
                return
            except Exception as exc:  # the supervisor's whole point: any bug, handled by the policy
                self.failures += 1
                TASK_FAILURES.labels(self.service, name, policy.value).inc()
                where = f" ({context()})" if context is not None else ""
                if policy is Policy.STOP:
                    self.stopped[name] = f"crashed: {type(exc).__name__}: {exc}".strip()
                    TASK_STOPPED.labels(self.service, name).set(1)
                    log.critical("%s STOPPED: task %s crashed%s; /readyz fails until a restart",
                                 self.service.upper(), name, where, exc_info=exc)  # fmt: skip
                    if on_stop is not None:
                        on_stop(exc)
                    return
                if loop.time() - started >= HEALTHY_AFTER_S:
                    delay = self.backoff_s
                log.error("%s task %s crashed%s; restarting in %.1fs",
                          self.service, name, where, delay, exc_info=exc)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
