"""Chaos: a session's worker is killed (SIGKILL of its process group) between
a question's answer and its `session_history` record: the question's run
has completed, and the cell that appends it to `session_history` either has
started and not run (`start`) or has run and stored its REPL snapshot, but
its activity is not yet reported completed (`stored`). The worker
(tests/chaos/held_cell_worker.py) stops for good at that point and says so
in a file; the test kills it then, so the kill lands there every time.

A new worker takes over, and:

- the ask in flight returns its answer, and the caller sending the same
  update id again gets that same answer (the question is not run again);
- `session_history` holds that question once (not zero, not twice), and the
  REPL's variables from it are still there, as the next question sees;
- the session's budget and usage count the answer once: what the provider
  billed, no more (no model call was in flight at the kill);
- the next question works, and `close` counts two questions.

Real Temporal dev server, real S3, real wasmtime REPLs, the scripted model
server through litellm.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from temporalio.api.enums.v1 import EventType

from activities.runtime import run_key
from tests.chaos.workers import WorkerProcesses
from tests.run_harness import ROOT, completed_activities, isolated, repl
from tests.session_harness import TIMEOUT_S, ask, asked, close, session_request, start_session, summary
from worker import connect
from workflows.names import ACTIVITY_RUN_CELL, UPDATE_ASK
from workflows.result import RunResult
from workflows.session_models import AskRequest

pytestmark = pytest.mark.chaos

HOLD_CELL = "q1r"  # the cell that appends question 1 to `session_history` (workflows/session.py)
FIRST = AskRequest(question="first?")
SEEN = re.compile(r"seen \d+ \d+ total \d+")  # what the second question's cell prints


@pytest.mark.parametrize("point", ["start", "stored"])
def test_worker_killed_between_an_answer_and_its_history_record(point, settings, context_store, object_store, llm, tmp_path):
    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("first"), repl("total = sum(int(x) for x in context.split()[1:])\nprint('sum is', total)"),
                 model=ROOT, name="first")  # fmt: skip
    llm.add_rule("sum is 12", "FINAL(twelve)", model=ROOT, name="first-final")
    record = {"question": "first?", "answer": "twelve", "status": "completed"}
    llm.add_rule(asked("second"), repl(f"print('seen', session_history.count({record!r}), len(session_history), 'total', total)"),
                 model=ROOT, name="second")  # fmt: skip
    llm.add_rule(lambda r: SEEN.search(r.last_user_text) is not None, _final_seen, model=ROOT, name="second-final")
    s = isolated(settings)
    marker = tmp_path / "held"
    hold = {"RLM_TEST_HOLD_CELL": HOLD_CELL, "RLM_TEST_HOLD_AT": point, "RLM_TEST_HOLD_FILE": str(marker)}

    with WorkerProcesses(s, llm.url, tmp_path / "workers.log", env=hold) as workers:

        async def go():
            client = await connect(s)
            handle = await start_session(client, s, session_request(ctx))
            ask_id = f"ask-first-{point}"
            in_flight = asyncio.ensure_future(
                handle.execute_update(UPDATE_ASK, FIRST, id=ask_id, result_type=RunResult)
            )
            first_worker = workers.start(module="tests.chaos.held_cell_worker")
            # The worker writes the file where it stands still: no timing guess.
            deadline = time.monotonic() + TIMEOUT_S
            while not marker.exists():
                assert not in_flight.done(), in_flight.result()  # raises what ended it
                assert first_worker.poll() is None and time.monotonic() < deadline, workers.log_tail()
                await asyncio.sleep(0.1)  # polling for an observed fact, not a fixed wait
            stored = object_store.exists(run_key(handle.id, "snapshots", f"{HOLD_CELL}.bin"))
            workers.kill(first_worker)
            workers.start()  # a plain worker.py: nothing held
            retried = await asyncio.wait_for(
                handle.execute_update(UPDATE_ASK, FIRST, id=ask_id, result_type=RunResult), TIMEOUT_S
            )
            first = await asyncio.wait_for(in_flight, TIMEOUT_S)
            between = await summary(handle)
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            closed = await close(handle)
            return stored, first, retried, between, second, closed, await handle.fetch_history()

        stored, first, retried, between, second, closed, history = asyncio.run(go())
        log_tail = workers.log_tail()

    # The kill landed where the test meant it to.
    assert stored == (point == "stored")
    # The answer, once: the caller waiting and the caller sending again get the same result.
    assert (first.status, first.answer) == ("completed", "twelve"), (first.reason, log_tail)
    assert retried == first
    assert between.questions == 1 and len(between.recent) == 1
    assert llm.count("first") == 1 and llm.count("first-final") == 1, "the question ran again"
    # session_history holds it once, and the REPL kept the question's variables.
    assert (second.status, second.answer) == ("completed", "seen 1 1 total 12"), (second.reason, log_tail)
    # Two asks accepted, each history cell completed once, the first after a retry.
    accepted = [
        e for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
        and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name == UPDATE_ASK
    ]  # fmt: skip
    assert len(accepted) == 2
    assert completed_activities(history, ACTIVITY_RUN_CELL) == 2
    attempts = _cell_attempts(history)
    assert len(attempts) == 2 and attempts[0] >= 2, attempts
    # The budget counts each answer once: exactly what the provider billed.
    billed = llm.billed()
    assert closed.questions == 2
    assert closed.spend.calls == first.spend.calls + second.spend.calls == billed.requests == 4
    assert closed.spend.tokens == first.spend.tokens + second.spend.tokens == billed.tokens
    assert closed.usage.total().calls == billed.requests


def _final_seen(r) -> str:
    """FINAL of what the second question's cell printed."""
    return f"FINAL({SEEN.search(r.last_user_text).group()})"  # type: ignore[union-attr]


def _cell_attempts(history) -> list[int]:
    """The attempt that completed, of each of the session's own cells, in order."""
    cells = {
        e.event_id for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == ACTIVITY_RUN_CELL
    }  # fmt: skip
    return [
        e.activity_task_started_event_attributes.attempt for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and e.activity_task_started_event_attributes.scheduled_event_id in cells
    ]  # fmt: skip
