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
