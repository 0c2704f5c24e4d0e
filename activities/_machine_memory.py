"""How much memory the guests of one worker may hold: a share of what this
process may use (the machine's memory, or a smaller cgroup limit); and how
the C library keeps freed memory for reuse."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

__all__ = ["guest_memory_budget", "keep_freed_memory", "machine_memory_bytes"]

# glibc maps fresh pages for each allocation above a moving threshold and
# gives them back at free, and trims the heap's free top past 128 KB: a batch
# of 200 prompts of 200 KB, copied guest -> host -> bytes, then page-faulted
# through ~120 MB each time. With these, llm_query_batched handed the 40 MB
# to the host in 0.037-0.040 s instead of 0.058-0.077 s (the 32 MiB mmap
# threshold is glibc's maximum on 64-bit; the trim threshold bounds what a
# worker holds beyond what it uses, per heap).
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 128 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def keep_freed_memory() -> bool:
    """Let this process reuse freed blocks up to MALLOC_MMAP_THRESHOLD
    instead of mapping fresh pages for each; False where the C library has
    no glibc `mallopt` (musl, macOS), which changes nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def machine_memory_bytes() -> int:
    """Memory this process may use: MemTotal, or a smaller cgroup limit."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
        break
    return total


def guest_memory_budget(share: float) -> int:
    """Bytes the guests of one worker may hold: `share` of the machine."""
    return int(machine_memory_bytes() * share)
