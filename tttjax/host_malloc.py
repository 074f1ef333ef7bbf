"""glibc malloc on transparent huge pages for XLA processes: a step's buffers fault 2 MiB at a time.

XLA:CPU mallocs every run's temporary buffer (655 MiB for the small config's train step) from the
thread that runs it. glibc serves a request that large from a fresh mmap and unmaps it on free, so
every step faults in every 4 KiB page again: ~177k minor faults and ~0.4 s of kernel time per
small-config step on 2 cores. With glibc's `glibc.malloc.hugetlb=1` tunable malloc advises
transparent huge pages for its mappings: ~1k faults per step (BENCHMARKS.md, "Host allocator").
Keeping the freed memory mapped instead (mallopt: one arena, no mmap, no trim) spared every fault
but put every thread's malloc behind one lock: the tiny config's training loop ran 30-40% slower.

glibc reads tunables when a process starts, so a launcher calls `reexec_with_huge_pages()` first:
it re-executes the same command once with the tunable added to GLIBC_TUNABLES (execve: the same
process id, so a scheduler's signals still reach it). It does nothing off glibc >= 2.35, when
transparent huge pages are disabled, when the tunable is already set, or with TTTJAX_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """glibc with the hugetlb tunable (2.35+) and transparent huge pages on ("always" or "madvise")."""
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def reexec_with_huge_pages() -> None:
    """Re-execute this process's command with malloc on huge pages (returns if nothing to do)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("TTTJAX_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables
            or not huge_pages_available()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, TUNABLE))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
