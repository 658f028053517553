"""The process's memory as the interpreter and glibc see it, exported at scrape time.

RSS alone cannot tell live objects from memory an allocator keeps after a peak. These gauges can:
`parley_python_allocated_blocks` (objects and buffers the interpreter holds, `sys.getallocatedblocks`)
and glibc's `mallinfo2` (bytes in use, bytes free but kept, the heap's size). When the first two are flat
while RSS grows, the growth is the allocator's, not live objects (BENCHMARKS.md, soak: they grew together).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _libc() -> ctypes.CDLL | None:
    """glibc, or None elsewhere (musl, macOS): there the malloc figures are absent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):  # no glibc, or one older than 2.33 (no mallinfo2)
        return None
    return libc


_LIBC = _libc()


def mallinfo() -> dict[str, int]:
    """glibc's `mallinfo2` in bytes: `arena` (heap obtained with brk/mmap'd arenas), `uordblks` (in use),
    `fordblks` (free, kept by malloc), `hblkhd` (large blocks mmap'd one by one); {} without glibc."""
    if _LIBC is None:
        return {}
    info = _LIBC.mallinfo2()
    return {name: int(getattr(info, name)) for name in ("arena", "uordblks", "fordblks", "hblkhd")}


class MemoryCollector(Collector):
    """Computed at each scrape (a few microseconds: counters the interpreter and glibc keep anyway)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "parley_python_allocated_blocks",
            "Memory blocks the interpreter holds (sys.getallocatedblocks): live objects and buffers",
            value=sys.getallocatedblocks(),
        )
        gen = GaugeMetricFamily(
            "parley_python_gc_count",
            "gc.get_count(): allocations less deallocations since the last collection; collections of 1, 2",
            labels=["gen"],
        )
        for i, count in enumerate(gc.get_count()):
            gen.add_metric([str(i)], count)
        yield gen
        info = mallinfo()
        if info:
            family = GaugeMetricFamily(
                "parley_malloc_bytes",
                "glibc mallinfo2: arena (heap), uordblks (in use), fordblks (free but kept), hblkhd (mmap'd)",
                labels=["field"],
            )
            for name, value in info.items():
                family.add_metric([name], value)
            yield family


_registered = False


def register_memory_collector() -> None:
    """Add the gauges to the default registry once per process."""
    global _registered
    if not _registered:
        REGISTRY.register(MemoryCollector())
        _registered = True
