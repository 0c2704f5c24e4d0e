"""How a batch's `llm_query` calls are carried to activities
(workflows/call_groups.py): a batch that fits in the run's concurrency goes
as one group; a larger one in groups that carry up to CALLS_PER_LANE calls
per lane, the calls past the cap waiting inside their group for a lane
(workflows/admission.py), so the model never sees more than the cap at once.
Real worker, Temporal, S3 and WASM; scripted models through litellm."""

from __future__ import annotations

import asyncio
import json

import pytest
from temporalio.api.enums.v1 import EventType

from activities.context_store import ContextStore
from tests.chaos.observe import activity_runs
from tests.fixtures_llm import fake_registry
from workflows.result import RunResult
from tests.run_harness import ROOT, SUB, isolated, put_context, repl, request, running_worker, start
from workflows.call_groups import CALLS_PER_ACTIVITY, CALLS_PER_LANE, WHOLE_BATCH_CALLS
from workflows.names import ACTIVITY_LLM_CALLS, ACTIVITY_LLM_CALLS_IN_LANES, CALL_GROUP_ACTIVITIES


def _group_summaries(history) -> list[str]:
    return [
        json.loads(e.user_metadata.summary.data)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name in CALL_GROUP_ACTIVITIES
    ]


def _run_batch(
    settings, object_store, llm, items: int, cap: int, client: str = "litellm", **caps
) -> tuple[list[str], RunResult]:
    cell = (
        f"r = llm_query_batched([f'echo {{i}}' for i in range({items})])\n"
        "print('echoed', sum(a == str(i) for i, a in enumerate(r)), 'refused', sum(a.startswith('Budget:') for a in r))"
    )
    llm.add_rule("Turn 1 of", repl(cell), model=ROOT)
    llm.add_rule(lambda r: "echoed " in r.last_user_text, lambda r: "FINAL(" + r.last_user_text.split("echoed ")[-1].split("\n")[0] + ")", model=ROOT)
    # Slow enough that calls of one group overlap: a lane's next call waits for it.
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, delay_s=0.05)
    s = isolated(settings)
    ctx = put_context(ContextStore(object_store), "groups")

    async def go():
        async with running_worker(s, fake_registry(llm, client=client)) as temporal:
            handle = await start(temporal, s, request("echo?", ctx, caps={"max_concurrency": cap, **caps}))
            result = await asyncio.wait_for(handle.result(), 120)
            return result, await handle.fetch_history()

    result, history = asyncio.run(go())
    # Every group of a run started today has lanes, under the activity name
    # only workers that honour lanes register.
    assert activity_runs(history, ACTIVITY_LLM_CALLS)[0] == 0
    assert activity_runs(history, ACTIVITY_LLM_CALLS_IN_LANES)[0] > 0
    return _group_summaries(history), result


def test_a_batch_that_fits_the_concurrency_travels_in_one_activity(settings, object_store, llm):
    items = 20
    assert CALLS_PER_ACTIVITY < items <= WHOLE_BATCH_CALLS
    groups, result = _run_batch(settings, object_store, llm, items, cap=32)
    assert result.status == "completed", result.reason
    assert groups == [f"llm_query x{items}: 1-{items}/{items} · {SUB}"]
    assert result.answer == f"{items} refused 0"


def _sizes(groups: list[str]) -> list[int]:
    return [int(g.split(":")[0].removeprefix("llm_query x")) for g in groups]


@pytest.mark.parametrize(("items", "cap"), [(20, 4), (WHOLE_BATCH_CALLS + 8, WHOLE_BATCH_CALLS + 8)])
def test_a_larger_batch_goes_in_groups_with_lanes(settings, object_store, llm, items, cap):
    # Behind a cap of 4, a group carries calls past the cap that wait for one
    # of its lanes; a batch past WHOLE_BATCH_CALLS that fits the cap is split
    # into groups of one lane per call.
    groups, result = _run_batch(settings, object_store, llm, items, cap)
    assert result.status == "completed", result.reason
    assert result.answer == f"{items} refused 0"
    sizes = _sizes(groups)
    assert sum(sizes) == items
    assert max(sizes) <= CALLS_PER_LANE * min(cap, CALLS_PER_ACTIVITY)
    if items > cap:
        assert max(sizes) > cap  # calls past the cap travelled in a window
    else:
        assert max(sizes) <= CALLS_PER_ACTIVITY
    # The model never saw more of the run's calls at once than the cap.
    assert llm.peak_in_flight <= cap


def test_the_direct_client_answers_each_call_with_its_own_reply(settings, object_store, llm):
    # Root and sub-calls sent by activities/_direct_openai.py (ModelSpec.client
    # "direct"): every answer is its own prompt's, in order, under the cap.
    groups, result = _run_batch(settings, object_store, llm, 20, 4, client="direct")
    assert result.status == "completed", result.reason
    assert result.answer == "20 refused 0"
    assert sum(_sizes(groups)) == 20
    assert llm.peak_in_flight <= 4
    assert result.spend.calls == 22 and result.spend.usd > 0  # 2 root turns + 20 sub-calls, priced


def test_a_call_budget_holds_exactly_with_windows(settings, object_store, llm):
    # 20 calls behind a cap of 4 with room for 9 model calls in all (the first
    # root turn takes one): windows close while less than two caps' worth of
    # calls is left, the model is called exactly as often as the budget
    # allows, and the refused calls never leave the workflow.
    groups, result = _run_batch(settings, object_store, llm, 20, 4, max_calls=9)
    assert result.status == "budget_exhausted", result.reason  # no call left for the next root turn
    assert result.spend.calls == 9
    assert len(llm.requests(ROOT)) == 1 and len(llm.requests(SUB)) == 8
    assert sum(_sizes(groups)) == 8
    assert llm.peak_in_flight <= 4
