"""The cyclic garbage collector on a schedule, not on allocation counts.

Measured (BENCHMARKS.md): the fanout and the projector create almost no cyclic garbage, yet the
collector's passes over their many live objects were the fanout's latency tail and a third of the
projector's CPU. So automatic collection is off; the young generations are collected every
`young_every_s` (cheap: few live young objects) and everything every `full_every_s` (one bounded pause,
observed in the given histogram, labelled young or full).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from prometheus_client import Histogram

from servicekit.supervisor import Policy, Supervisor


class GcPacer:
    """Disables automatic collection while running; `stop` restores it."""

    def __init__(self, pauses: Histogram, young_every_s: float = 1.0, full_every_s: float = 600.0) -> None:
        self.pauses = pauses
        self.young_every_s = young_every_s
        self.full_every_s = full_every_s
        self._task: asyncio.Task[None] | None = None
        self._was_enabled = gc.isenabled()

    def start(self, supervisor: Supervisor) -> None:
        """Disable automatic collection and collect on the schedule, as a task of `supervisor` (restarted
        after a crash: with automatic collection off, nothing else would collect)."""
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._task = supervisor.spawn("gc-pacer", self._run, Policy.RESTART)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._was_enabled:
            gc.enable()

    async def _run(self) -> None:
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(self.young_every_s)
            full = time.monotonic() - last_full >= self.full_every_s
            started = time.perf_counter()
            gc.collect(2 if full else 1)
            self.pauses.labels("full" if full else "young").observe(time.perf_counter() - started)
            if full:
                last_full = time.monotonic()
