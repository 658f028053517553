"""What machine a benchmark ran on: printed with every result."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime


def describe(redis_server: str | None = None) -> str:
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as meminfo:
            memory = f", {int(meminfo.readline().split()[1]) // 1024 // 1024} GiB"
    except (OSError, ValueError, IndexError):
        pass
    parts = [
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"{os.cpu_count()} cores ({model}){memory}",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
    ]
    if redis_server:
        version = subprocess.run([redis_server, "--version"], capture_output=True, text=True).stdout.split()
        parts.append(next((v for v in version if v.startswith("v=")), "redis ?").replace("v=", "Redis "))
    return "; ".join(parts)


class HostShare:
    """How much of its CPUs the host took from this machine meanwhile (`steal` in /proc/stat: time a
    virtual CPU was ready to run but the hypervisor ran someone else) and how busy the machine was: what
    a latency tail that every process shows at once comes from, and none of them can fix."""

    def __enter__(self) -> HostShare:
        self.start = _cpu_ticks()
        self.end = self.start
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = _cpu_ticks()

    def summary(self) -> str:
        steal, busy, total = (b - a for a, b in zip(self.start, self.end, strict=True))
        if total <= 0:
            return "host share: not measured"
        return f"CPU steal {steal / total:.1%} of the time (the host's), busy {busy / total:.0%} (this machine's)"


def _cpu_ticks() -> tuple[int, int, int]:
    """(steal, busy, total) clock ticks over all CPUs since boot; zeros where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (
        steal,
        user + nice + system + irq + softirq,
        user + nice + system + idle + iowait + irq + softirq + steal,
    )
