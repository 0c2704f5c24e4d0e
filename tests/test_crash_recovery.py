"""Kill -9 the worker in the middle of a cell that waits on sub-calls: a new
worker finishes the run with the same answer, every reply belongs to its
prompt, and no model call that had completed is made again (counted at the
model server). The cell builds its prompts by iterating a `set`, whose order
may differ in the re-run cell (string hashing differs between interpreters).
Calls travel several to an activity (workflows/call_groups.py), so the kill
lands in groups that hold both answered calls and calls still waiting: each
answered call must have been recorded (its group's records hold it) and is
not made again. With call windows a group carries more calls than lanes; a
kill there must not repeat the calls its activity had started on freed lanes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.run_harness import ROOT, SUB, isolated, repl, request, start_worker_process
from activities._call_records import recorded_calls
from worker import GC_YOUNG_OBJECTS, connect
from workflows.call_groups import CALLS_PER_ACTIVITY
from workflows.names import ACTIVITY_LLM_CALLS_IN_LANES, CALL_GROUP_ACTIVITIES, WORKFLOW_RLM_RUN
from workflows.result import RunResult

ITEMS = 40
HELD_FROM = 20  # items >= this wait at the model server until after the kill
# All items in flight at once (cap 40): a group's slots are given back when the
# whole group ends (workflows/call_groups.py), and every group here holds a held item.


def test_worker_killed_mid_cell_run_completes_without_repeating_calls(settings, context_store, llm, tmp_path):
    crash = _crash_mid_cell(
        settings, context_store, llm, tmp_path,
        prompts=f"list({{f'item {{i}}' for i in range({ITEMS})}})", items=ITEMS, cap=ITEMS,
        held_if=lambda i: i >= HELD_FROM, answered=HELD_FROM,
    )  # fmt: skip
    assert len(set(crash.answered_before)) == HELD_FROM
    result = crash.result
    assert result.status == "completed", (result.reason, crash.log_path.read_text()[-3000:])
    # Both workers froze their startup objects out of full collections (worker.py).
    started = [json.loads(line) for line in crash.log_path.read_text().splitlines() if '"worker.started"' in line]
    assert len(started) == 2 and all(e["frozen_objects"] > 10_000 for e in started), started
    # ... and collect young objects less often than Python's default (every 700).
    assert all(e["gc_threshold"][0] == GC_YOUNG_OBJECTS for e in started), started
    # ... and said how their models are called: the scripted server is on loopback.
    assert all(e["models"]["fake-root"] == e["models"]["fake-sub"] == "direct" for e in started), started
    # ... and that their connection to the loopback Temporal server is not compressed.
    assert all(e["temporal_gzip"] is False for e in started), started
    assert result.answer == str(sum(range(ITEMS)))
    crash.assert_answered_calls_not_repeated(llm, ITEMS)
    assert llm.count("turn1") == 1
    assert llm.count("final") == 1
    history = asyncio.run(_history(crash.settings, crash.workflow_id))
    groups = [e for e in history.events if e.activity_task_scheduled_event_attributes.activity_type.name in CALL_GROUP_ACTIVITIES]
    # The kill cut groups short: their calls were retried call by call, so more
    # groups were scheduled than the first attempts alone need.
    assert len(groups) > -(-ITEMS // CALLS_PER_ACTIVITY)


WINDOW_ITEMS = 12
WINDOW_CAP = 4
HELD = (6, 7)  # the first group carries items 0-7 on 4 lanes: 0-5 answer, 6 and 7 hold their lanes


def test_worker_killed_mid_window_run_completes_without_repeating_calls(settings, context_store, llm, tmp_path):
    # Behind a cap of 4, the first group carries 8 calls on 4 lanes (call
    # windows, workflows/admission.py): its activity started items 4 and 5 as
    # lanes freed, with no workflow step between. The kill lands while 6 and 7
    # hold their lanes and 8-11 wait in the workflow for admission.
    crash = _crash_mid_cell(
        settings, context_store, llm, tmp_path,
        prompts=f"[f'item {{i}}' for i in range({WINDOW_ITEMS})]", items=WINDOW_ITEMS, cap=WINDOW_CAP,
        held_if=lambda i: i in HELD, answered=HELD[0],
    )  # fmt: skip
    assert sorted(crash.answered_before) == sorted(f"item {i}" for i in range(HELD[0]))
    assert crash.peak_before <= WINDOW_CAP
    result = crash.result
    assert result.status == "completed" and result.answer == str(sum(range(WINDOW_ITEMS))), (
        result.reason, crash.log_path.read_text()[-3000:]
    )  # fmt: skip
    crash.assert_answered_calls_not_repeated(llm, WINDOW_ITEMS)
    history = asyncio.run(_history(crash.settings, crash.workflow_id))
    first_group = next(
        e for e in history.events
        if e.activity_task_scheduled_event_attributes.activity_type.name == ACTIVITY_LLM_CALLS_IN_LANES
    )
    carried = json.loads(first_group.activity_task_scheduled_event_attributes.input.payloads[0].data)
    assert len(carried["calls"]) == 2 * WINDOW_CAP and carried["lanes"] == WINDOW_CAP


@dataclass
class _Crash:
    settings: object
    workflow_id: str
    answered_before: list[str]
    """Sub-call prompts the model had answered when the worker was killed."""
    peak_before: int
    """Most sub-calls in flight at once at the model server until the kill."""
    result: RunResult
    log_path: Path

    def assert_answered_calls_not_repeated(self, llm, items: int) -> None:
        prompts = [r.last_user_text for r in llm.requests(SUB)]
        for prompt in self.answered_before:
            assert prompts.count(prompt) == 1, f"completed call {prompt!r} was made again"
        assert all(prompts.count(f"item {i}") in (1, 2) for i in range(items))


def _crash_mid_cell(
    settings, context_store, llm, tmp_path, *, prompts: str, items: int, cap: int, held_if, answered: int
) -> _Crash:
    """Run a cell that asks `llm_query_batched(<prompts>)` ("item i" -> "i");
    the items `held_if` picks wait at the model server. Once they all arrived
    and `answered` calls are recorded, kill -9 the worker, release the held
    items and let a second worker finish the run."""
    ctx = context_store.put_value("item list")
    expected = sum(range(items))
    held = threading.Event()
    llm.add_rule(
        "Turn 1 of",
        repl(
            f"prompts = {prompts}\n"
            "r = llm_query_batched(prompts)\n"
            "print('total', sum(int(x) for x in r), 'matched', sum(a == p.split()[-1] for p, a in zip(prompts, r)))"
        ),
        model=ROOT,
        name="turn1",
    )
    llm.add_rule(
        lambda r: f"total {expected} matched {items}" in r.last_user_text, f"FINAL({expected})", model=ROOT, name="final"
    )
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="fast")
    llm.add_rule(
        lambda r: held_if(int(r.last_user_text.split()[-1])),
        lambda r: r.last_user_text.split()[-1],
        model=SUB,
        name="held",
        hold=held,
    )
    s = isolated(settings)
    log_path = tmp_path / "workers.log"
    first = start_worker_process(s, llm.url, log_path)
    second = None
    try:

        async def until_killed():
            client = await connect(s)
            handle = await client.start_workflow(
                WORKFLOW_RLM_RUN, request("total?", ctx, caps={"max_concurrency": cap}), id=f"crash-{os.getpid()}-{id(s)}",
                task_queue=s.task_queue, result_type=RunResult,
            )
            await asyncio.to_thread(llm.wait_for_count, sum(map(held_if, range(items))), "held", 90.0)
            # Every answered call has its record (the durable fact a retry reads).
            while recorded_calls(context_store.store, handle.id) < answered:
                await asyncio.sleep(0.1)  # polling storage for an observed fact, not a fixed wait
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            return handle.id

        workflow_id = asyncio.run(until_killed())
        answered_before = [r.last_user_text for r in llm.requests(SUB) if r.matched_rule.name == "fast"]
        peak_before = llm.peak_in_flight
        held.set()
        second = start_worker_process(s, llm.url, log_path)

        async def finish() -> RunResult:
            client = await connect(s)
            return await asyncio.wait_for(client.get_workflow_handle(workflow_id, result_type=RunResult).result(), 120)

        result = asyncio.run(finish())
    finally:
        held.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
    return _Crash(s, workflow_id, answered_before, peak_before, result, log_path)


async def _history(settings, workflow_id: str):
    client = await connect(settings)
    return await client.get_workflow_handle(workflow_id).fetch_history()
