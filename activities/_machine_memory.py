"""How much memory the guests of one worker may hold: a share of what this
process may use (the machine's memory, or a smaller cgroup limit)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["guest_memory_budget", "machine_memory_bytes"]


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
