"""Benchmark of the WASM REPL (sandbox_wasm); prints figures, writes bench/results/sandbox.json.

Run: python bench/bench_sandbox.py [--context-mb 40]
Targets (DESIGN.md section 7): warm cell < 10 ms overhead; cold cell (new
instance + 40 MB context + snapshot restore) < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

from sandbox_wasm import ReplSession, SandboxLimits
from sandbox_wasm import _runtime

RESULTS = Path(__file__).resolve().parent / "results" / "sandbox.json"
NEEDLE_RE = r"needle-\d{4}"


def timed(fn):
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


def make_context(directory: Path, megabytes: int) -> Path:
    line = "lorem ipsum dolor sit amet, consectetur adipiscing elit; " * 3 + "\n"
    block = line * 1000
    path = directory / "context.txt"
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        index = 0
        while written < megabytes * 1024**2:
            handle.write(block)
            handle.write(f"needle-{index % 10000:04d}\n")
            written += len(block) + 12
            index += 1
    return path


FANOUT_CELL = ("step = len(context) // 20\n"
               "r = llm_query_batched([f'part {i}: ' + context[i * step:i * step + 2000] for i in range(20)])\n"
               "print(len(r))")


def use_boot_images(enabled: bool) -> None:
    """Runtimes made from now on boot guests from an image, or from scratch."""
    os.environ[_runtime.BOOT_IMAGE_ENV] = "1" if enabled else "0"
    _runtime.clear_memory_cache()


def repl_life_cpu_ms(tmp_path: Path, cache: Path, repeats: int = 10) -> dict[str, float]:
    words = "alpha beta gamma delta ledger orchid river stone".split()
    contexts = []
    for i in range(repeats + 2):  # a new file each time, as each run has its own context
        path = tmp_path / f"run{i}.txt"
        path.write_text(" ".join(words[(i + j) % len(words)] for j in range(700_000))[:4_000_000], encoding="utf-8")
        contexts.append(path)
    functions = {"llm_query_batched": lambda prompts, *a, **k: ["ok"] * len(prompts)}
    limits = SandboxLimits(cell_timeout_s=60.0, memory_bytes=2 * 1024**3)
    phases: dict[str, list[float]] = {}
    for path in contexts:
        marks = [time.process_time()]
        session = ReplSession(limits=limits, host_functions=functions, cache_dir=cache).start()
        marks.append(time.process_time())
        session.load_context([path], "str")
        marks.append(time.process_time())
        assert session.run_cell(FANOUT_CELL).output == "20\n"
        marks.append(time.process_time())
        session.snapshot()
        marks.append(time.process_time())
        session.close()
        marks.append(time.process_time())
        for name, began, ended in zip(("boot", "context_4mb", "cell", "first_snapshot", "close"), marks, marks[1:]):
            phases.setdefault(name, []).append(ended - began)
    out = {name: round(statistics.median(v[2:]) * 1000, 1) for name, v in phases.items()}  # first two: warm-up
    out["total"] = round(sum(out.values()), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context-mb", type=int, default=40)
    args = parser.parse_args()
    figures: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "load_avg_at_start": os.getloadavg()[0]}
    limits = SandboxLimits(cell_timeout_s=600.0, memory_bytes=2 * 1024**3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # 1. Cold start: compile the module into an empty cache.
        cache = tmp_path / "cache"
        compile_s, _ = timed(lambda: _runtime.get_runtime(cache))
        figures["compile_and_cache_s"] = round(compile_s, 3)
        # 2. Start from the cached module (disk -> memory) and boot the REPL.
        _runtime.clear_memory_cache()
        load_s, _ = timed(lambda: _runtime.get_runtime(cache))
        figures["cached_module_load_ms"] = round(load_s * 1000, 2)
        # The first session boots from scratch and is imaged; later ones start
        # from its image (sandbox_wasm/_boot_image.py).
        for images in (False, True):
            use_boot_images(images)
            boots = []
            for _ in range(6):
                boot_s, session = timed(lambda: ReplSession(limits=limits, cache_dir=cache).start())
                boots.append(boot_s)
                session.close()
            if images:
                figures["first_session_start_ms_incl_imaging"] = round(boots[0] * 1000, 1)
                figures["session_start_ms_median"] = round(statistics.median(boots[1:]) * 1000, 1)
            else:
                figures["session_start_ms_median_from_scratch"] = round(statistics.median(boots) * 1000, 1)

        functions = {"echo": lambda value: value, "noop": lambda: None}
        with ReplSession(limits=limits, host_functions=functions, cache_dir=cache) as session:
            # 3. Warm trivial cell, as seen by the host.
            times = [timed(lambda: session.run_cell("x = 1"))[0] for _ in range(1000)]
            figures["warm_cell_ms_median"] = round(statistics.median(times) * 1000, 3)
            figures["warm_cell_ms_p99"] = round(sorted(times)[989] * 1000, 3)
            # 4. Host call round trips, measured inside one cell.
            for label, setup in (("small", "payload = 'x' * 10"),
                                 ("100kb", "payload = 'x' * 100_000")):
                session.run_cell(setup)
                result = session.run_cell(
                    "import time\nt = time.perf_counter()\nfor _ in range(1000):\n"
                    "    echo(payload)\n(time.perf_counter() - t) / 1000")
                figures[f"host_call_roundtrip_us_{label}"] = round(float(result.value_repr) * 1e6, 1)

        # 5. 40 MB context: load, regex in guest vs native, snapshot and restore.
        context = make_context(tmp_path, args.context_mb)
        figures["context_bytes"] = context.stat().st_size
        with ReplSession(limits=limits, cache_dir=cache) as session:
            load_ctx_s, _ = timed(lambda: session.load_context([context], "str"))
            figures["context_load_ms"] = round(load_ctx_s * 1000, 1)
            guest = session.run_cell(
                "import re, time\nt = time.perf_counter()\n"
                f"hits = len(re.findall(r'{NEEDLE_RE}', context))\n(hits, time.perf_counter() - t)")
            guest_hits, guest_s = eval(guest.value_repr)
            text = context.read_text(encoding="utf-8")
            native_s, native_hits = timed(lambda: len(re.findall(NEEDLE_RE, text)))
            assert guest_hits == native_hits, (guest_hits, native_hits)
            figures["regex_40mb_guest_s"] = round(guest_s, 3)
            figures["regex_40mb_native_s"] = round(native_s, 3)
            figures["regex_guest_vs_native_x"] = round(guest_s / native_s, 2)
            session.run_cell(
                "docs = [context[i:i + 1000] for i in range(0, 2_000_000, 1000)]\n"
                "alias = context\n"
                "def count(word):\n    return context.count(word)\n")
            first_snap_s, snap = timed(session.snapshot)  # includes importing cloudpickle
            snap_s, snap = timed(session.snapshot)
            figures["snapshot_ms_first_incl_cloudpickle_import"] = round(first_snap_s * 1000, 1)
            figures["snapshot_ms_2mb_state_40mb_context"] = round(snap_s * 1000, 1)
            figures["snapshot_bytes"] = len(snap.data)
            restore_s, _ = timed(lambda: session.restore(snap.data))
            figures["restore_ms_same_instance"] = round(restore_s * 1000, 1)

        # 6. Cold cell: fresh instance + context reload + restore + a cell.
        colds, parts = [], []
        for _ in range(3):
            began = time.perf_counter()
            fresh = ReplSession(limits=limits, cache_dir=cache).start()
            booted = time.perf_counter()
            fresh.load_context([context], "str")
            loaded = time.perf_counter()
            fresh.restore(snap.data)
            restored = time.perf_counter()
            check = fresh.run_cell("len(docs), alias is context")
            colds.append(time.perf_counter() - began)
            parts.append((booted - began, loaded - booted, restored - loaded))
            fresh.close()
            assert check.value_repr == "(2000, True)", check
        figures["cold_cell_s_median"] = round(statistics.median(colds), 3)
        figures["cold_parts_ms_boot_load_restore"] = [
            round(statistics.median(p[i] for p in parts) * 1000, 1) for i in range(3)]

        # 7. One REPL's life in bench_many_runs: boot, a 4 MB context, the
        # fan-out cell (host functions answer at once), its first snapshot
        # (plain data), close. CPU of this process, all threads, per phase.
        figures["repl_life_cpu_ms"] = repl_life_cpu_ms(tmp_path, cache)
        use_boot_images(False)
        figures["repl_life_cpu_ms_from_scratch"] = repl_life_cpu_ms(tmp_path, cache)
        use_boot_images(True)

    figures["targets_met"] = {
        "warm_cell_under_10ms": figures["warm_cell_ms_median"] < 10,
        "cold_cell_under_1s": figures["cold_cell_s_median"] < 1.0,
    }
    figures["load_avg_at_end"] = os.getloadavg()[0]
    for key, value in figures.items():
        print(f"{key:40} {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
