"""The memory gauges tell live objects from what glibc keeps (servicekit.memstats; the soak's fanouts,
BENCHMARKS.md)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from servicekit.memstats import MemoryCollector, mallinfo


def test_the_collector_exports_the_interpreters_blocks_and_mallocs_bytes() -> None:
    registry = CollectorRegistry()
    registry.register(MemoryCollector())
    text = generate_latest(registry).decode()
    assert "parley_python_allocated_blocks " in text
    assert 'parley_python_gc_count{gen="2"}' in text
    if mallinfo():
        for name in ("arena", "uordblks", "fordblks", "hblkhd"):
            assert f'parley_malloc_bytes{{field="{name}"}}' in text


@pytest.mark.skipif(not mallinfo(), reason="glibc's mallinfo2 is not available here")
def test_live_buffers_count_as_in_use_and_freed_ones_leave_it() -> None:
    """2 KiB buffers (over pymalloc's 512 B: glibc's) are `uordblks` while alive and leave it once freed (one
    in 64 kept). Where the freed bytes go, `fordblks` or back to the system, is glibc's choice: not asserted
    (it differed between a lone run and the full suite)."""
    before = mallinfo()
    peak = [bytes(2048) for _ in range(20_000)]  # ~40 MiB
    during = mallinfo()
    assert during["uordblks"] - before["uordblks"] > 35 * 2**20
    kept = peak[::64]
    del peak
    after = mallinfo()
    assert during["uordblks"] - after["uordblks"] > 35 * 2**20
    assert len(kept) == 313
