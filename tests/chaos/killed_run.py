"""One run of the tree (tests/chaos/tree.py) with its worker killed -9 at a
kill point, or undisturbed (`point` None); each call has its own model
server, task queue and workers, so several can run at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from temporalio.api.enums.v1 import EventType

from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from activities.settings import Settings
from tests.chaos import tree as scenario
from tests.chaos.observe import completed_model_calls, continued_to, count_events, lost_model_calls, pending_started, tree, wait_until
from tests.chaos.outages import fake_server
from tests.chaos.workers import WorkerProcesses
from tests.fake_llm import Billed, FakeRequest
from tests.run_harness import SUB, isolated, start
from worker import connect
from workflows.result import RunResult

RESULT_TIMEOUT_S = 300.0


@dataclass
class KillOutcome:
    result: RunResult
    requests: list[FakeRequest]
    before_kill: list[FakeRequest]
    """Requests the provider received before the kill (all of them, when undisturbed)."""
    answered_before_kill: int
    """Model calls the engine had recorded as answered (completed activities) at the kill."""
    billed: Billed
    abandoned: int
    lost: int
    """Model calls whose activity was lost (worker killed) over the whole run."""
    elapsed_s: float
    log_tail: str


async def _reach(point: str, client, handle, llm, script) -> None:
    """Wait until the run stands at `point` (an observed condition)."""
    first_run = client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
    if point == "continue_as_new":

        async def continued():
            return continued_to(await first_run.fetch_history())

        await wait_until("the root run to continue as new", continued, RESULT_TIMEOUT_S)
    elif script.held is not None:
        await asyncio.to_thread(llm.wait_for_count, 1, script.held, RESULT_TIMEOUT_S)
    elif point == "cell_before_subcalls":
        await wait_until("the root cell to start", lambda: pending_started(client, handle.id, "run_cell"), RESULT_TIMEOUT_S)
        assert not llm.requests(SUB), "the cell made sub-calls before the kill: the window was missed"
    elif point == "cell_after_subcalls":

        async def answered():
            history = await first_run.fetch_history()
            return count_events(history, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED) >= 2

        await wait_until("the root cell's two sub-call batches to be answered", answered, RESULT_TIMEOUT_S)
    else:
        raise AssertionError(f"unknown kill point {point!r}")


def killed_run(point: str | None, settings: Settings, log_dir: Path) -> KillOutcome:
    started = time.monotonic()
    with fake_server() as llm:
        script = scenario.install(llm, point)
        s = isolated(settings)
        ctx = ContextStore(ObjectStore.from_settings(s)).put_value(scenario.ROOT_CONTEXT)
        with WorkerProcesses(s, llm.url, log_dir / f"workers-{point}.log") as workers:
            first = workers.start()

            async def go():
                client = await connect(s)
                handle = await start(client, s, scenario.tree_request(ctx), workflow_id=f"chaos-{point or 'calm'}-{uuid.uuid4().hex[:8]}")
                if point is None:
                    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
                    return result, None, 0, lost_model_calls(await tree(client, handle.id))
                await _reach(point, client, handle, llm, script)
                workers.kill(first)
                # Held requests end once the provider sees their connection closed.
                await asyncio.to_thread(llm.wait_idle, 30.0)
                before_kill = llm.requests()
                answered = completed_model_calls(await tree(client, handle.id))
                script.release.set()
                workers.start()
                result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
                return result, before_kill, answered, lost_model_calls(await tree(client, handle.id))

            try:
                result, before_kill, answered, lost = asyncio.run(go())
            finally:
                script.release.set()
            llm.wait_idle(30.0)
            requests = llm.requests()
            return KillOutcome(
                result, requests, requests if before_kill is None else before_kill,
                answered if before_kill is not None else len(requests),
                llm.billed(), llm.abandoned(), lost, time.monotonic() - started, workers.log_tail(),
            )  # fmt: skip
