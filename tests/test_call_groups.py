"""How a batch's `llm_query` calls are carried to activities
(workflows/call_groups.py): a batch that fits in the run's concurrency goes
as one group; a larger one in groups no bigger than the slots free at a time.
Real worker, Temporal, S3 and WASM; scripted models through litellm."""

from __future__ import annotations

import asyncio
import json

import pytest
from temporalio.api.enums.v1 import EventType

from activities.context_store import ContextStore
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, put_context, repl, request, running_worker, start
from workflows.call_groups import CALLS_PER_ACTIVITY, WHOLE_BATCH_CALLS


def _group_summaries(history) -> list[str]:
    return [
        json.loads(e.user_metadata.summary.data)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "llm_calls"
    ]


def _run_batch(settings, object_store, llm, items: int, cap: int) -> list[str]:
    cell = (
        f"r = llm_query_batched([f'echo {{i}}' for i in range({items})])\n"
        f"print('echoed', sum(a == str(i) for i, a in enumerate(r)))"
    )
    llm.add_rule("Turn 1 of", repl(cell), model=ROOT)
    llm.add_rule(lambda r: f"echoed {items}" in r.last_user_text, "FINAL(all echoed)", model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB)
    s = isolated(settings)
    ctx = put_context(ContextStore(object_store), "groups")

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("echo?", ctx, caps={"max_concurrency": cap}))
            result = await asyncio.wait_for(handle.result(), 120)
            return result, await handle.fetch_history()

    result, history = asyncio.run(go())
    assert result.status == "completed" and result.answer == "all echoed", result.reason
    return _group_summaries(history)


def test_a_batch_that_fits_the_concurrency_travels_in_one_activity(settings, object_store, llm):
    items = 20
    assert CALLS_PER_ACTIVITY < items <= WHOLE_BATCH_CALLS
    assert _run_batch(settings, object_store, llm, items, cap=32) == [f"llm_query x{items}: 1-{items}/{items} · {SUB}"]


@pytest.mark.parametrize(("items", "cap"), [(20, 4), (WHOLE_BATCH_CALLS + 8, WHOLE_BATCH_CALLS + 8)])
def test_a_larger_batch_goes_in_groups_of_the_free_slots(settings, object_store, llm, items, cap):
    # Behind a cap of 4, each group is what the slots freed at once allow; a
    # batch past WHOLE_BATCH_CALLS is split even when it fits the cap.
    groups = _run_batch(settings, object_store, llm, items, cap)
    sizes = [int(g.split(":")[0].removeprefix("llm_query x")) for g in groups]
    assert sum(sizes) == items
    assert max(sizes) <= min(cap, CALLS_PER_ACTIVITY)
