"""The supervisor's policies on real asyncio tasks: a crash is logged with context and counted, then the
task is restarted with backoff (RESTART) or stopped loudly (STOP: CRITICAL, `check` raises, `on_stop`)."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from servicekit.exceptions import TaskStopped
from servicekit.metrics import TASK_FAILURES, TASK_STOPPED
from servicekit.supervisor import Policy, Supervisor, cancel_and_wait, honour_cancellation


def failures(service: str, task: str, policy: str) -> float:
    return float(TASK_FAILURES.labels(service, task, policy)._value.get())


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_crashing_task_is_restarted_with_backoff_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor("svc-restart", backoff_s=0.01, backoff_max_s=0.04)
    runs: list[float] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 5:
            raise RuntimeError(f"bug {len(runs)}")
        done.set()

    supervisor.spawn("flaky", flaky, Policy.RESTART, context=lambda: f"run {len(runs)}")
    await asyncio.wait_for(done.wait(), 5)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(gap >= 0.009 for gap in gaps) and gaps[-1] >= 0.039  # doubling, capped at the maximum
    assert failures("svc-restart", "flaky", "restart") == 4
    errors = [r for r in caplog.records if r.name == "servicekit.supervisor"]
    assert [r.levelno for r in errors] == [logging.ERROR] * 4
    assert errors[0].getMessage() == "svc-restart task flaky crashed (run 1); restarting in 0.0s"
    assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "bug 1"
    supervisor.check()  # restarted tasks never fail readiness
    await supervisor.close()


async def test_a_crash_under_stop_is_critical_fails_the_check_and_runs_on_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor("svc-stop")
    stopped: list[BaseException] = []

    async def buggy() -> None:
        raise ValueError("a bug")

    task = supervisor.spawn("buggy", buggy, Policy.STOP, on_stop=stopped.append)
    await asyncio.wait_for(task, 5)
    assert [str(e) for e in stopped] == ["a bug"]
    (record,) = [r for r in caplog.records if r.name == "servicekit.supervisor"]
    assert record.levelno == logging.CRITICAL
    assert record.getMessage() == "SVC-STOP STOPPED: task buggy crashed; /readyz fails until a restart"
    with pytest.raises(TaskStopped, match="buggy: crashed: ValueError: a bug"):
        supervisor.check()
    assert failures("svc-stop", "buggy", "stop") == 1
    assert TASK_STOPPED.labels("svc-stop", "buggy")._value.get() == 1
    supervisor.spawn("buggy", forever, Policy.STOP)  # started again: ready again
    supervisor.check()
    assert TASK_STOPPED.labels("svc-stop", "buggy")._value.get() == 0
    await supervisor.close()


async def test_a_task_that_returns_is_done_and_cancellation_is_not_a_crash() -> None:
    supervisor = Supervisor("svc-end")
    runs: list[int] = []

    async def once() -> None:
        runs.append(1)

    await asyncio.wait_for(supervisor.spawn("once", once, Policy.RESTART), 5)
    waiting = supervisor.spawn("waits", forever, Policy.STOP)
    await asyncio.sleep(0)
    await supervisor.close()
    assert runs == [1] and waiting.cancelled()
    supervisor.check()
    assert supervisor.failures == 0


async def test_a_loop_ends_on_cancel_even_when_a_call_swallowed_the_cancellation() -> None:
    """As Python 3.11's `wait_for` may when a result races the cancel (CPython gh-86296)."""
    rounds: list[int] = []

    async def swallowing_call() -> None:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass  # the bug: the result won, the cancellation is lost

    async def loop() -> None:
        while True:
            honour_cancellation()
            rounds.append(1)
            await swallowing_call()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert rounds


async def test_cancel_and_wait_cancels_again_a_loop_that_lost_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop that does not honour a lost cancellation (no `honour_cancellation`) is cancelled again."""
    lost: list[int] = []

    async def careless_loop() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if not lost:
                    lost.append(1)  # the first cancel is swallowed, as the 3.11 bug does
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise

    task = asyncio.create_task(careless_loop())
    await asyncio.sleep(0.02)
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(cancel_and_wait([task], "test", again_after_s=0.05), 5)
    assert task.cancelled() and lost == [1]
    assert "still running" in caplog.text
