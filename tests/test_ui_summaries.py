"""What the Temporal UI shows of a real run (children, a batch of sub-calls, a
failed cell): every activity and child workflow carries a summary that reads
on its own, the run its static card, and its current details the progress.
Real worker, Temporal, S3 and WASM; scripted models through litellm."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from temporalio.api.enums.v1 import EventType

from activities.context_store import ContextStore
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, put_context, request, running_worker, start
from tests.trace_scenario import QUESTION, script
from workflows.names import ACTIVITY_LLM_CALLS_IN_LANES
from workflows.summaries import MAX_SUMMARY_CHARS, run_static_summary

METADATA_QUERY = "__temporal_workflow_metadata"


def _text(payload) -> str:
    return json.loads(payload.data) if payload.data else ""


async def _summaries(handle) -> dict[str, list[str]]:
    """Summaries of scheduled activities (by activity type) and started children."""
    out: dict[str, list[str]] = {}
    async for event in handle.fetch_history_events():
        if not event.HasField("user_metadata") or not event.user_metadata.HasField("summary"):
            continue
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            kind = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            kind = "child"
        else:
            continue
        out.setdefault(kind, []).append(_text(event.user_metadata.summary))
    return out


def test_activities_children_and_the_run_explain_themselves(settings, object_store, llm):
    hold = threading.Event()
    script(llm, hold_turn3=hold)
    s = isolated(settings)
    ctx = put_context(ContextStore(object_store), "the root context")
    req = request(QUESTION, ctx, caps={"max_depth": 1})

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, req)
            await asyncio.to_thread(llm.wait_for_count, 1, "turn3", 60)
            meta = await handle.query(METADATA_QUERY)
            hold.set()
            result = await asyncio.wait_for(handle.result(), 120)
            return result, await _summaries(handle), meta

    result, found, meta = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert found["root_turn"][:3] == [f"turn {n} · root · {ROOT} · " + found["root_turn"][n - 1].split(" · ")[-1] for n in (1, 2, 3)]
    assert all(s.endswith("tokens in") for s in found["root_turn"])
    cells = found["run_cell"]
    assert cells[0].startswith("cell t1c1 · parts = llm_query_batched([")
    assert cells[1] == "cell t1c2 · x = undefined_name + 1"
    # Both calls of the batch travel in one activity (workflows/call_groups.py).
    assert found[ACTIVITY_LLM_CALLS_IN_LANES] == [f"llm_query x2: 1-2/2 · {SUB}"]
    assert sorted(found["child"]) == ["rlm_query d1 1/2 · Ca", "rlm_query d1 2/2 · Cb"]
    assert all(len(s) <= MAX_SUMMARY_CHARS and "\n" not in s for v in found.values() for s in v)
    # While turn 3 waited: the run's current details show turn, phase and spend.
    details = meta.current_details if hasattr(meta, "current_details") else str(meta)
    assert "**Turn** 3 of" in details and "thinking" in details and "**Spend**" in details


def test_a_run_started_by_the_client_has_a_static_card(settings, object_store, llm):
    from cli._run_client import RunClient, RunError
    from workflows.summaries import run_static_details

    llm.add_rule("Turn 1 of", "```repl\nprint(len(context))\n```", model=ROOT)
    llm.add_rule(None, "FINAL(16)", model=ROOT)
    s = isolated(settings)
    ctx = put_context(ContextStore(object_store), "the root context")
    req = request("How long is it?", ctx)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            runner = RunClient(s, client, progress=None)
            workflow_id = "static-card-" + s.task_queue
            assert await runner.start(req, workflow_id) is None
            handle = client.get_workflow_handle(workflow_id)
            await asyncio.wait_for(handle.result(), 60)
            # Sent again through the SDK (cli/_taken_id.py): the run holds its id.
            again = await runner.start(req, workflow_id)
            with pytest.raises(RunError, match="differs in question"):
                await runner.start(req.model_copy(update={"question": "Other?"}), workflow_id)
            return await handle.describe(), again

    desc, again = asyncio.run(go())
    assert again == "ended"
    meta = desc.raw_description.execution_config.user_metadata
    assert _text(meta.summary) == run_static_summary(req)
    assert _text(meta.details) == run_static_details(req)
    assert "**Question:** How long is it?" in _text(meta.details)
