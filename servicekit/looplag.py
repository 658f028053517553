"""The event loop's own lag: a probe task that sleeps a fixed interval and records how late it woke.

A late wake-up is time the loop spent on something else (a long synchronous step, a collection, the OS
not scheduling the process): it bounds every latency the service can offer, so it is exported beside
them, in `parley_loop_lag_seconds{service}`.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Histogram

from servicekit.supervisor import Policy, Supervisor

LOOP_LAG_SECONDS = Histogram(
    "parley_loop_lag_seconds",
    "How late the event loop woke a probe task sleeping a fixed interval (scheduling delay)",
    ["service"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
PROBE_EVERY_S = 0.05


def start_loop_lag_probe(supervisor: Supervisor, every_s: float = PROBE_EVERY_S) -> asyncio.Task[None]:
    """Probe the running loop every `every_s` as a task of `supervisor` (restarted after a crash)."""
    observed = LOOP_LAG_SECONDS.labels(supervisor.service)

    async def probe() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(every_s)
            observed.observe(max(0.0, time.perf_counter() - started - every_s))

    return supervisor.spawn("loop-lag", probe, Policy.RESTART)
