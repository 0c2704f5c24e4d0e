"""Chaos: the worker is killed (SIGKILL of its process) at each kind of step
boundary of a run tree of depth 2 (tests/chaos/tree.py): during a root turn,
in a cell before and after its sub-calls, during a child's root turn, in a
child's cell, at a continue-as-new. A new worker finishes the run, and each
time:

- the answer is the one of an undisturbed run;
- no model call answered before the kill is made again: only calls in
  flight at the kill may run again (counted, printed, at most the number of
  requests the engine had not recorded as answered);
- the spend is recorded once: every request the provider billed is in the
  run's usage once, plus each abandoned in-flight attempt, which the engine
  charges at its reserved worst case because it cannot know what it cost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from temporalio.api.enums.v1 import EventType

from activities.context_store import ContextStore
from tests.chaos import tree as scenario
from tests.chaos.observe import completed_model_calls, continued_to, count_events, pending_started, tree, wait_until
from tests.chaos.workers import WorkerProcesses
from tests.fixtures_llm import fake_registry
from tests.run_harness import SUB, isolated, running_worker, start
from worker import connect
from workflows.request import RunResult

pytestmark = pytest.mark.chaos
RESULT_TIMEOUT_S = 240.0


def _key(r) -> tuple[str, str]:
    return r.model, r.all_text


@pytest.fixture(scope="module")
def undisturbed(settings, fake_llm, object_store):
    """The tree run once without a fault: its answer and number of model calls."""
    fake_llm.reset()
    scenario.install(fake_llm)
    ctx = ContextStore(object_store).put_value(scenario.ROOT_CONTEXT)
    s = isolated(settings)

    async def go() -> RunResult:
        async with running_worker(s, fake_registry(fake_llm)) as client:
            handle = await start(client, s, scenario.tree_request(ctx), workflow_id=f"chaos-calm-{uuid.uuid4().hex[:8]}")
            return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)

    result = asyncio.run(go())
    assert result.status == "completed", result.reason
    calls = len(fake_llm.requests())
    used, billed = result.usage.total(), fake_llm.billed()
    assert (used.calls, used.prompt_tokens, used.completion_tokens) == (billed.requests, billed.prompt_tokens, billed.completion_tokens), result.usage
    fake_llm.reset()
    return result, calls


async def _reach(point: str, client, handle, llm, script) -> None:
    """Wait until the run stands at `point` (an observed condition)."""
    first_run = client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
    if script.held is not None and point != "continue_as_new":
        await asyncio.to_thread(llm.wait_for_count, 1, script.held, RESULT_TIMEOUT_S)
    elif point == "continue_as_new":

        async def continued():
            return continued_to(await first_run.fetch_history())

        await wait_until("the root run to continue as new", continued)
    elif point == "cell_before_subcalls":
        await wait_until("the root cell to start", lambda: pending_started(client, handle.id, "run_cell"))
        assert not llm.requests(SUB), "the cell made sub-calls before the kill: the window was missed"
    elif point == "cell_after_subcalls":

        async def answered():
            history = await first_run.fetch_history()
            return count_events(history, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED) >= 2

        await wait_until("the root cell's two sub-call batches to be answered", answered)
    else:
        raise AssertionError(point)


@pytest.mark.parametrize("point", scenario.KILL_POINTS)
def test_worker_killed_at_step_boundary(point, undisturbed, settings, llm, object_store, tmp_path):
    calm, calm_calls = undisturbed
    script = scenario.install(llm, point)
    ctx = ContextStore(object_store).put_value(scenario.ROOT_CONTEXT)
    s = isolated(settings)
    started = time.monotonic()
    with WorkerProcesses(s, llm.url, tmp_path / "workers.log") as workers:
        first = workers.start()

        async def go():
            client = await connect(s)
            handle = await start(client, s, scenario.tree_request(ctx), workflow_id=f"chaos-{point}-{uuid.uuid4().hex[:8]}")
            await _reach(point, client, handle, llm, script)
            workers.kill(first)
            # Held requests end once the provider sees their connection closed.
            await asyncio.to_thread(llm.wait_idle, 30.0)
            before_kill = llm.requests()
            answered = completed_model_calls(await tree(client, handle.id))
            script.release.set()
            workers.start()
            result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            return result, before_kill, answered

        try:
            result, before_kill, answered = asyncio.run(go())
        finally:
            script.release.set()
        log_tail = workers.log_tail()
    elapsed = time.monotonic() - started
    assert result.status == "completed", (result.reason, log_tail)
    assert result.answer == calm.answer

    # No answered call made again: repeats only of requests the engine had not recorded.
    after_kill = llm.requests()[len(before_kill):]
    seen = Counter(_key(r) for r in before_kill)
    repeated = sum((Counter(_key(r) for r in after_kill) & seen).values())
    in_flight = len(before_kill) - answered
    print(f"\n[chaos kill {point}] {elapsed:.1f} s; calls {len(llm.requests())} (undisturbed {calm_calls}); "
          f"in flight at the kill {in_flight}, made again {repeated}, abandoned {llm.abandoned()}")  # fmt: skip
    assert repeated <= in_flight
    assert len(llm.requests()) == calm_calls + repeated  # every other call made once, as undisturbed

    # Spend recorded once.
    billed, used = llm.billed(), result.usage.total()
    print("usage by depth", {d: (u.calls, u.prompt_tokens) for d, u in result.usage.by_depth.items()},
          "requests by depth-ish", Counter(scenario.question(r)[:5] for r in llm.requests()))
    assert used.calls == billed.requests + llm.abandoned()
    assert used.prompt_tokens + used.completion_tokens >= billed.tokens
    if in_flight == 0:
        assert (used.prompt_tokens, used.completion_tokens) == (billed.prompt_tokens, billed.completion_tokens)
