"""Session benchmark: what a question costs in a session against a plain run.

    python bench/bench_sessions.py [--mb 10] [--repeats 5]

Each question is two root turns with an instant scripted model: a cell that
defines a variable from `context`, then FINAL. Measured, wall time per
question (ask sent -> RunResult back):
- run:          a plain RLMRun of the same question (fresh REPL: the
                context is loaded into a new instance);
- session warm: an ask of an open session whose REPL is warm on the worker
                (the question's run takes the REPL the previous one left);
- session cold: the same after the worker's idle REPLs were closed (what an
                idle session costs on its next question: new instance,
                context reload, snapshot restore).
Also the part of an ask spent outside the question's own run (child start,
the `session_history` cell, update round trip). Figures go to bench/results/sessions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from activities.context_store import ContextStore  # noqa: E402
from activities.logging import configure_logging  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from tests.run_harness import ROOT, repl, request, start  # noqa: E402
from tests.session_harness import ask, close, session_request, start_session  # noqa: E402

MB = 1_000_000


def _script(fake) -> None:
    fake.add_rule("Turn 1 of", repl("n = len(context)\nprint('ok', n)"), model=ROOT)
    fake.add_rule("ok ", "FINAL(done)", model=ROOT)


def _span_s(history) -> float:
    return (history.events[-1].event_time.ToDatetime() - history.events[0].event_time.ToDatetime()).total_seconds()


async def measure(settings, fake, ctx, repeats: int) -> dict:
    settings = settings.model_copy(update={"task_queue": f"bench-{uuid.uuid4().hex[:8]}"})
    out: dict[str, list[float]] = {"run_s": [], "session_warm_s": [], "session_cold_s": [], "ask_outside_run_s": []}
    async with h.running_worker(settings, h.registry(fake)) as (client, pool):
        for _ in range(repeats):
            t0 = time.perf_counter()
            handle = await start(client, settings, request("q", ctx))
            await handle.result()
            out["run_s"].append(time.perf_counter() - t0)
        session = await start_session(client, settings, session_request(ctx))
        await ask(session, "warm-up")  # the session's first REPL
        for label in ("session_warm_s", "session_cold_s"):
            for _ in range(repeats):
                if label == "session_cold_s":
                    pool.evict_idle(0.0)
                t0 = time.perf_counter()
                result = await ask(session, "q")
                took = time.perf_counter() - t0
                out[label].append(took)
                child = await client.get_workflow_handle(result.workflow_id).fetch_history()
                out["ask_outside_run_s"].append(took - _span_s(child))
        await close(session)
    return {k: h.spread(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=10.0, help="context size in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configure_logging("warning")
    load_before = os.getloadavg()
    with h.private_services() as svc, h.fake_llm_in_process() as fake:
        _script(fake)
        contexts = ContextStore(ObjectStore.from_settings(svc.settings))
        line = "invoice 12345 vendor ACME amount 100.00 EUR paid\n"
        ctx = contexts.put_value(line * int(args.mb * MB / len(line)))
        figures = asyncio.run(measure(svc.settings, fake, ctx, args.repeats))
    payload = {"context_mb": args.mb, "repeats": args.repeats, "loadavg_before": load_before,
               "loadavg_after": os.getloadavg(), "figures": figures}
    path = h.write_results("sessions", payload)
    for name, spread in figures.items():
        print(f"{name:20s} median {spread['median']:.3f} s  (min {spread['min']:.3f}, max {spread['max']:.3f})")
    print(f"load average before {load_before}, after {payload['loadavg_after']}; written to {path}")
    sys.stdout.flush()
    os._exit(0)  # a process that used a Temporal client can abort at exit (sdk-python#300)


if __name__ == "__main__":
    main()
