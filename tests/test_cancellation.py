"""Cancelling a run stops what it has in flight: the provider requests of its
sub-calls are closed (not left running and billing for minutes), and a cell
whose guest code catches every exception is stopped (the run ends only once
it has). Real worker, Temporal, S3 and WASM; models scripted through litellm."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading

import pytest
from temporalio import activity
from temporalio.client import WorkflowUpdateStage
from temporalio.worker import Worker

from activities.temporal_client import connect
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, running_worker, start
from workflows.names import (
    ACTIVITY_INGEST_CONTEXT,
    ACTIVITY_RESOLVE_MODELS,
    ACTIVITY_ROOT_TURN,
    ACTIVITY_RUN_CELL,
    QUERY_PROGRESS,
    SIGNAL_CANCEL,
    UPDATE_SUBCALLS,
)
from workflows.refs import ContextRef
from workflows.run import STATUS_KEY, RLMRun
from workflows.steps import (
    CellInput,
    CellOutput,
    IngestContextInput,
    ModelInfo,
    ResolveModelsInput,
    ResolveModelsOutput,
    RootTurnInput,
    RootTurnOutput,
    SubcallBatch,
    SubcallItem,
    SubcallReply,
    batch_digest,
)


def test_cancel_closes_the_provider_requests_of_sub_calls_in_flight(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    release = threading.Event()
    llm.add_rule("Turn 1 of", repl("print(llm_query_batched(['a', 'b', 'c']))"), model=ROOT)
    llm.add_rule(None, "late", model=SUB, name="held", hold=release)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx))
            await asyncio.to_thread(llm.wait_for_count, 3, "held", 60)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            result = await asyncio.wait_for(handle.result(), 60)
            # Each held request is closed by its client, not answered later.
            await asyncio.to_thread(llm.wait_abandoned, 3, 60)
            return result

    try:
        result = asyncio.run(go())
    finally:
        release.set()
    assert result.status == "cancelled" and result.reason == "user stop"
    assert llm.billed().requests == 1  # the root turn; no sub-call was answered or billed
    # Yet the run cannot know that a provider did not bill a request it had
    # sent: its reported spend (what a parent settles a child by) counts the
    # three sub-calls in flight at their reservations, as calls lost with a worker.
    assert result.spend.calls == 4, result.spend
    assert result.spend.tokens > 3 * 3, result.spend
    assert result.usage.by_model[SUB].calls == 3, result.usage


def test_cancel_stops_a_cell_that_catches_everything(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    code = "while True:\n    try:\n        sum(range(10_000))\n    except BaseException:\n        pass"
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            # The cell's own limit is far away: only the cancellation can stop it.
            handle = await start(client, s, request("q", ctx, limits={"cell_timeout_s": 600}))
            await _until_cell_runs(handle)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            # The run waits for its cell to acknowledge the cancellation.
            return await asyncio.wait_for(handle.result(), 60)

    result = asyncio.run(go())
    assert result.status == "cancelled" and result.reason == "user stop"


def test_a_run_cancelled_while_its_cell_waits_for_guest_memory_ends_at_once(settings, context_store, llm):
    """A worker whose guest memory holds one REPL: run A's cell loops, run
    B's cell waits for memory. B's cancel was seen only once its checkout
    got memory or gave up (30 s), so it waited for A's cell. B now ends
    cancelled while A's first cell still runs."""
    from activities._machine_memory import machine_memory_bytes

    ctx = context_store.put_value("abc")
    llm.add_rule("Question: loop", repl("while True:\n    pass"), model=ROOT)
    llm.add_rule("Question: wait", repl("print(1)"), model=ROOT)
    one_repl = (24 << 20) / machine_memory_bytes()  # a 16 MiB cap fits, two do not
    s = isolated(settings).model_copy(update={"guest_memory_share": one_repl})

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            a = await start(client, s, request("loop", ctx, limits={"cell_memory_mb": 16, "cell_timeout_s": 20}))
            await _until_cell_runs(a)
            b = await start(client, s, request("wait", ctx, limits={"cell_memory_mb": 16}))
            await _until_cell_runs(b)
            await b.signal(SIGNAL_CANCEL, "user stop")
            b_result = await asyncio.wait_for(b.result(), 60)
            a_phase = (await a.query(QUERY_PROGRESS))["phase"]  # its cell would end in 20 s
            await a.signal(SIGNAL_CANCEL, "done")
            await asyncio.wait_for(a.result(), 60)
            return b_result, a_phase

    b_result, a_phase = asyncio.run(go())
    assert (b_result.status, b_result.reason) == ("cancelled", "user stop"), b_result
    assert a_phase == "cell t1c1", a_phase


def test_a_run_cancelled_while_its_cell_repl_is_made_ends_without_waiting_for_it(settings, context_store, llm, monkeypatch):
    """A cancel stops a cell whose REPL is still being made (a large context
    loading, a large state restoring), before the cell's code has begun: the
    SDK raises CancelledError in the activity's thread, which the guest's
    epoch check lets through. The build here is guest code that never ends:
    only the cancel stops it, and the run ends without waiting for it."""
    from activities.run_cell import RunCellActivity

    ctx = context_store.put_value("abc")
    llm.add_rule("Turn 1 of", repl("print('never runs')"), model=ROOT)
    original = RunCellActivity._start
    building, stopped = threading.Event(), threading.Event()

    def endless_build(self, live, inp, attempt):
        original(self, live, inp, attempt)
        building.set()
        try:
            live.session.run_cell("while True:\n    pass")  # stands in for a build that takes minutes
        finally:
            stopped.set()

    monkeypatch.setattr(RunCellActivity, "_start", endless_build)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx, limits={"cell_timeout_s": 600}))
            await asyncio.to_thread(building.wait, 60)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            result = await asyncio.wait_for(handle.result(), 60)
            # The build itself is stopped, not left running after the run ended.
            return result, await asyncio.to_thread(stopped.wait, 30)

    result, build_stopped = asyncio.run(go())
    assert building.is_set() and build_stopped
    assert (result.status, result.reason) == ("cancelled", "user stop"), result


async def _until_cell_runs(handle) -> None:
    """Wait (on the run's own state, no sleeps as a guess) until its cell runs on a worker."""
    from temporalio.api.enums.v1 import PendingActivityState

    while True:
        pending = (await handle.describe()).raw_description.pending_activities
        if any(
            a.activity_type.name == "run_cell" and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            for a in pending
        ):
            return
        await asyncio.sleep(0.1)


def _question(r) -> str:
    found = re.search(r"Question: (\S+)", r.all_text)
    return found.group(1) if found else ""


def test_a_run_cancelled_with_children_queued_reports_what_they_billed(settings, context_store, llm):
    """Three children, two running (concurrency 2), one queued for a slot;
    then a cancel. The queued one ended at once and the batch with it, and
    the run reported before the running children had settled: 1 call of 5
    billed (found by review). The run now waits for them to stop."""
    release = threading.Event()
    code = 'print(rlm_query_batched(["c0", "c1", "c2"], contexts=["x", "y", "z"]))'
    llm.add_rule(lambda r: _question(r) == "top", repl(code), model=ROOT)
    llm.add_rule(lambda r: _question(r).startswith("c"), repl("print(llm_query('wait'))"), model=ROOT)
    llm.add_rule(None, "ok", model=SUB, name="held", hold=release)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            caps = {"max_depth": 1, "max_concurrency": 2, "max_usd": 1.0}
            handle = await start(client, s, request("top", context_store.put_value("abc"), caps=caps))
            await asyncio.to_thread(llm.wait_for_count, 2, "held", 60)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            return await asyncio.wait_for(handle.result(), 120)

    try:
        result = asyncio.run(go())
    finally:
        release.set()
    llm.wait_idle(30)
    billed = llm.billed()
    assert result.status == "cancelled", result
    assert result.spend.calls >= billed.requests and result.spend.tokens >= billed.tokens, (result.spend, billed)


def _free_models(inp: ResolveModelsInput) -> ResolveModelsOutput:
    free = {"context_window": 100_000, "max_output_tokens": 1_000, "usd_per_input_token": 0.0}
    return ResolveModelsOutput(models={n: ModelInfo(name=n, usd_per_output_token=0.0, **free) for n in inp.names})


class _FirstStepsThatNeverEnd:
    """The two steps a run takes before its turn loop, as fakes registered
    under the real names: the one named `stuck` never ends (only a cancel
    ends it), the other answers at once."""

    def __init__(self, stuck: str) -> None:
        self.stuck = stuck
        self.reached = asyncio.Event()

    async def _maybe_forever(self, step: str) -> None:
        if step != self.stuck:
            return
        self.reached.set()
        while True:
            if not activity.info().is_local:  # a local step's cancel waits for its workflow task (8 s)
                activity.heartbeat()
            await asyncio.sleep(0.5)

    @activity.defn(name=ACTIVITY_RESOLVE_MODELS)
    async def resolve_models(self, inp: ResolveModelsInput) -> ResolveModelsOutput:
        await self._maybe_forever("models")
        return _free_models(inp)

    @activity.defn(name=ACTIVITY_INGEST_CONTEXT)
    async def ingest_context(self, inp: IngestContextInput) -> ContextRef:
        await self._maybe_forever("context")
        raise AssertionError("not reached: the test cancels the run first")


@pytest.mark.parametrize("stuck", ["models", "context"])
def test_a_run_cancelled_by_temporal_before_its_first_turn_ends_with_a_result(settings, stuck):
    """A Temporal cancel (a schedule's cancel_other, the UI's Cancel) that lands
    before the turn loop, while the models are checked (a local step) or the
    context is read: the run ends `cancelled` with a result, and its RlmStatus
    says so (the first ended `failed: Cancelled`, before that the run stayed
    `running` for good). Fakes stand for the two steps, so the cancel lands
    exactly there; Temporal and the workflow are real."""
    s = isolated(settings)
    steps = _FirstStepsThatNeverEnd(stuck)

    async def go():
        client = await connect(s)
        activities = [steps.resolve_models, steps.ingest_context]
        async with Worker(client, task_queue=s.task_queue, workflows=[RLMRun], activities=activities):
            handle = await start(client, s, request("q", "an inline context, stored by the fake"))
            await asyncio.wait_for(steps.reached.wait(), 60)
            await handle.cancel()
            result = await asyncio.wait_for(handle.result(), 60)
            return result, (await handle.describe()).typed_search_attributes.get(STATUS_KEY)

    result, status = asyncio.run(go())
    assert result.status == "cancelled", result
    assert status == "cancelled"


def test_a_session_cancelled_by_temporal_while_it_stores_its_context_ends_cancelled(settings):
    """As a run: a session cancelled while its context is stored ends
    cancelled, as one cancelled later does (it ended failed, `InvalidContext:
    Cancelled`, blaming the caller's context); an ask accepted meanwhile,
    waiting for that context, is answered `cancelled` (it failed: the
    workflow completed before the update)."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import CancelledError

    from tests.session_harness import session_request, start_session
    from workflows.names import UPDATE_ASK
    from workflows.result import RunResult
    from workflows.session import RLMSession
    from workflows.session_models import AskRequest

    s = isolated(settings)
    steps = _FirstStepsThatNeverEnd("context")

    async def go():
        client = await connect(s)
        activities = [steps.resolve_models, steps.ingest_context]
        async with Worker(client, task_queue=s.task_queue, workflows=[RLMSession], activities=activities):
            handle = await start_session(client, s, session_request("an inline context, stored by the fake"))
            await asyncio.wait_for(steps.reached.wait(), 60)
            waiting = await handle.start_update(
                UPDATE_ASK, AskRequest(question="q?"), wait_for_stage=WorkflowUpdateStage.ACCEPTED, result_type=RunResult
            )
            await handle.cancel()
            with pytest.raises(WorkflowFailureError) as ended:
                await asyncio.wait_for(handle.result(), 60)
            return ended.value, await asyncio.wait_for(waiting.result(), 60)

    ended, asked = asyncio.run(go())
    assert isinstance(ended.cause, CancelledError), ended.cause
    assert (asked.status, asked.turns, asked.spend.calls) == ("cancelled", 0, 0), asked


class _AParentWhoseChildIsSlowToStop:
    """Fakes under the real step names for a run with one child run. The
    parent's cell asks for the child (a `subcalls` update it does not wait
    for) and answers FINAL once the child's cell runs: the parent's loop
    ends `completed` while the child still runs. The child's cell, once
    cancelled, does not stop until `release` is set, so the parent is held
    where it waits for its sub-calls to stop before it reports."""

    def __init__(self, client) -> None:
        self.client = client
        self.child_cell_runs = asyncio.Event()
        self.child_cell_cancelled = asyncio.Event()
        self.release = asyncio.Event()

    @activity.defn(name=ACTIVITY_RESOLVE_MODELS)
    async def resolve_models(self, inp: ResolveModelsInput) -> ResolveModelsOutput:
        return _free_models(inp)

    @activity.defn(name=ACTIVITY_ROOT_TURN)
    async def root_turn(self, inp: RootTurnInput) -> RootTurnOutput:
        return RootTurnOutput(reply=repl("ask()"), prompt_tokens=1, completion_tokens=1, usd=0.0, transcript_key="t")

    @activity.defn(name=ACTIVITY_RUN_CELL)
    async def run_cell(self, inp: CellInput) -> CellOutput:
        if "/d1-" in inp.workflow_id:
            return await self._child_cell()
        items = [SubcallItem(text="child question", text_chars=14)]
        batch = SubcallBatch(cell_id=inp.cell_id, seq=1, kind="rlm", items=items, digest=batch_digest("rlm", None, items))
        parent = self.client.get_workflow_handle(inp.workflow_id)
        await parent.start_update(
            UPDATE_SUBCALLS, batch, id=batch.update_id(), wait_for_stage=WorkflowUpdateStage.ACCEPTED, result_type=SubcallReply
        )
        while not self.child_cell_runs.is_set():
            activity.heartbeat()
            await asyncio.sleep(0.2)
        return CellOutput(output="", final="done")

    async def _child_cell(self) -> CellOutput:
        self.child_cell_runs.set()
        while not self.release.is_set():
            activity.heartbeat()
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                self.child_cell_cancelled.set()  # and goes on: slow to stop
        return CellOutput(output="stopped late")


def test_a_run_cancelled_by_temporal_while_its_sub_calls_stop_keeps_its_answer(settings, context_store):
    """A Temporal cancel that lands after the turn loop ended, while the run
    waits for its cancelled sub-calls (here a child run) to stop before it
    reports: the run ends at once with the result its loop reached (here its
    answer), and its RlmStatus says so. It ended as a bare cancelled
    workflow: no result, the answer lost, RlmStatus `running` for good."""
    s = isolated(settings)
    ctx = context_store.put_value("abc")

    async def go():
        client = await connect(s)
        steps = _AParentWhoseChildIsSlowToStop(client)
        activities = [steps.resolve_models, steps.root_turn, steps.run_cell]
        async with Worker(client, task_queue=s.task_queue, workflows=[RLMRun], activities=activities):
            try:  # the worker's shutdown waits for the child's cell, which waits for `release`
                handle = await start(client, s, request("q", ctx, caps={"max_depth": 1}))
                # The parent's loop has ended and cancelled its child, which has not stopped.
                await asyncio.wait_for(steps.child_cell_cancelled.wait(), 60)
                await handle.cancel()
                result = await asyncio.wait_for(handle.result(), 30)  # the child is still held
                return result, (await handle.describe()).typed_search_attributes.get(STATUS_KEY)
            finally:
                steps.release.set()

    result, status = asyncio.run(go())
    assert (result.status, result.answer) == ("completed", "done"), result
    assert status == "completed"



class _AContextThatCannotBeStored:
    """The session's ingest step as a fake under the real name: it fails, as
    for a URI naming no object, once the test has its ask accepted."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.fail = asyncio.Event()

    @activity.defn(name=ACTIVITY_INGEST_CONTEXT)
    async def ingest_context(self, inp: IngestContextInput) -> ContextRef:
        from temporalio.exceptions import ApplicationError

        self.reached.set()
        await self.fail.wait()
        raise ApplicationError("context.uri: s3://audits/q3.txt: no such object", type="InvalidContext", non_retryable=True)

    @contextlib.asynccontextmanager
    async def session_storing_it(self, s):
        """A worker with this step and a session whose context it is storing: (client, session handle)."""
        from tests.session_harness import session_request, start_session
        from workflows.session import RLMSession

        client = await connect(s)
        async with Worker(client, task_queue=s.task_queue, workflows=[RLMSession], activities=[self.ingest_context]):
            handle = await start_session(client, s, session_request("an inline context the fake cannot store"))
            await asyncio.wait_for(self.reached.wait(), 60)
            yield client, handle


def test_asks_waiting_for_a_context_that_cannot_be_stored_are_told_why(settings):
    """A session whose context cannot be stored (a URI naming nothing, sent by
    another service) fails `InvalidContext`; an ask accepted while it was
    being stored is told why (it was cut off: "workflow completed before the
    update"), and so is an ask sent after the session ended (it read "not
    open: workflow execution already completed")."""
    from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError

    from cli._run_client import RunClient, RunError
    from cli._session_client import SessionClient
    from workflows.names import UPDATE_ASK
    from workflows.result import RunResult
    from workflows.session_models import AskRequest

    s = isolated(settings)
    steps = _AContextThatCannotBeStored()

    async def go():
        async with steps.session_storing_it(s) as (client, handle):
            waiting = await handle.start_update(
                UPDATE_ASK, AskRequest(question="q?"), wait_for_stage=WorkflowUpdateStage.ACCEPTED, result_type=RunResult
            )
            steps.fail.set()
            with pytest.raises(WorkflowUpdateFailedError) as asked:
                await asyncio.wait_for(waiting.result(), 60)
            with pytest.raises(WorkflowFailureError) as ended:
                await asyncio.wait_for(handle.result(), 60)
            with pytest.raises(RunError) as later:
                await SessionClient(RunClient(s, client, progress=None)).ask(handle.id, "and now?")
            return asked.value, ended.value, later.value

    asked, ended, later = asyncio.run(go())
    assert "has no usable context: context.uri: s3://audits/q3.txt: no such object" in asked.cause.message, asked.cause
    assert asked.cause.type == "InvalidContext"
    assert ended.cause.type == "InvalidContext", ended.cause
    assert "s3://audits/q3.txt: no such object" in str(later), later


def test_a_close_waiting_for_a_context_that_cannot_be_stored_says_why(settings):
    """`rlm session close` sent while the context is stored: the context
    cannot be stored, and the session fails `InvalidContext`. The close is
    told so (it returned the summary its update gave, as if the session had
    closed)."""
    from cli._run_client import RunClient, RunError
    from cli._session_client import SessionClient
    from tests.session_harness import summary

    s = isolated(settings)
    steps = _AContextThatCannotBeStored()

    async def go():
        async with steps.session_storing_it(s) as (client, handle):
            closing = asyncio.ensure_future(SessionClient(RunClient(s, client, progress=None)).close(handle.id))
            while (await summary(handle)).state != "closed":  # the close was accepted
                await asyncio.sleep(0.05)
            steps.fail.set()
            with pytest.raises(RunError) as told:
                await asyncio.wait_for(closing, 60)
            return told.value

    told = asyncio.run(go())
    assert "s3://audits/q3.txt: no such object" in str(told), told


@pytest.mark.parametrize(
    ("sent", "reason"),
    [({"reason": "stop from the TypeScript client"}, "stop from the TypeScript client"), (42, "42"), (None, "cancelled by request")],
)
def test_a_cancel_whose_reason_is_not_text_still_cancels(settings, context_store, llm, sent, reason):
    """A client in another language sends the cancel signal's argument as an
    object naming it (`{"reason": ...}`), or a number: the SDK could not
    decode it as the declared `str | None` and dropped the signal (a log line
    on the worker), and the run went on. Now any shape cancels; a session too."""
    from tests.session_harness import session_request, start_session

    held = threading.Event()
    rule = llm.add_rule("Turn 1 of", repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            run = await start(client, s, request("q", context_store.put_value("abc")))
            await asyncio.to_thread(llm.wait_for_count, 1, rule, 60)
            await run.signal(SIGNAL_CANCEL, sent)
            ran = await asyncio.wait_for(run.result(), 60)
            session = await start_session(client, s, session_request(context_store.put_value("abc")))
            await session.signal(SIGNAL_CANCEL, sent)
            return ran, await asyncio.wait_for(session.result(), 60)

    try:
        ran, ended = asyncio.run(go())
    finally:
        held.set()
    assert (ran.status, ran.reason) == ("cancelled", reason), ran
    assert ended.state == "closed", ended
