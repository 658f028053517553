"""A service under tracemalloc for the benchmarks: each SIGUSR1 collects in full, then dumps a snapshot
(PARLEY_PROFILE_DIR/snapshot-K.tracemalloc) and what `sizes` returns (sizes-K.json)."""

from __future__ import annotations

import gc
import json
import os
import signal
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

FRAMES = int(os.environ.get("PARLEY_PROFILE_FRAMES", "1"))  # frames per traceback (1: by line)


def type_counts() -> dict[str, int]:
    """Objects the collector tracks, per type (the 40 most numerous)."""
    counts: dict[str, int] = {}
    for o in gc.get_objects():
        counts[type(o).__qualname__] = counts.get(type(o).__qualname__, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:40])


def profile_on_signal(sizes: Callable[[], dict[str, Any]] = lambda: {"gc_counts": type_counts()}) -> None:
    """Start tracing and dump on each SIGUSR1 (a profiling aid: a failing `sizes` is written, not raised)."""
    out = Path(os.environ["PARLEY_PROFILE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    taken = [0]

    def dump(_signum: int, _frame: FrameType | None) -> None:
        taken[0] += 1
        gc.collect()
        tracemalloc.take_snapshot().dump(str(out / f"snapshot-{taken[0]}.tracemalloc"))
        try:
            found = sizes()
        except Exception as exc:  # a profiling aid: say what failed rather than break the served loop
            found = {"error": repr(exc)}
        (out / f"sizes-{taken[0]}.json").write_text(json.dumps(found, indent=1))

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)


def top_growth(folder: Path, a: int, b: int, top: int = 15) -> list[str]:
    """The lines whose traced bytes grew most from snapshot `a` to `b`, in KiB."""
    old = tracemalloc.Snapshot.load(str(folder / f"snapshot-{a}.tracemalloc"))
    new = tracemalloc.Snapshot.load(str(folder / f"snapshot-{b}.tracemalloc"))
    stats = new.compare_to(old, "lineno")
    total = sum(s.size_diff for s in stats)
    lines = [f"traced {sum(s.size for s in old.statistics('filename')) / 2**20:.1f} -> "
             f"{sum(s.size for s in new.statistics('filename')) / 2**20:.1f} MiB ({total / 2**20:+.2f} MiB)"]  # fmt: skip
    for s in stats[:top]:
        frame = s.traceback[0]
        lines.append(
            f"{s.size_diff / 1024:+10,.1f} KiB {s.count_diff:+8,} blocks  {frame.filename}:{frame.lineno}"
        )
    return lines
