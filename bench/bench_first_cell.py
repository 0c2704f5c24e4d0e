"""The first cell of a run: how much of its REPL's making (boot, context load)
the root model's first answer hides.

    python bench/bench_first_cell.py [--sizes 40 200] [--root-delays 0 2] [--repeats 3]
                                     [--docs 1] [--output first_cell]

A run's first root turn asks its worker to make the REPL of its first cell
while the model answers (activities/_repl_pool.py `prepare`); the cell then
finds it ready. With an instant model (delay 0) the cell waits for the rest
of the making, so its time shows what that costs; with a model that takes
seconds, as real ones do, the cell's time is its code's alone. Each run has
a context of its own (a new first line: nothing is deduplicated), uploaded
as `rlm run` does (the copy into the worker's cache included, timed as
`staging_s`); the first cell is `print(len(context))`. With `--docs N` a
context is a folder of N documents of equal size instead of one file (a
`list[str]` context).
Real worker in this process, Temporal dev server, SeaweedFS; the scripted
model server. Figures go to bench/results/first_cell.json (`--output`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from activities.context_store import ContextStore  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.fixtures_llm import FAKE_API_KEY_ENV, FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES, fake_registry  # noqa: E402
from tests.run_harness import ROOT, repl, request, running_worker, start  # noqa: E402

LINE = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu\n"


async def one_run(client, settings, store: ObjectStore, paths: list[Path]) -> dict:
    started = time.perf_counter()
    ref = ContextStore(store).put_paths(paths, copy_to=settings.context_cache_dir)
    staging_s = time.perf_counter() - started
    handle = await start(client, settings, request("How long is the context?", ref))
    result = await asyncio.wait_for(handle.result(), 600)
    if result.status != "completed":
        raise RuntimeError(f"run ended {result.status}: {result.reason}")
    activities, _, total = h.history_timeline(await handle.fetch_history())
    cell = next(a for a in activities if a.kind == "run_cell")
    return {"staging_s": round(staging_s, 3), "workflow_s": round(total, 3), "first_cell_ms": round(cell.run_s * 1000, 1)}


def write_context(directory: Path, size_mb: int, docs: int) -> list[Path]:
    """`docs` files of `size_mb` MB in all, the first line new each time (nothing deduplicated)."""
    directory.mkdir()
    lines = max(1, size_mb * 1024 * 1024 // len(LINE) // docs)
    paths = [directory / f"{i:06d}.txt" for i in range(docs)]
    for i, path in enumerate(paths):
        path.write_text(f"run {uuid.uuid4()} doc {i}\n" + LINE * lines)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 200], help="context sizes, MB")
    parser.add_argument("--root-delays", type=float, nargs="+", default=[0.0, 2.0], help="seconds the first root turn takes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=1, help="documents per context (a folder when more than 1)")
    parser.add_argument("--output", default="first_cell")
    args = parser.parse_args()

    os.environ[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rlm-first-cell-") as tmp, h.private_services() as svc:
        settings = svc.settings.model_copy(update={"task_queue": f"first-cell-{uuid.uuid4().hex[:6]}"})
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        for delay in args.root_delays:
            fake = FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)).start()
            fake.add_rule("Turn 1 of", repl("print(len(context))"), model=ROOT, delay_s=delay)
            fake.add_rule("Turn 2 of", "FINAL(measured)", model=ROOT)

            async def go(fake=fake, delay=delay) -> None:
                async with running_worker(settings, fake_registry(fake)) as client:
                    for size in args.sizes:
                        for i in range(args.repeats):
                            paths = write_context(Path(tmp) / f"context-{size}-{delay}-{i}", size, args.docs)
                            row = {"context_mb": size, "docs": args.docs, "root_delay_s": delay} | await one_run(
                                client, settings, store, paths)
                            shutil.rmtree(paths[0].parent)
                            rows.append(row)
                            print(f"{size} MB in {args.docs} document(s), first root turn {delay:.1f} s: first cell {row['first_cell_ms']:.0f} ms "
                                  f"(staged in {row['staging_s']:.2f} s, workflow {row['workflow_s']:.2f} s)", flush=True)

            try:
                asyncio.run(go())
            finally:
                fake.stop()

    summary = {
        f"{size}mb{f'_{args.docs}docs' if args.docs > 1 else ''}_root_{delay:g}s_first_cell_ms": h.spread(
            [r["first_cell_ms"] for r in rows if r["context_mb"] == size and r["root_delay_s"] == delay], 1
        )
        for size in args.sizes
        for delay in args.root_delays
    } | {
        f"{size}mb{f'_{args.docs}docs' if args.docs > 1 else ''}_staging_s": h.spread(
            [r["staging_s"] for r in rows if r["context_mb"] == size], 3
        )
        for size in args.sizes
    }
    for key, value in summary.items():
        print(f"{key}: median {value['median']}")
    print(f"results: {h.write_results(args.output, {'summary': summary, 'runs': rows})}")


if __name__ == "__main__":
    main()
