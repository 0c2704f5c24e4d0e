"""Runs inside one candidate's virtualenv (started by bench_documents.py):
converts one file with that candidate, prints JSON: seconds, peak memory,
the text's length and whether the sample table survived.

    python _documents_probe.py CANDIDATE FILE REPEATS
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

TABLE = json.loads(sys.argv[4]) if len(sys.argv) > 4 else []


def convert_ours(path: Path) -> str:
    from activities.documents import convert, kind_of

    kind = kind_of(path)
    return path.read_text(encoding="utf-8") if kind == "text" else convert(path, kind)


def convert_markitdown(path: Path) -> str:
    from markitdown import MarkItDown

    return MarkItDown(enable_plugins=False).convert(str(path)).text_content


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it is
    not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def table_kept(text: str) -> bool:
    """Each row's cells in order on one line (any separators between)."""
    lines = text.splitlines()
    for row in TABLE:
        pattern = re.compile(r".*?".join(re.escape(c) for c in row))
        if not any(pattern.search(line) for line in lines):
            return False
    return True


def main() -> None:
    candidate, path, repeats = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    began = time.perf_counter()
    fn = {"ours": convert_ours, "markitdown": convert_markitdown}[candidate]
    times, text, error = [], "", None
    for _ in range(repeats):
        t = time.perf_counter()
        try:
            text = fn(path)
        except Exception as exc:  # noqa: BLE001 - a candidate's failure is a figure
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            break
        times.append(time.perf_counter() - t)
    print(json.dumps({
        "first_s": round(times[0], 4) if times else None,
        "median_s": round(sorted(times)[len(times) // 2], 4) if times else None,
        "process_s": round(time.perf_counter() - began, 3),
        "max_rss_mb": peak_rss_mb(),
        "chars": len(text),
        "table_kept": table_kept(text) if TABLE and not error else None,
        "error": error,
        "head": text[:300],
    }))


if __name__ == "__main__":
    main()
