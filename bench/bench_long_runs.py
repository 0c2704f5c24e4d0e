"""Long runs through continue-as-new: 20,000 sub-calls (and 200 turns).

    python bench/bench_long_runs.py [--calls 20000] [--batch 250] [--turns 200]

Sub-calls: `calls / batch` turns, each one cell with one llm_query_batched of
`batch` prompts; the run continues as new after every turn
(`continue_after_updates=1`), so every run of the chain holds one batch.
Checks the answer (the sum of all answers) and reports wall time, time per
sub-call, runs in the chain and the largest history (events, bytes) against
Temporal's warning size (10,240 events, 10 MB). Turns: `turns` one-cell
turns with continue-as-new forced every few turns. Private Temporal and S3
servers, the worker and the scripted model server in this process.
Figures go to bench/results/long_runs.json with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from tests.chaos.long_runs import WARN_BYTES, WARN_EVENTS, run_chain, script_subcalls, script_turns, sizes  # noqa: E402
from tests.run_harness import request  # noqa: E402
from activities.context_store import ContextStore  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402


async def _measure(settings, llm, req, workflow_id: str, expected: str) -> dict:
    async with h.running_worker(settings, h.registry(llm)) as (client, _pool):
        load_before = os.getloadavg()
        cpu0, t0 = time.process_time(), time.perf_counter()
        result, runs = await run_chain(client, settings, req, workflow_id, timeout_s=3 * 3600)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    per_run = sizes(runs)
    return {
        "status": result.status,
        "answer_ok": result.answer == expected,
        "wall_s": round(wall, 2),
        "process_cpu_s": round(cpu, 2),
        "runs_in_chain": len(runs),
        "max_events_per_run": max(e for e, _ in per_run),
        "max_history_bytes_per_run": max(b for _, b in per_run),
        "under_warning_size": all(e < WARN_EVENTS and b < WARN_BYTES for e, b in per_run),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    # 1,000 (the most one update carries) stalled a run on a machine at load 15-24:
    # one workflow activation starting 1,000 items passed the SDK's 2 s deadlock
    # detector (bench/README.md).
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault(h.FAKE_API_KEY_ENV, h.FAKE_API_KEY_VALUE)
    out: dict = {}
    with h.private_services() as svc, h.fake_llm_in_process() as llm:
        settings = svc.settings
        contexts = ContextStore(ObjectStore.from_settings(settings))
        turns = args.calls // args.batch
        expected = script_subcalls(llm, turns, args.batch)
        req = request("sum", contexts.put_value("n"), caps={"max_turns": turns + 1, "max_concurrency": 64},
                      limits={"continue_after_updates": 1})  # fmt: skip
        sub = asyncio.run(_measure(settings, llm, req, f"bench-subcalls-{os.getpid()}", expected))
        sub |= {"calls": turns * args.batch, "batch": args.batch, "ms_per_subcall": round(sub["wall_s"] / (turns * args.batch) * 1000, 2)}
        print("sub-calls:", sub)
        out["subcalls"] = sub
        llm.reset()
        expected = script_turns(llm, args.turns)
        req = request("sum", contexts.put_value("numbers"), caps={"max_turns": args.turns}, limits={"history_events": 200})
        many = asyncio.run(_measure(settings, llm, req, f"bench-turns-{os.getpid()}", expected))
        many |= {"turns": args.turns, "ms_per_turn": round(many["wall_s"] / args.turns * 1000, 1)}
        print("turns:", many)
        out["turns"] = many
    print("written", h.write_results("long_runs", out))


if __name__ == "__main__":
    main()
