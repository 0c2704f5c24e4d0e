"""Long runs go through continue-as-new and keep their answer, and every run
of the chain keeps a history under Temporal's warning size (10,240 events,
10 MB; tests/chaos/long_runs.py). RLMRun continues as new at a turn boundary
when the server suggests it, at half of `limits.history_events`, or after
`limits.continue_after_updates` sub-call updates (workflows/turn.py,
`_history_full`); one turn is bounded by workflows/subcalls.py
(`_check_history`).

- 200 turns, each a cell that adds to a REPL variable: the same answer with
  continue-as-new (forced every few turns by `history_events=200`) as
  without it (one run).
- Sub-calls across continue-as-new: SUBCALL_TURNS turns of SUBCALL_BATCH
  each. The full 20,000 takes longer than CI should: it is
  bench/bench_long_runs.py (figures in bench/results/long_runs.json).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.long_runs import WARN_BYTES, WARN_EVENTS, run_chain, script_subcalls, script_turns, sizes
from tests.fixtures_llm import fake_registry
from tests.run_harness import SUB, isolated, request, running_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
TURNS = 200
SUBCALL_TURNS, SUBCALL_BATCH = 3, 400


def test_200_turns_same_answer_with_and_without_continue_as_new(settings, llm, context_store):
    expected = script_turns(llm, TURNS)
    ctx = context_store.put_value("numbers")
    s = isolated(settings)
    caps = {"max_turns": TURNS}

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            t0 = time.monotonic()
            chained = await run_chain(client, s, request("sum", ctx, caps=caps, limits={"history_events": 200}), f"chaos-turns-chained-{s.task_queue}")
            t1 = time.monotonic()
            single = await run_chain(client, s, request("sum", ctx, caps=caps, limits={"history_events": 50_000}), f"chaos-turns-single-{s.task_queue}")
            return chained, single, t1 - t0, time.monotonic() - t1

    (chained, chained_runs), (single, single_runs), t_chained, t_single = asyncio.run(go())
    print(f"\n[chaos 200 turns] chained: {len(chained_runs)} runs in {t_chained:.1f} s, largest (events, bytes) "
          f"{max(sizes(chained_runs))}; single: {len(single_runs)} run in {t_single:.1f} s, {sizes(single_runs)}")  # fmt: skip
    assert chained.status == single.status == "completed", (chained.reason, single.reason)
    assert chained.answer == single.answer == expected
    assert chained.turns == single.turns == TURNS
    assert len(chained_runs) > 10 and len(single_runs) == 1
    for events, size in sizes(chained_runs):
        assert events <= 200 and size < WARN_BYTES
    assert chained.usage.total().calls == single.usage.total().calls == TURNS


def test_subcalls_across_continue_as_new(settings, llm, context_store):
    total = SUBCALL_TURNS * SUBCALL_BATCH
    expected = script_subcalls(llm, SUBCALL_TURNS, SUBCALL_BATCH)
    s = isolated(settings)
    req = request(
        "sum", context_store.put_value("n"), caps={"max_turns": SUBCALL_TURNS + 1, "max_concurrency": 64},
        limits={"continue_after_updates": 1},
    )  # fmt: skip

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return await run_chain(client, s, req, f"chaos-subcalls-{s.task_queue}")

    t0 = time.monotonic()
    result, runs = asyncio.run(go())
    elapsed = time.monotonic() - t0
    print(f"\n[chaos {total} sub-calls] {len(runs)} runs in {elapsed:.1f} s ({elapsed / total * 1000:.1f} ms per sub-call); "
          f"(events, bytes) per run {sizes(runs)}")  # fmt: skip
    assert result.status == "completed", result.reason
    assert result.answer == expected
    assert len(runs) == SUBCALL_TURNS + 1
    assert len(llm.requests(SUB)) == total
    for events, size in sizes(runs):
        assert events < WARN_EVENTS and size < WARN_BYTES
