"""`python -m realtime_fanout` under cProfile, for `benchmarks.c100k --cprofile FILE`: the first SIGUSR2
starts the profiler, the next one stops it and writes its stats to $PARLEY_CPROFILE_OUT (pstats format)."""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from types import FrameType


def main() -> None:
    out = os.environ["PARLEY_CPROFILE_OUT"]
    profiler = cProfile.Profile()
    running = [False]

    def toggle(_signum: int, _frame: FrameType | None) -> None:
        if running[0]:
            profiler.disable()
            profiler.dump_stats(out)
        else:
            profiler.enable()
        running[0] = not running[0]

    signal.signal(signal.SIGUSR2, toggle)
    from realtime_fanout.__main__ import main as fanout_main

    sys.exit(fanout_main([]))


if __name__ == "__main__":
    main()
