"""`python -m projector` (worker and query API) under tracemalloc, for `benchmarks.soak --service-module
projector0:benchmarks.profiled_projector`: each SIGUSR1 dumps a snapshot into PARLEY_PROFILE_DIR."""

from __future__ import annotations

import sys

from benchmarks.profiling import profile_on_signal

if __name__ == "__main__":
    profile_on_signal()
    from projector.__main__ import main

    sys.exit(main([]))
