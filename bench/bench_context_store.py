"""Context store throughput against the embedded S3 server (SeaweedFS).

Starts a private pair of embedded services in a temp dir, then measures for
a 40 MB and a 400 MB context: upload from a file (streamed), upload again
(dedup: nothing new is stored), materialize to files (what a worker does for
the sandbox) and read back whole. With `--docs N`, also the same bytes as a
folder of N files: upload, upload with the copy `rlm run` writes into the
worker's cache, and materialize. Prints MB/s and writes
bench/results/context_store.json (`--output`).

    python bench/bench_context_store.py [--sizes 40,400] [--docs 20000] [--output context_store]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _harness import RESULTS_DIR, split_into_files  # noqa: E402

from activities.context_store import ContextStore  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from cli import services  # noqa: E402

MB = 1_000_000


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _write_text_file(path: Path, size: int) -> None:
    """`size` bytes of word-like text; every 1 MB block differs (no dedup)."""
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    base = " ".join(rng.choice(words) for _ in range(200_000)).encode()[: MB - 32]
    with path.open("wb") as handle:
        written = 0
        block = 0
        while written < size:
            data = (f"\nblock {block:09d}\n".encode() + base)[: size - written]
            handle.write(data)
            written += len(data)
            block += 1


def _write_folder(folder: Path, source: Path, docs: int, marker: str) -> list[Path]:
    """`source`'s text cut into `docs` files, the first starting with
    `marker` (a new context each time)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return split_into_files(marker + source.read_text(encoding="utf-8"), docs, folder)


def _timed(label: str, size_mb: float, fn, results: list[dict]):
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    row = {
        "case": label,
        "mb": round(size_mb, 1),
        "seconds": round(seconds, 3),
        "mb_per_s": round(size_mb / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    results.append(row)
    print(
        f"{label:<34} {size_mb:>7.1f} MB {seconds:>8.2f} s {row['mb_per_s']:>8.1f} MB/s"
        f"  peak RSS {row['peak_rss_mb']:.0f} MB"
    )
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="40,400", help="context sizes in MB, comma-separated")
    parser.add_argument("--docs", type=int, default=0, help="also as a folder of this many files")
    parser.add_argument("--output", default="context_store", help="results file name under bench/results")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rlm-bench-") as tmp:
        tmp_path = Path(tmp)
        settings = services.private_settings(tmp_path / "data")
        started = time.perf_counter()
        services.up(settings)
        startup = time.perf_counter() - started
        print(f"embedded services ready in {startup:.2f} s")
        try:
            store = ObjectStore.from_settings(settings)
            for size in sizes:
                path = tmp_path / f"context-{size}mb.txt"
                _write_text_file(path, size * MB)
                actual = path.stat().st_size / MB
                ref = _timed(
                    f"put_paths {size} MB (new)", actual, partial(ContextStore(store).put_paths, [path]), results
                )
                again = partial(ContextStore(store).put_paths, [path])
                _timed(f"put_paths {size} MB (again, dedup)", actual, again, results)
                materialize = partial(ContextStore(store).materialize, ref, tmp_path / "materialized")
                _timed(f"materialize {size} MB", actual, materialize, results)
                text = _timed(f"read_all {size} MB", actual, partial(ContextStore(store).read_all, ref), results)
                # An in-memory str (how activities store values); one byte differs, so
                # one chunk and the manifest are new: this measures hashing + checks.
                text = "#" + text[1:]
                put_text = partial(ContextStore(store).put_text, text)
                _timed(f"put_text {size} MB (1 chunk new)", actual, put_text, results)
                del text
                if args.docs > 1:
                    folder = tmp_path / "folder"
                    files = _write_folder(folder, path, args.docs, f"{time.time_ns()}\n")
                    label = f"{size} MB in {args.docs} files"
                    ref = _timed(f"put_paths {label}", actual, partial(ContextStore(store).put_paths, files), results)
                    into = tmp_path / "cache"
                    _timed(f"materialize {label}", actual, partial(ContextStore(store).materialize, ref, into), results)
                    files = _write_folder(folder, path, args.docs, f"{time.time_ns()}\n")
                    copy = partial(ContextStore(store).put_paths, files, copy_to=into)
                    _timed(f"put_paths {label} + cache copy", actual, copy, results)
                    shutil.rmtree(folder)
                    shutil.rmtree(into)
                path.unlink()
        finally:
            services.down(settings)
    report = {
        "benchmark": "context_store",
        "backend": "SeaweedFS weed mini (embedded, loopback)",
        "chunk_bytes": ContextStore.__init__.__kwdefaults__["chunk_bytes"],
        "services_startup_s": round(startup, 2),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
    }
    out = RESULTS_DIR / f"{args.output}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
