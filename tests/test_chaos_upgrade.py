"""Chaos: new workflow code deployed while a run is in flight.

A run starts on today's worker; mid-cell (sub-calls in flight) the worker is
stopped as a deploy stops it (SIGTERM) and a worker with changed workflow
code (tests/chaos/upgraded_worker.py: a new step behind
`workflow.patched("check-models-twice")`) takes over. The run in flight
replays its history without the new step and finishes with the right
answer; the run it continues as new is a new execution and takes the new
step (its history records the patch marker). tests/test_replay.py proves the
same for recorded histories; this proves it on a live run.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from temporalio.api.enums.v1 import EventType

from tests.chaos.observe import activity_runs, chain, count_events, recorded_sub_calls, wait_until
from tests.chaos.upgraded_worker import PATCH
from tests.chaos.workers import WorkerProcesses
from tests.run_harness import ROOT, SUB, isolated, repl, request, start
from worker import connect

pytestmark = pytest.mark.chaos
ITEMS, HELD_FROM = 6, 3


def _patch_markers(history) -> list[str]:
    """The text of each marker a run recorded (a patch marker names its patch id)."""
    return [str(e.marker_recorded_event_attributes) for e in history.events if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED]


def test_run_in_flight_finishes_on_patched_workflow_code(settings, llm, context_store, tmp_path):
    expected = str(sum(range(ITEMS)))
    held = threading.Event()
    cell = f"r = llm_query_batched([f'item {{i}}' for i in range({ITEMS})])\nprint('total', sum(int(x) for x in r))"
    llm.add_rule("Turn 1 of", repl(cell), model=ROOT, name="turn1")
    llm.add_rule(f"total {expected}", f"FINAL({expected})", model=ROOT, name="final")
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="fast")
    llm.add_rule(lambda r: int(r.last_user_text.split()[-1]) >= HELD_FROM, lambda r: r.last_user_text.split()[-1],
                 model=SUB, name="held", hold=held)  # fmt: skip
    s = isolated(settings)
    ctx = context_store.put_value("items")
    started = time.monotonic()
    with WorkerProcesses(s, llm.url, tmp_path / "workers.log") as workers:
        old = workers.start()

        async def go():
            client = await connect(s)
            req = request("total?", ctx, limits={"continue_after_updates": 1})
            handle = await start(client, s, req, workflow_id=f"chaos-upgrade-{uuid.uuid4().hex[:6]}")
            await asyncio.to_thread(llm.wait_for_count, ITEMS - HELD_FROM, "held", 120.0)

            async def fast_done():
                return await recorded_sub_calls(s, handle.id) >= HELD_FROM

            await wait_until("the fast sub-calls to be answered and recorded", fast_done)
            await asyncio.to_thread(workers.stop, old)  # the deploy stops the old worker mid-cell
            held.set()
            workers.start(module="tests.chaos.upgraded_worker")
            result = await asyncio.wait_for(handle.result(), 180.0)
            return result, await chain(client, handle.id, handle.first_execution_run_id)

        try:
            result, runs = asyncio.run(go())
        finally:
            held.set()
        log_tail = workers.log_tail()
    print(f"\n[chaos live upgrade] {time.monotonic() - started:.1f} s; runs {len(runs)}; "
          f"patch markers per run {[sum(PATCH in m for m in _patch_markers(h)) for h in runs]}")  # fmt: skip
    assert result.status == "completed", (result.reason, log_tail)
    assert result.answer == expected
    assert llm.count("turn1") == 1 and llm.count("final") == 1
    assert len(runs) == 2
    first, second = runs
    # The run in flight kept its old shape; the run continued as new took the patched step.
    # (Models are resolved by a local activity; the upgrade's extra check is an activity task.)
    assert activity_runs(first, "resolve_models") == (0, 1) and not any(PATCH in m for m in _patch_markers(first))
    assert activity_runs(second, "resolve_models") == (1, 1) and any(PATCH in m for m in _patch_markers(second))
    assert count_events(first, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW) == 1
