"""Long runs go through continue-as-new and keep their answer, and every run
of the chain keeps a history Temporal is comfortable with.

Temporal's server defaults: it suggests continue-as-new at 4,096 events or
4 MB of history, warns at 10,240 events or 10 MB, and fails a run at 51,200
events or 50 MB. RLMRun continues as new at a turn boundary when the server
suggests it, at half of `limits.history_events`, or after
`limits.continue_after_updates` sub-call updates (workflows/turn.py,
`_history_full`); a turn itself is bounded by workflows/subcalls.py
(`_check_history`). Each run of a chain must stay under the warning size.

- 200 turns, each a cell that adds to a REPL variable: the same answer with
  continue-as-new (forced every ~8 turns by a small `history_events`) as
  without it (one run).
- Sub-calls across continue-as-new: SUBCALL_TURNS turns of SUBCALL_BATCH
  sub-calls each; the full 20,000 is bench/bench_long_runs.py (it takes
  longer than CI should; figures in bench/results/long_runs.json).
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.chaos.observe import chain, history_bytes
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, running_worker, start

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
WARN_EVENTS, WARN_BYTES = 10_240, 10 * 1024 * 1024
TURNS = 200
SUBCALL_TURNS, SUBCALL_BATCH = 4, 500


def turn_of(r) -> int:
    m = re.search(r"Turn (\d+) of", r.last_user_text)
    return int(m.group(1)) if m else 0


def script_turns(llm, turns: int) -> int:
    """Turn t < `turns` adds t to `acc` in the REPL; the last turn answers acc."""

    def reply(r) -> str:
        t = turn_of(r)
        if t >= turns:
            return repl("FINAL(acc)")
        return repl(f"acc = globals().get('acc', 0) + {t}\nprint('acc', acc)")

    llm.add_rule(None, reply, model=ROOT)
    return sum(range(1, turns))


async def run_chain(client, s, req, workflow_id: str):
    handle = await start(client, s, req, workflow_id=workflow_id)
    result = await asyncio.wait_for(handle.result(), 900)
    return result, await chain(client, handle.id, handle.first_execution_run_id)


def sizes(histories) -> list[tuple[int, int]]:
    return [(len(h.events), history_bytes(h)) for h in histories]


def test_200_turns_same_answer_with_and_without_continue_as_new(settings, llm, context_store):
    expected = script_turns(llm, TURNS)
    ctx = context_store.put_value("numbers")
    s = isolated(settings)
    caps = {"max_turns": TURNS + 5}

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            t0 = time.monotonic()
            chained = await run_chain(client, s, request("sum", ctx, caps=caps, limits={"history_events": 200}), "chaos-turns-chained")
            t1 = time.monotonic()
            single = await run_chain(client, s, request("sum", ctx, caps=caps, limits={"history_events": 50_000}), "chaos-turns-single")
            return chained, single, t1 - t0, time.monotonic() - t1

    (chained, chained_runs), (single, single_runs), t_chained, t_single = asyncio.run(go())
    print(f"\n[chaos 200 turns] chained: {len(chained_runs)} runs in {t_chained:.1f} s, largest {max(sizes(chained_runs))}; "
          f"single: {len(single_runs)} run in {t_single:.1f} s, {sizes(single_runs)}")  # fmt: skip
    assert chained.status == single.status == "completed", (chained.reason, single.reason)
    assert chained.answer == single.answer == str(expected)
    assert chained.turns == single.turns == TURNS
    assert len(chained_runs) > 10 and len(single_runs) == 1
    for events, size in sizes(chained_runs):
        assert events <= 200 and size < WARN_BYTES
    assert chained.usage.total().calls == single.usage.total().calls == TURNS


def test_subcalls_across_continue_as_new(settings, llm, context_store):
    total = SUBCALL_TURNS * SUBCALL_BATCH

    def reply(r) -> str:
        t = turn_of(r)
        if t > SUBCALL_TURNS:
            return repl("FINAL(acc)")
        return repl(
            f"got = llm_query_batched([f'n {{i}}' for i in range({(t - 1) * SUBCALL_BATCH}, {t * SUBCALL_BATCH})])\n"
            "acc = globals().get('acc', 0) + sum(int(x) for x in got)\nprint('acc', acc)"
        )

    llm.add_rule(None, reply, model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB)
    s = isolated(settings)
    req = request(
        "sum", context_store.put_value("n"), caps={"max_turns": SUBCALL_TURNS + 2, "max_concurrency": 64},
        limits={"continue_after_updates": 1},
    )  # fmt: skip

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return await run_chain(client, s, req, "chaos-subcalls-chained")

    t0 = time.monotonic()
    result, runs = asyncio.run(go())
    elapsed = time.monotonic() - t0
    print(f"\n[chaos {total} sub-calls] {len(runs)} runs in {elapsed:.1f} s ({elapsed / total * 1000:.1f} ms per sub-call); "
          f"sizes {sizes(runs)}")  # fmt: skip
    assert result.status == "completed", result.reason
    assert result.answer == str(sum(range(total)))
    assert len(runs) == SUBCALL_TURNS + 1
    assert len(llm.requests(SUB)) == total
    for events, size in sizes(runs):
        assert events < WARN_EVENTS and size < WARN_BYTES
