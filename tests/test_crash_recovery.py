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


from tests.run_harness import ROOT, SUB, isolated, repl, request, start_worker_process
from activities._call_records import recorded_calls
from worker import connect
from workflows.call_groups import CALLS_PER_ACTIVITY
from workflows.names import WORKFLOW_RLM_RUN
from workflows.result import RunResult

ITEMS = 40
HELD_FROM = 20  # items >= this wait at the model server until after the kill
# All items in flight at once: a group's slots are given back when the whole
# group ends (workflows/call_groups.py), and every group here holds a held item.


def test_worker_killed_mid_cell_run_completes_without_repeating_calls(settings, context_store, llm, tmp_path):
    ctx = context_store.put_value("item list")
    expected = sum(range(ITEMS))
    held = threading.Event()
    llm.add_rule(
        "Turn 1 of",
        repl(
            f"prompts = list({{f'item {{i}}' for i in range({ITEMS})}})\n"
            "r = llm_query_batched(prompts)\n"
            "print('total', sum(int(x) for x in r), 'matched', sum(a == p.split()[-1] for p, a in zip(prompts, r)))"
        ),
        model=ROOT,
        name="turn1",
    )
    llm.add_rule(
        lambda r: f"total {expected} matched {ITEMS}" in r.last_user_text, f"FINAL({expected})", model=ROOT, name="final"
    )
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="fast")
    llm.add_rule(
        lambda r: int(r.last_user_text.split()[-1]) >= HELD_FROM,
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
                WORKFLOW_RLM_RUN, request("total?", ctx, caps={"max_concurrency": ITEMS}), id=f"crash-{os.getpid()}-{id(s)}",
                task_queue=s.task_queue, result_type=RunResult,
            )
            await asyncio.to_thread(llm.wait_for_count, ITEMS - HELD_FROM, "held", 90.0)
            # Every answered call has its record (the durable fact a retry reads).
            while recorded_calls(context_store.store, handle.id) < HELD_FROM:
                await asyncio.sleep(0.1)  # polling storage for an observed fact, not a fixed wait
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            return handle.id

        workflow_id = asyncio.run(until_killed())
        completed_before = {r.last_user_text for r in llm.requests(SUB) if r.matched_rule.name == "fast"}
        assert len(completed_before) == HELD_FROM
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
    assert result.status == "completed", (result.reason, log_path.read_text()[-3000:])
    # Both workers froze their startup objects out of full collections (worker.py).
    started = [json.loads(line) for line in log_path.read_text().splitlines() if '"worker.started"' in line]
    assert len(started) == 2 and all(e["frozen_objects"] > 10_000 for e in started), started
    assert result.answer == str(expected)
    prompts = [r.last_user_text for r in llm.requests(SUB)]
    for prompt in completed_before:
        assert prompts.count(prompt) == 1, f"completed call {prompt!r} was made again"
    assert all(prompts.count(f"item {i}") in (1, 2) for i in range(ITEMS))
    assert llm.count("turn1") == 1
    assert llm.count("final") == 1
    history = asyncio.run(_history(s, workflow_id))
    groups = [e for e in history.events if e.activity_task_scheduled_event_attributes.activity_type.name == "llm_calls"]
    # The kill cut groups short: their calls were retried call by call, so more
    # groups were scheduled than the first attempts alone need.
    assert len(groups) > -(-ITEMS // CALLS_PER_ACTIVITY)


async def _history(settings, workflow_id: str):
    client = await connect(settings)
    return await client.get_workflow_handle(workflow_id).fetch_history()


WINDOW_ITEMS = 12
WINDOW_CAP = 4
HELD = (6, 7)  # the first group carries items 0-7 on 4 lanes: 0-5 answer, 6 and 7 hold their lanes


def test_worker_killed_mid_window_run_completes_without_repeating_calls(settings, context_store, llm, tmp_path):
    # Behind a cap of 4, the first group carries 8 calls on 4 lanes (call
    # windows, workflows/admission.py): its activity started items 4 and 5 as
    # lanes freed, with no workflow step between. The kill lands while 6 and 7
    # hold their lanes and 8-11 wait in the workflow for admission.
    ctx = context_store.put_value("window list")
    expected = sum(range(WINDOW_ITEMS))
    held = threading.Event()
    llm.add_rule(
        "Turn 1 of",
        repl(
            f"prompts = [f'item {{i}}' for i in range({WINDOW_ITEMS})]\n"
            "r = llm_query_batched(prompts)\n"
            "print('total', sum(int(x) for x in r), 'matched', sum(a == p.split()[-1] for p, a in zip(prompts, r)))"
        ),
        model=ROOT,
        name="turn1",
    )
    llm.add_rule(
        lambda r: f"total {expected} matched {WINDOW_ITEMS}" in r.last_user_text, f"FINAL({expected})", model=ROOT,
        name="final",
    )  # fmt: skip
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="fast")
    llm.add_rule(
        lambda r: int(r.last_user_text.split()[-1]) in HELD,
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
            req = request("total?", ctx, caps={"max_concurrency": WINDOW_CAP})
            handle = await client.start_workflow(
                WORKFLOW_RLM_RUN, req, id=f"crash-window-{os.getpid()}-{id(s)}", task_queue=s.task_queue,
                result_type=RunResult,
            )  # fmt: skip
            await asyncio.to_thread(llm.wait_for_count, len(HELD), "held", 90.0)
            while recorded_calls(context_store.store, handle.id) < HELD[0]:
                await asyncio.sleep(0.1)  # polling storage for an observed fact, not a fixed wait
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            return handle.id

        workflow_id = asyncio.run(until_killed())
        answered_before = [r.last_user_text for r in llm.requests(SUB) if r.matched_rule.name == "fast"]
        assert sorted(answered_before) == sorted(f"item {i}" for i in range(HELD[0]))
        assert llm.peak_in_flight <= WINDOW_CAP
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
    assert result.status == "completed" and result.answer == str(expected), (result.reason, log_path.read_text()[-3000:])
    prompts = [r.last_user_text for r in llm.requests(SUB)]
    for prompt in answered_before:
        assert prompts.count(prompt) == 1, f"completed call {prompt!r} was made again"
    assert all(prompts.count(f"item {i}") in (1, 2) for i in range(WINDOW_ITEMS))
    history = asyncio.run(_history(s, workflow_id))
    first_group = next(
        e for e in history.events if e.activity_task_scheduled_event_attributes.activity_type.name == "llm_calls"
    )
    carried = json.loads(first_group.activity_task_scheduled_event_attributes.input.payloads[0].data)
    assert len(carried["calls"]) == 2 * WINDOW_CAP and carried["lanes"] == WINDOW_CAP
