"""glibc malloc settings for a long-running XLA process: freed host memory is kept and reused.

XLA:CPU allocates every run's temporary buffer (655 MiB for the small config's train step) with
malloc from the thread that runs it. glibc serves a request that large from a fresh mmap (a
thread's arena cannot hold it), and unmaps it on free, so every step faults in every page of it
again: ~177k minor faults and ~0.5 s of kernel time per small-config step on 2 cores. One arena,
no mmap and no trimming keep those pages mapped: the next step reuses them without a fault
(BENCHMARKS.md, "host allocator"). The price: resident memory stays at its peak and holds the
reused blocks (the small config's step: 4.6 instead of 3.2 GiB, and 20-30% faster). Once more
than 2 GiB (mallopt's limit) lies free at the heap's top, glibc still gives it back, so a step that
frees more than that at once faults it in again. Set
TTTJAX_KEEP_FREED_MEMORY=0 to keep glibc's defaults.

glibc fixes the arena limit when a second thread first allocates, so `keep_freed_memory` must run
before the JAX runtime starts its threads: first thing in a launcher, before any JAX computation.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_ABOVE = 2**31 - 1  # mallopt takes an int: up to 2 GiB of free memory at the heap's top stays mapped


def keep_freed_memory() -> bool:
    """Set glibc malloc to one arena, no mmap, no trim; False (nothing changed) off glibc or when
    TTTJAX_KEEP_FREED_MEMORY=0."""
    if not sys.platform.startswith("linux") or os.environ.get("TTTJAX_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 / no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_ABOVE))
    return all(mallopt(param, value) == 1 for param, value in settings)
